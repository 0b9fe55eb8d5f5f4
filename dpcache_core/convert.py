"""Convert the reference implementation's pickled PACT into a DPCache PACT file (no code is unpickled).

    python -m dpcache_core.convert final_3d_cost_matrix_flux.pkl ComfyUI/models/dpcache/official_flux.safetensors --family flux
"""
from __future__ import annotations

import argparse

import numpy as np

from .pact import PactAccumulator
from .store import import_reference_pkl, save_pact


def convert(pkl_path: str, out_path: str, family: str, order: int = 2, sampler: str | None = None) -> dict:
    """Write the (mean) cost tensor of ``pkl_path`` as a one-sample PACT; returns its metadata."""
    cost = import_reference_pkl(pkl_path)
    acc = PactAccumulator(cost.shape[0])
    acc.add(cost)
    meta = {"model_family": family, "order": order, "scheme": "reference", "imported_from": pkl_path.rsplit("/", 1)[-1]}
    if sampler:
        meta["sampler"] = sampler
    return save_pact(out_path, acc, meta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pkl", help="the reference's .pkl cost tensor (final_3d_cost_matrix_*.pkl)")
    parser.add_argument("out", help="the .safetensors file to write (put it in ComfyUI/models/dpcache/)")
    parser.add_argument("--family", required=True, choices=["flux", "wan"], help="the model the PACT was calibrated on")
    parser.add_argument("--order", type=int, default=2, help="Taylor order used in calibration (reference: 2)")
    parser.add_argument("--sampler", default=None, help="sampler used in calibration, if known")
    args = parser.parse_args(argv)
    meta = convert(args.pkl, args.out, args.family, args.order, args.sampler)
    finite = np.isfinite(import_reference_pkl(args.pkl)).sum()
    print(f"wrote {args.out}: T={meta['num_evals']}, {finite} finite entries, family {args.family}")


if __name__ == "__main__":
    main()
