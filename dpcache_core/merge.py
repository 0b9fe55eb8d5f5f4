"""Merge PACT files calibrated on several machines or GPUs into one, exactly (sums and counts add).

    python -m dpcache_core.merge A.safetensors B.safetensors ... -o OUT.safetensors [--force]

Every input must be for the same model family, number of evaluations T, Taylor order and predictor
scheme. Samples of different sample sizes mix (they estimate the same means); settings that differ
(resolution, sampler, ...) are listed, structured ones (the trajectory's sigmas) are the first
file's. PACTs of partial runs (windows) are refused. An existing OUT,
inputs included, is only replaced with --force; OUT is written atomically after every input is read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import check_runs
from .pact import PactAccumulator
from .settings import combine_records
from .store import PactFileError, combine_sampling, load_pact, save_pact

MUST_AGREE = ("model_family", "num_evals", "order", "scheme")
SAMPLING_KEYS = ("sample_size", "sample_sizes", "sample_seed")
RECORD_KEYS = ("sample_meta", "resolution")  # per-sample records: concatenated (settings.combine_records)
TRAJECTORY_KEYS = ("eval_sigmas", "positions")  # per-evaluation lists: one trajectory's, never listed


def merge_pacts(paths: list[str]) -> tuple[PactAccumulator, dict]:
    """The PACT holding every sample of ``paths``, and its metadata; ``PactFileError`` when they do not fit."""
    if len(paths) < 2:
        raise PactFileError("give at least two PACT files to merge")
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        if os.path.exists(path):
            stat = os.stat(path)
            if (stat.st_dev, stat.st_ino) in seen:
                twin = seen[stat.st_dev, stat.st_ino]
                raise PactFileError(f"{path} and {twin} are the same file; give each PACT once (its samples would count twice)")
            seen[stat.st_dev, stat.st_ino] = path
    loaded = [(path, *load_pact(path)) for path in paths]
    merged_from = [{"file": os.path.basename(path), "samples": acc.samples} for path, acc, _ in loaded]
    first_path, merged, first_meta = loaded[0]
    want = {key: first_meta.get(key, "reference" if key == "scheme" else None) for key in MUST_AGREE}
    for path, acc, meta in loaded[1:]:
        have = {key: meta.get(key, "reference" if key == "scheme" else None) for key in MUST_AGREE}
        if have != want:
            diff = ", ".join(f"{k} {have[k]!r} vs {want[k]!r}" for k in MUST_AGREE if have[k] != want[k])
            raise PactFileError(
                f"{os.path.basename(path)} does not fit {os.path.basename(first_path)} ({diff}): only PACTs of the "
                "same model family, number of evaluations, Taylor order and scheme can be merged"
            )
        merged.merge(acc)
    if any(m.get("windows") for _, _, m in loaded):
        raise PactFileError("merging PACTs of partial sampling runs (windows, e.g. Wan2.2 experts) is not supported; "
                            "merge PACTs of whole runs, or calibrate the windows into one file")
    meta = {}
    conventions = {m.get("convention", "reference") for _, _, m in loaded}
    for key in sorted({k for _, _, m in loaded for k in m} - set(SAMPLING_KEYS) - set(RECORD_KEYS) - {"samples", "pack_version", "merged_from", "convention"}):
        present = [m[key] for _, _, m in loaded if m.get(key) is not None]
        if not present:
            continue
        if key == "forecaster_checks":  # every file's check runs count
            meta[key] = check_runs.merged(present)
            continue
        if key in TRAJECTORY_KEYS or any(isinstance(v, dict) for v in present):
            meta[key] = present[0]  # the first file's, as DPCache Calibrate keeps one run's
            continue
        flat = [x for v in present for x in (v if isinstance(v, list) else [v])]
        values = list({json.dumps(v, sort_keys=True): v for v in flat}.values())  # differing settings are listed
        meta[key] = values[0] if len(values) == 1 else values
    # The planning convention (issue 11): kept when every input agrees, else the reference one.
    meta["convention"] = conventions.pop() if len(conventions) == 1 else "reference"
    meta.update(combine_sampling([m for _, _, m in loaded]))
    meta.update(combine_records([m for _, _, m in loaded]))
    meta["merged_from"] = merged_from
    return merged, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpcache_core.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="PACT files (.safetensors) written by DPCache Calibrate")
    parser.add_argument("-o", "--output", required=True, help="the merged PACT file to write")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (it may be one of the inputs)")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        parser.error(f"{args.output} exists: pick another output name, or add --force to replace it")
    try:
        acc, meta = merge_pacts(args.inputs)
    except PactFileError as exc:
        parser.error(str(exc))
    written = save_pact(args.output, acc, meta)
    sizes = ", ".join(f"{n} x S={s}" for s, n in written["sample_sizes"].items())
    print(f"{args.output}: {written['samples']} samples ({sizes}) from {len(args.inputs)} files, "
          f"{written.get('model_family')} T={written['num_evals']} order {written.get('order')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
