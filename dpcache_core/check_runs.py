"""Check runs: each forecaster sampled for real, with the cache, at a few K during calibration.

Replaying a forecaster on recorded trajectories (``choose``) is teacher-forced: every key step sees
the recorded cache point, so it cannot see how a prediction error moves the latent and what the
next key step then computes. On the bench it picked a forecaster within 0.5 dB of the best in
hindsight in only about half the cells (BENCHMARKS.md). A check run closes the loop: DPCache
Calibrate, after a run it recorded, samples the same noise and conditioning again with each
forecaster at each K of ``check_ks`` and keeps the PSNR of the final latent against the recorded
run's: each forecaster on its replay-best key set (label: the forecaster), and Taylor 2 and spectral
also on the key set planned on the history-exact cost of the recorded runs (label "<forecaster>
(history-exact plan)"), each planned on the file as it is then. A label is thus a forecaster and a
way to plan its keys; the mean over the check runs measures it on several prompts. DPCache
Schedule's forecaster "auto" then takes the label the checks measured best at the nearest checked
K (``checked_ranking``) and plans its keys that way on the file as it is when the schedule is made
(more samples than at the first check run: on the bench the first run's plans lost up to 3.8 dB
to the same forecaster planned on four samples).

Stored in the PACT's metadata as ``forecaster_checks``: {"runs": n, "ks": {"<K>": {"<label>":
[PSNR dB of each check run]}}, "keys": {"<K>": {"<label>": [the key steps the last check run sampled]}}}.
"""
from __future__ import annotations

import math

import numpy as np

HISTORY_PLAN = " (history-exact plan)"  # label suffix: the forecaster on the key set planned on the history-exact cost


def forecaster_of(label: str) -> str:
    """The forecaster of a check's label ("taylor 2", or "taylor 2 (history-exact plan)")."""
    return label[: -len(HISTORY_PLAN)] if label.endswith(HISTORY_PLAN) else label


# Speed-ups checked, the Schedule's default (3.85x) among them: at T = 50 the K are 25, 17, 13, 10 and 9. The
# fifth (5.5x) costs 14 % more check time; on HunyuanVideo the check at K = 10 standing in for K = 9 chose 1.1 dB
# below the best plan (bench/results/replay_choice_check_runs.md).
CHECK_SPEEDUPS = (2.0, 3.0, 3.85, 5.0, 5.5)
CHECK_REACH = 1.25  # a check at K decides for K' when K' / K lies within 1 / 1.25 .. 1.25
MAX_DB = 200.0  # a check run equal to the recorded one (mse 0) counts as this


def check_ks(num_evals: int, first_full_steps: int = 3, last_full_steps: int = 0) -> list[int]:
    """The K checked at T = ``num_evals``: T / each of ``CHECK_SPEEDUPS``, rounded, above the mandatory
    key steps and below T; distinct, largest first."""
    low = first_full_steps + last_full_steps + 1
    ks = {int(round(num_evals / s)) for s in CHECK_SPEEDUPS}
    return sorted((k for k in ks if low <= k < num_evals), reverse=True)


def latent_psnr(out, ref) -> float:
    """PSNR of ``out`` against ``ref`` (tensors of one shape), peak = the range of ``ref``; ``MAX_DB`` when equal."""
    import torch

    mse = torch.mean((out.detach().double().cpu() - ref.detach().double().cpu()) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    if not math.isfinite(mse):
        return -MAX_DB
    if mse <= 0 or peak <= 0:
        return MAX_DB if mse <= 0 else -MAX_DB
    return float(min(MAX_DB, 10 * math.log10(peak * peak / mse)))


def runs_of(meta: dict) -> int:
    """How many calibration runs the file's checks came from."""
    checks = meta.get("forecaster_checks") if meta else None
    return int(checks.get("runs", 0)) if isinstance(checks, dict) else 0


def with_check(checks: dict | None, results: dict, keys: dict | None = None) -> dict:
    """``checks`` (the metadata entry, or None) with one more run's ``results`` {K: {label: dB}} and the
    key sets it sampled ``keys`` {K: {label: keys}} (they replace the earlier ones; for reading only)."""
    old = checks if isinstance(checks, dict) else {}
    ks = {k: {name: list(v) for name, v in row.items()} for k, row in (old.get("ks") or {}).items()}
    for k, row in results.items():
        for name, db in row.items():
            ks.setdefault(str(int(k)), {}).setdefault(name, []).append(round(float(db), 3))
    planned = {k: dict(row) for k, row in (old.get("keys") or {}).items()}
    for k, row in (keys or {}).items():
        planned.setdefault(str(int(k)), {}).update({name: [int(x) for x in v] for name, v in row.items()})
    return {"runs": int(old.get("runs", 0)) + 1, "ks": ks, "keys": planned}


def merged(entries: list) -> dict:
    """Several files' ``forecaster_checks`` as one (``python -m dpcache_core.merge``): every check
    run's results, the first file's key sets."""
    entries = [c for c in entries if isinstance(c, dict)]
    ks = {}
    for c in entries:
        for k, row in (c.get("ks") or {}).items():
            for label, values in row.items():
                ks.setdefault(k, {}).setdefault(label, []).extend(values)
    return {"runs": sum(int(c.get("runs", 0)) for c in entries), "ks": ks,
            "keys": (entries[0].get("keys") or {}) if entries else {}}


def checks_in_reach(meta: dict, num_keys: int) -> list[tuple[int, dict[str, float]]]:
    """Every checked K within ``CHECK_REACH`` of ``num_keys`` with {label: mean PSNR dB over the check
    runs}, the nearest first (of two as near, the larger K)."""
    checks = meta.get("forecaster_checks") if meta else None
    if not isinstance(checks, dict) or not isinstance(checks.get("ks"), dict):
        return []
    found = []
    for key, row in checks["ks"].items():
        try:
            k = int(key)
            means = {str(name): float(np.mean(v)) for name, v in row.items() if len(v)}
        except (TypeError, ValueError):
            continue
        distance = abs(math.log(max(num_keys, 1) / max(k, 1)))
        if means and distance <= math.log(CHECK_REACH):
            found.append((distance, -k, means))
    return [(-k, means) for _, k, means in sorted(found, key=lambda f: f[:2])]


def checked_ranking(meta: dict, num_keys: int) -> tuple[int, dict[str, float]] | None:
    """(the checked K nearest to ``num_keys``, {label: mean PSNR dB}) when one lies within
    ``CHECK_REACH``; None otherwise (the replay decides alone)."""
    found = checks_in_reach(meta, num_keys)
    return found[0] if found else None
