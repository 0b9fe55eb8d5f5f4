"""Convert a reference cost tensor (the DPCache authors' .pkl, or a .npy array) into a DPCache PACT file.

Nothing is unpickled but numpy arrays (.pkl), and .npy files are read with allow_pickle=False.

    python -m dpcache_core.convert final_3d_cost_matrix_flux.pkl ComfyUI/models/dpcache/official_flux.safetensors --family flux
    python -m dpcache_core.convert pact_official_flux.npy cost_matrices/flux1_dev_official_T50.safetensors \\
        --metadata cost_matrices/provenance/flux1_dev_official_T50.json
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from .pact import PactAccumulator
from .store import PactFileError, import_reference, save_pact

FAMILIES = ("flux", "wan")


def read_metadata(path: str) -> dict:
    """The JSON object in ``path`` (provenance to store in the PACT file)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise PactFileError(f"cannot read the metadata file {path} ({exc})") from None
    if not isinstance(meta, dict):
        raise PactFileError(f"the metadata file {path} must hold a JSON object")
    return meta


def convert(src: str, out_path: str, family: str | None = None, order: int | None = None,
            sampler: str | None = None, metadata: dict | None = None) -> dict:
    """Write the cost tensor of ``src`` as a one-sample PACT (finite entries count 1); returns its metadata.

    ``metadata`` (for example source, licence, scheduler) is stored as given; ``family``, ``order``
    and ``sampler`` override it when passed. The tensor's values are stored unchanged.
    """
    cost = import_reference(src)
    meta = {"scheme": "reference", "order": 2, "imported_from": os.path.basename(src)}
    meta.update(metadata or {})
    for key, value in (("model_family", family), ("order", order), ("sampler", sampler)):
        if value is not None:
            meta[key] = value
    if not meta.get("model_family"):
        raise PactFileError("say which model the PACT was calibrated on: --family flux|wan (or model_family in --metadata)")
    acc = PactAccumulator(cost.shape[0])
    acc.add(cost)
    return save_pact(out_path, acc, meta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the reference cost tensor: final_3d_cost_matrix_*.pkl, or a (T, T+1, T+1) .npy array")
    parser.add_argument("out", help="the .safetensors file to write (put it in ComfyUI/models/dpcache/)")
    parser.add_argument("--family", choices=FAMILIES, default=None, help="the model the PACT was calibrated on")
    parser.add_argument("--order", type=int, default=None, help="Taylor order used in calibration (reference: 2)")
    parser.add_argument("--sampler", default=None, help="sampler used in calibration, if known")
    parser.add_argument("--metadata", default=None, help="a JSON file of metadata to store (provenance, licence, scheduler ...)")
    args = parser.parse_args(argv)
    try:
        extra = read_metadata(args.metadata) if args.metadata else None
        meta = convert(args.src, args.out, args.family, args.order, args.sampler, extra)
        finite = int(np.isfinite(import_reference(args.src)).sum())
    except PactFileError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {args.out}: T={meta['num_evals']}, {finite} finite entries, family {meta['model_family']}, order {meta['order']}")


if __name__ == "__main__":
    main()
