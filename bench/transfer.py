"""A PACT calibrated at T = 50 serving runs of T' = 20, 28, 30 evaluations (issue 10).

    python -m bench.transfer          # ~3 min on 2 CPU cores

On the trained built-in model, for each T' and two budgets (about T'/3.85 and T'/2.5 key
evaluations), PSNR of the final output against the full T'-step run, over 16 held-out (class,
seed) pairs never used for calibration, of the key steps chosen by:
(a) transfer: the T = 50 PACT transferred to T' (``dpcache_core.transfer.transfer_pact``: per-step
    error increments interpolated over key position, distance back and distance forward);
(a2) direct resample: the naive alternative, the cumulative entries C[a, i, j] interpolated over
    (key position, distance back, end position) without going through increments;
(b) calibrated at T': a PACT calibrated directly at T' on the same 10 prompts;
(c) uniform: evenly spaced keys (``uniform_key_steps``).
Taylor order 1 and order 2, planned as the pack plans them (issue 11): every PACT is read with the
skip-only convention (a transferred PACT too: ``replan.plan_run`` re-plans a run of another count that
way), except the order-2 PACT calibrated at T' itself, which the pack plans with the history-exact DP
(``solve_schedule_history``); its skip-only plan is shown beside it. Writes bench/results/transfer.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dpcache_core import PactAccumulator, solve_schedule, solve_schedule_history, transfer_pact, uniform_key_steps
from dpcache_core.pact import default_max_gap
from dpcache_core.transfer import index_positions
from dpcache_demo import toy_model

from .common import (SHIFT, batch_inputs, cached_sample, calibration_prompts, held_out_prompts, machine, md_table,
                     psnr, recorded_run, setup, write_result)

SOURCE_T = 50
FIRST_FULL = 3


def direct_resample(cost: np.ndarray, num_evals: int, order: int) -> np.ndarray:
    """(a2): C'[a, i, j] = C at the fractional source indices of (a, i, j), by trilinear
    interpolation of the cumulative entries (finite corners only)."""
    from dpcache_core.transfer import interpolate

    src = cost.shape[0]
    frac = index_positions(num_evals) * src
    # grid[i, g, j]: C[i - g, i, j]
    grid = np.full((src, src, src + 1), np.inf)
    for i in range(src):
        for g in range(0, i + 1):
            grid[i, g] = cost[i - g, i]
    cap = default_max_gap(num_evals)
    out = np.full((num_evals, num_evals + 1, num_evals + 1), np.inf)
    for i in range(order):
        out[: i + 1, i, i + 1] = 0.0
    for i in range(order, num_evals):
        for a in range(max(order - 1, i - cap), i):
            j = np.arange(i + 1, num_evals + 1)
            x = np.full(j.shape, min(max(frac[i], order), src - 1))
            g = np.full(j.shape, np.clip(frac[i] - frac[a], 1.0, src - 1))
            out[a, i, i + 1:] = interpolate(grid, x, g, frac[j])
    return out


def calibrate(model, prompts, num_steps: int):
    """Full runs of ``prompts``: ({order: mean PACT} for orders 1 and 2, the order-2 history cost tensor)."""
    accs = {1: PactAccumulator(num_steps), 2: PactAccumulator(num_steps)}
    for cls, seed in prompts:
        _, rec = recorded_run(model, cls, seed, num_steps)
        accs[1].add(rec.build_sample(order=1))
        accs[2].add(rec.build_sample(order=2), history=rec.build_history_sample(order=2))
        rec.close()
    return {o: acc.mean() for o, acc in accs.items()}, accs[2].history_mean()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[20, 28, 30])
    ap.add_argument("--calibration", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=16)
    a = ap.parse_args(argv)
    setup(threads=1)
    t0 = time.time()
    model = toy_model.load_builtin_model()
    calib = calibration_prompts(a.calibration)
    test = held_out_prompts(a.held_out)
    assert not set(calib) & set(test)
    orders = (1, 2)
    print(f"calibrating at T={SOURCE_T} on {len(calib)} prompts...", flush=True)
    source, _ = calibrate(model, calib, SOURCE_T)
    noise, cond = batch_inputs(model, test)
    results, rows_keys = {}, []
    for t in a.targets:
        print(f"T'={t}: calibrating directly and sampling...", flush=True)
        direct_pacts, direct_history = calibrate(model, calib, t)
        reference = toy_model.sample(model, noise, cond, t, SHIFT)
        budgets = sorted({int(round(t / 3.85)), int(round(t / 2.5))})
        for o in orders:
            direct = direct_pacts[o]
            plans = {"transfer from T=50": transfer_pact(source[o], t, o),
                     "direct resample from T=50": direct_resample(source[o], t, o),
                     "calibrated at T'": direct}
            for k in budgets:
                schedules = {name: solve_schedule(c, k, FIRST_FULL, convention="skip") for name, c in plans.items()}
                if o >= 2:  # what the pack plans for an order-2 PACT of this count: history-exact
                    schedules["calibrated at T' (skip-only)"] = schedules["calibrated at T'"]
                    schedules["calibrated at T'"] = solve_schedule_history(direct_history, k, FIRST_FULL)
                schedules["uniform"] = uniform_key_steps(t, k, FIRST_FULL)
                for name, keys in schedules.items():
                    out, run = cached_sample(model, noise, cond, keys, t, order=o)
                    assert run.computed == k
                    p = psnr(out, reference)
                    results[(o, t, k, name)] = (float(p.mean()), float(p.min()), keys)
                    rows_keys.append([f"order {o}", f"T'={t}, K={k}", name, str(keys)])

    text = [f"Model: built-in FLUX-like toy DiT (trained), Euler, shift {SHIFT}, first_full_steps={FIRST_FULL}, "
            f"PACTs from {len(calib)} calibration prompts planned with the skip-only convention (order 2 calibrated "
            f"at T': history-exact DP); {len(test)} held-out (class, seed) pairs; PSNR of the final output against "
            f"the full T'-step run. Machine: {machine()}."]
    for o in orders:
        names = ["transfer from T=50", "direct resample from T=50", "calibrated at T'"]
        names += ["calibrated at T' (skip-only)"] if o >= 2 else []
        names += ["uniform"]
        cols = [(t, k) for (oo, t, k, n) in results if oo == o and n == "uniform"]
        header = ["schedule"] + [f"T'={t}, K={k} ({t / k:.2f}x)" for t, k in cols]
        rows = [[n] + [f"{results[(o, t, k, n)][0]:.2f} / {results[(o, t, k, n)][1]:.2f}" for t, k in cols] for n in names]
        gap = [["transfer - calibrated at T'"] + [f"{results[(o, t, k, names[0])][0] - results[(o, t, k, names[2])][0]:+.2f}"
                                                  for t, k in cols],
               ["transfer - uniform"] + [f"{results[(o, t, k, names[0])][0] - results[(o, t, k, 'uniform')][0]:+.2f}"
                                         for t, k in cols],
               ["same keys as calibrated at T'"] + [str(results[(o, t, k, names[0])][2] == results[(o, t, k, names[2])][2])
                                                   for t, k in cols]]
        text.append(f"**Taylor order {o}: mean / worst PSNR (dB) over the held-out pairs:**\n\n" + md_table(header, rows))
        text.append(f"**Order {o}: mean-PSNR differences (dB):**\n\n" + md_table(header, gap))
    text.append("**Key steps:**\n\n" + md_table(["order", "run", "schedule", "keys"], rows_keys))
    write_result("transfer", "\n\n".join(text))
    print(f"{time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
