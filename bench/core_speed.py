"""Cost of the planning itself: DP solve time, PACT build time and peak memory.

    python -m bench.core_speed       # ~6 min on 2 CPU cores (most of it the 1e6-element PACT)

DP: ``solve_schedule`` (exact) and ``solve_schedule_reference`` on PACTs calibrated from one
full run of the trained built-in model at T = 50 and T = 100 (median of several solves).
PACT: ``build_pact(order=2)`` for T = 50 on synthetic smooth trajectories with 1e5 and 1e6
elements per feature (FLUX-dev at 1024x1024 has 1.26e7), each size in a fresh subprocess: median
build time over a few runs, and the peak resident memory above what the features themselves take.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.reference_dp import solve_schedule_reference
from dpcache_core import build_pact, solve_schedule
from dpcache_demo import toy_model

from .common import calibration_prompts, full_runs, machine, md_table, setup, write_result


def time_call(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def pact_case(numel: int, repeats: int, num_evals: int = 50) -> dict:
    """Build time and memory for one feature size (run in a fresh process by ``main``)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(numel, generator=g) for _ in range(3))
    feats = [a + b * (t / num_evals) + c * (t / num_evals) ** 2 for t in range(num_evals)]
    before = rss_peak_bytes()
    t0 = time.perf_counter()
    build_pact(feats, order=2)
    first = time.perf_counter() - t0
    peak = rss_peak_bytes() - before
    rest = [time_call(lambda: build_pact(feats, order=2), 1) for _ in range(repeats - 1)]
    return dict(numel=numel, seconds=statistics.median([first] + rest), runs=repeats,
                peak_extra_bytes=peak, features_bytes=num_evals * numel * 4)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp-repeats", type=int, default=7)
    ap.add_argument("--pact-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--pact-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: one PACT size, JSON out
    a = ap.parse_args(argv)
    setup(a.threads)
    if a.case:
        print(json.dumps(pact_case(a.case, a.pact_repeats)))
        return
    model = toy_model.load_builtin_model()
    dp_rows = []
    for num_evals, k in ((50, 13), (100, 25)):
        _, samples = full_runs(model, calibration_prompts(1), num_evals)
        cost = samples[2][0]
        solve_schedule(cost, k)                                       # warm-up
        exact = time_call(lambda: solve_schedule(cost, k), a.dp_repeats)
        ref = time_call(lambda: solve_schedule_reference(cost, k), a.dp_repeats)
        goal = "< 50 ms" if num_evals == 50 else "< 2 s"
        dp_rows.append([f"T={num_evals}, K={k}", f"{exact * 1000:.1f} ms", f"{ref * 1000:.1f} ms", goal])
        print(dp_rows[-1], flush=True)
    pact_rows = []
    for n in a.pact_sizes:
        out = subprocess.run([sys.executable, "-m", "bench.core_speed", "--case", str(n),
                              "--pact-repeats", str(a.pact_repeats), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        pact_rows.append([f"{n:.0e}", f"{r['seconds']:.2f} s", f"{r['peak_extra_bytes'] / 2**20:.0f} MiB",
                          f"{r['features_bytes'] / 2**20:.0f} MiB", str(r["runs"])])
        print(pact_rows[-1], flush=True)
    text = "\n\n".join([
        f"Machine: {machine()}.",
        "**DP solve time** (median of "
        f"{a.dp_repeats} solves, PACT from one full run of the built-in model, first_full_steps=3, "
        "reference hop cap 0.3 T):\n\n" + md_table(["problem", "exact DP (`solve_schedule`)",
                                                    "reference DP (`solve_schedule_reference`)", "goal"], dp_rows),
        "**PACT build** (`build_pact`, T=50, order 2, one trajectory; median over runs; peak memory "
        "= rise of the process's peak resident set during the first build, on top of the "
        "features):\n\n" + md_table(["feature elements", "build time", "peak extra memory",
                                     "the 50 features themselves", "runs"], pact_rows),
    ])
    write_result("core_speed", text)


if __name__ == "__main__":
    main()
