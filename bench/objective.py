"""The planning objective (issue 11) on the trained built-in model, T = 50 Euler evaluations.

    python -m bench.objective        # 12 min on the shared 2-core machine, one torch thread

Calibrates on 10 prompts (full runs: order-1 and order-2 PACTs and the order-2 history cost
tensor), then for each K samples 16 held-out (class, seed) pairs with the key steps chosen by
(a) the exact DP on the order-1 PACT, reference convention (the pack's planning before issue 11);
(b) the same PACT, skip-only convention;
(c) the exact DP on the order-2 PACT, reference convention;
(c') the order-2 PACT, skip-only convention (for comparison only);
(d) the history-exact order-2 DP (``solve_schedule_history``);
(e) uniform key steps with Taylor order 1 and 2, and the better of the two per K,
each run with the Taylor order it was planned for. Reports mean and worst PSNR against the full
run, whether each method is monotone in K, the path cost of computing every step under each
objective, and writes bench/results/objective.md and objective.png.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dpcache_core import PactAccumulator, path_cost, solve_schedule, uniform_key_steps
from dpcache_core.schedule import path_cost_history, solve_schedule_history
from dpcache_demo import toy_model

from .common import (RESULTS, SHIFT, batch_inputs, cached_sample, calibration_prompts, held_out_prompts, machine,
                     md_table, psnr, pyplot, recorded_run, setup, write_result)

T = 50
FIRST_FULL = 3
KEYS = [7, 9, 10, 13, 17, 20, 25]
# name: (Taylor order at run time, short label for the plot)
METHODS = {
    "(a) order 1, reference DP": 1,
    "(b) order 1, skip-only DP": 1,
    "(c) order 2, reference DP": 2,
    "(c') order 2, skip-only DP": 2,
    "(d) order 2, history-exact DP": 2,
    "uniform, order 1": 1,
    "uniform, order 2": 2,
}
BEST_UNIFORM = "(e) uniform, best order"


def calibrate(model, prompts):
    """Order-1 and order-2 PACTs (the order-2 one with its history cost tensor) over ``prompts``."""
    pacts = {1: PactAccumulator(T), 2: PactAccumulator(T)}
    seconds = {"PACT order 1": 0.0, "PACT order 2": 0.0, "history order 2": 0.0}
    for cls, seed in prompts:
        _, rec = recorded_run(model, cls, seed, T)
        start = time.perf_counter()
        pact1 = rec.build_sample(order=1)
        seconds["PACT order 1"] += time.perf_counter() - start
        start = time.perf_counter()
        pact2 = rec.build_sample(order=2)
        seconds["PACT order 2"] += time.perf_counter() - start
        start = time.perf_counter()
        history2 = rec.build_history_sample(order=2)
        seconds["history order 2"] += time.perf_counter() - start
        pacts[1].add(pact1)
        pacts[2].add(pact2, history=history2)
        rec.close()
    per_sample = {k: v / len(prompts) for k, v in seconds.items()}
    return pacts[1].mean(), pacts[2].mean(), pacts[2].history_mean(), per_sample


def trajectory_elements(model) -> int:
    """Elements of one cache-point feature (what the history build reads per evaluation)."""
    seen = []
    toy_model.sample(model, toy_model.make_noise(model.config, 0), 0, 2, SHIFT,
                     on_evaluation=lambda i, feature, velocity: seen.append(feature.numel()))
    return seen[0]


def monotone(values) -> str:
    drops = [(k, b - a) for k, (a, b) in zip(KEYS[1:], zip(values, values[1:])) if b < a]
    if not drops:
        return "yes"
    return "no: " + ", ".join(f"K={k} {d:+.2f} dB" for k, d in drops)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=10, help="calibration prompts")
    ap.add_argument("--held-out", type=int, default=16, help="held-out (class, seed) pairs")
    a = ap.parse_args(argv)
    setup(threads=1)
    t_start = time.time()
    model = toy_model.load_builtin_model()
    calib, test = calibration_prompts(a.calibration), held_out_prompts(a.held_out)
    assert not set(calib) & set(test)
    print(f"calibrating on {len(calib)} prompts...", flush=True)
    pact1, pact2, history2, build_s = calibrate(model, calib)
    t_calib = time.time() - t_start
    noise, cond = batch_inputs(model, test)
    reference = toy_model.sample(model, noise, cond, T, SHIFT)

    plans = {
        "(a) order 1, reference DP": lambda k: solve_schedule(pact1, k, FIRST_FULL),
        "(b) order 1, skip-only DP": lambda k: solve_schedule(pact1, k, FIRST_FULL, convention="skip"),
        "(c) order 2, reference DP": lambda k: solve_schedule(pact2, k, FIRST_FULL),
        "(c') order 2, skip-only DP": lambda k: solve_schedule(pact2, k, FIRST_FULL, convention="skip"),
        "(d) order 2, history-exact DP": lambda k: solve_schedule_history(history2, k, FIRST_FULL),
        "uniform, order 1": lambda k: uniform_key_steps(T, k, FIRST_FULL),
        "uniform, order 2": lambda k: uniform_key_steps(T, k, FIRST_FULL),
    }
    objectives = {  # each method's own objective, to report the cost of its schedule
        "(a) order 1, reference DP": lambda keys: path_cost(pact1, keys),
        "(b) order 1, skip-only DP": lambda keys: path_cost(pact1, keys, "skip"),
        "(c) order 2, reference DP": lambda keys: path_cost(pact2, keys),
        "(c') order 2, skip-only DP": lambda keys: path_cost(pact2, keys, "skip"),
        "(d) order 2, history-exact DP": lambda keys: path_cost_history(history2, keys, FIRST_FULL),
    }
    solve_ms = {}  # DP solve time, K = 13, median of 7
    for name in ("(b) order 1, skip-only DP", "(d) order 2, history-exact DP"):
        times = []
        for _ in range(7):
            start = time.perf_counter()
            plans[name](13)
            times.append((time.perf_counter() - start) * 1000)
        solve_ms[name] = float(np.median(times))
    results, keys_used = {m: {} for m in METHODS}, {}
    for k in KEYS:
        print(f"K = {k}...", flush=True)
        for name, order in METHODS.items():
            keys = plans[name](k)
            out, _ = cached_sample(model, noise, cond, keys, T, order=order, first_full_steps=FIRST_FULL)
            p = psnr(out, reference)
            results[name][k] = dict(mean=float(p.mean()), worst=float(p.min()))
            keys_used[(k, name)] = keys
    best_order = {k: 1 if results["uniform, order 1"][k]["mean"] >= results["uniform, order 2"][k]["mean"] else 2 for k in KEYS}
    results[BEST_UNIFORM] = {k: dict(results[f"uniform, order {best_order[k]}"][k], order=best_order[k]) for k in KEYS}

    shown = [m for m in results if not m.startswith("uniform")]
    header = ["method"] + [f"K={k}" for k in KEYS] + ["monotone in K"]
    mean_rows = [[m] + [f"{results[m][k]['mean']:.2f}" for k in KEYS] + [monotone([results[m][k]["mean"] for k in KEYS])]
                 for m in shown]
    worst_rows = [[m] + [f"{results[m][k]['worst']:.2f}" for k in KEYS] + [monotone([results[m][k]["worst"] for k in KEYS])]
                  for m in shown]
    uniform_rows = [[f"uniform, order {o}"] + [f"{results[f'uniform, order {o}'][k]['mean']:.2f}" for k in KEYS] + [""]
                    for o in (1, 2)]
    best_rows = []
    for k in KEYS:
        ranked = sorted(shown, key=lambda m: -results[m][k]["mean"])
        best_rows.append(f"K={k}: best {ranked[0]} ({results[ranked[0]][k]['mean']:.2f} dB), then {ranked[1]} "
                         f"({results[ranked[1]][k]['mean']:.2f} dB); worst {ranked[-1]} ({results[ranked[-1]][k]['mean']:.2f} dB)")
    everything = list(range(T))
    all_keys = [["order 1, reference", f"{path_cost(pact1, everything):.4f}", f"{path_cost(pact1, keys_used[(25, '(a) order 1, reference DP')]):.4f}"],
                ["order 1, skip-only", f"{path_cost(pact1, everything, 'skip'):.4f}", f"{path_cost(pact1, keys_used[(25, '(b) order 1, skip-only DP')], 'skip'):.4f}"],
                ["order 2, reference", f"{path_cost(pact2, everything):.4f}", f"{path_cost(pact2, keys_used[(25, '(c) order 2, reference DP')]):.4f}"],
                ["order 2, history-exact", f"{path_cost_history(history2, everything, FIRST_FULL):.4f}",
                 f"{path_cost_history(history2, keys_used[(25, '(d) order 2, history-exact DP')], FIRST_FULL):.4f}"]]
    cost_rows = [[m] + [f"{objectives[m](keys_used[(k, m)]):.4f}" for k in KEYS] for m in objectives]
    sched_rows = [[f"K={k}", m, str(keys_used[(k, m)])] for k in KEYS for m in plans if not m.startswith("uniform, order 2")]
    text = "\n\n".join([
        f"Model: built-in FLUX-like toy DiT (trained), T={T} Euler evaluations, shift {SHIFT}, first_full_steps={FIRST_FULL}, "
        f"reference Taylor scheme; PACTs and the history tensor from {len(calib)} calibration prompts "
        f"({t_calib:.0f} s with the full runs); {len(test)} held-out (class, seed) pairs. Machine: {machine()}.",
        f"Build time per calibration sample (a trajectory of {T} x {trajectory_elements(model)} values, one thread): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in build_s.items()) + ". DP solve time at K=13 (median of 7): "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in solve_ms.items()) + ".",
        "**Mean PSNR (dB) of the final output against the full 50-evaluation run:**\n\n"
        + md_table(header, mean_rows + uniform_rows),
        "**Worst PSNR (dB) over the held-out pairs:**\n\n" + md_table(header, worst_rows),
        "(e) uses Taylor order " + ", ".join(f"{best_order[k]} at K={k}" for k in KEYS) + ".",
        "\n".join(f"- {b}" for b in best_rows),
        "**Path cost of computing every step (K = T), against the K = 25 optimum, under each objective:**\n\n"
        + md_table(["objective", "all 50 steps", "its K=25 optimum"], all_keys),
        "**Each DP schedule's cost under its own objective:**\n\n" + md_table(["method"] + [f"K={k}" for k in KEYS], cost_rows),
        "**Key steps** (uniform: the same for both orders):\n\n" + md_table(["K", "method", "key steps"], sched_rows),
    ])
    write_result("objective", text)

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    styles = {"(a)": "o--", "(b)": "o-", "(c)": "s--", "(c')": "s:", "(d)": "s-", "(e)": "^-."}
    for m in shown:
        style = styles[m.split()[0]]
        for panel, stat in ((0, "mean"), (1, "worst")):
            ax[panel].plot(KEYS, [results[m][k][stat] for k in KEYS], style, label=m, markersize=4)
    for panel, stat in ((0, "mean"), (1, "worst")):
        ax[panel].set(xlabel=f"K (full evaluations of T={T})", ylabel=f"{stat} PSNR vs full run (dB)",
                      title=f"{stat.capitalize()} PSNR, {len(test)} held-out prompts")
        ax[panel].set_xticks(KEYS)
        ax[panel].grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    plot = os.path.join(RESULTS, "objective.png")
    fig.savefig(plot, dpi=100)
    print(f"wrote {os.path.relpath(plot)}; {time.time() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
