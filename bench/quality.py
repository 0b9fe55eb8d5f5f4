"""Quality at equal budget on the trained built-in model (T = 50 Euler evaluations).

    python -m bench.quality          # ~3-6 min on 2 CPU cores

For K in {7, 9, 10, 13} key (fully computed) evaluations, compares with the full 50-evaluation run
over 16 held-out (class, seed) pairs never used for calibration:
(a) DP: the exact DP schedule (``solve_schedule``) on a PACT calibrated from 10 prompts;
(b) ref DP: the reference implementation's approximate DP (``solve_schedule_reference``), same PACT;
(c) uniform: evenly spaced key steps (``uniform_key_steps``), same Taylor predictor (TaylorSeer-style);
(d) threshold: TeaCache/EasyCache-style online threshold on the first block's modulated input,
    tuned on the calibration prompts to K full evaluations on average, with the same Taylor
    predictor ("threshold+Taylor") and with TeaCache's residual reuse ("threshold+residual");
(e) fewer steps: plain Euler sampling with K steps.
Also: the calibration-size curve (1, 2, 5, 10 prompts) and Taylor order 1 vs 2.
Writes bench/results/quality*.md and PNG plots; every table is printed too.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench.reference_dp import solve_schedule_reference
from dpcache_core import path_cost, solve_schedule, uniform_key_steps
from dpcache_demo import toy_model

from .baselines import indicator_distances, threshold_sample, tune_threshold
from .common import (RESULTS, SHIFT, batch_inputs, cached_sample, calibration_prompts, full_runs,
                     held_out_prompts, machine, md_table, mean_pact, psnr, pyplot, rel_l1, setup,
                     write_result)
from dpcache_core.picture import render_image_rows, write_png

T = 50
FIRST_FULL = 3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[7, 9, 10, 13])
    ap.add_argument("--calibration", type=int, nargs="+", default=[1, 2, 5, 10],
                    help="calibration-set sizes; the largest is used for the main table")
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    a = ap.parse_args(argv)
    setup(a.threads)
    t_start = time.time()
    model = toy_model.load_builtin_model()
    calib = calibration_prompts(max(a.calibration))
    test = held_out_prompts(a.held_out)
    assert not set(calib) & set(test)

    print(f"calibrating on {len(calib)} prompts (full runs, PACT orders 1 and 2)...", flush=True)
    _, samples = full_runs(model, calib, T, orders=(1, 2))
    distances = [indicator_distances(model, toy_model.make_noise(model.config, s), c, T) for c, s in calib]
    noise, cond = batch_inputs(model, test)
    reference = toy_model.sample(model, noise, cond, T, SHIFT)

    def score(out):
        p, l = psnr(out, reference), rel_l1(out, reference)
        return dict(psnr=float(p.mean()), psnr_min=float(p.min()), l1=float(l.mean()))

    pact = {o: mean_pact(samples[o]) for o in (1, 2)}
    keys_used, results, images = {}, {}, {}
    for k in a.keys:
        print(f"K = {k}...", flush=True)
        res = {}
        sched = {"DP (exact)": solve_schedule(pact[2], k, FIRST_FULL),
                 "ref DP (approx.)": solve_schedule_reference(pact[2], k, FIRST_FULL),
                 "uniform + Taylor": uniform_key_steps(T, k, FIRST_FULL)}
        for name, keys in sched.items():
            out, run = cached_sample(model, noise, cond, keys, T)
            res[name] = dict(score(out), full=float(run.computed), cost=path_cost(pact[2], keys))
            images[(k, name)] = out
            keys_used[(k, name)] = keys
        thr = tune_threshold(distances, k, FIRST_FULL)
        for pred in ("taylor", "residual"):
            outs, fulls = zip(*[threshold_sample(model, noise[i:i + 1], cond[i:i + 1], T, thr, pred)
                                for i in range(len(test))])
            name = f"threshold + {'Taylor' if pred == 'taylor' else 'residual (TeaCache)'}"
            out = torch.cat(outs)
            res[name] = dict(score(out), full=float(np.mean(fulls)), cost=None)
            images[(k, name)] = out
        out = toy_model.sample(model, noise, cond, k, SHIFT)
        res["fewer steps (K-step Euler)"] = dict(score(out), full=float(k), cost=None)
        images[(k, "fewer steps (K-step Euler)")] = out
        # calibration-size curve and Taylor order
        for n in a.calibration:
            keys = solve_schedule(mean_pact(samples[2][:n]), k, FIRST_FULL)
            out, _ = cached_sample(model, noise, cond, keys, T)
            res[f"calib {n}"] = dict(score(out), keys=keys)
        for order in (1, 2):
            for kind, keys in (("DP", solve_schedule(pact[order], k, FIRST_FULL)),
                               ("uniform", uniform_key_steps(T, k, FIRST_FULL))):
                out, _ = cached_sample(model, noise, cond, keys, T, order=order)
                res[f"{kind} order {order}"] = dict(score(out), keys=keys)
            out = torch.cat([threshold_sample(model, noise[i:i + 1], cond[i:i + 1], T, thr, "taylor", order)[0]
                             for i in range(len(test))])
            res[f"threshold order {order}"] = dict(score(out))
        results[k] = res

    methods = [m for m in results[a.keys[0]] if not m.startswith(("calib ", "DP order", "uniform order", "threshold order"))]
    ks = a.keys
    header = ["method"] + [f"K={k} ({T / k:.2f}x)" for k in ks]
    rows = [[m] + [f"{results[k][m]['psnr']:.2f} dB / {results[k][m]['l1']:.4f}" for k in ks] for m in methods]
    worst = [[m] + [f"{results[k][m]['psnr_min']:.2f}" for k in ks] for m in methods]
    fulls = [[m] + [f"{results[k][m]['full']:.2f}" for k in ks] for m in methods]
    costs = [[m] + [f"{results[k][m]['cost']:.4f}" for k in ks] for m in methods if results[ks[0]][m]["cost"] is not None]
    best = []
    for k in ks:
        ranked = sorted(methods, key=lambda m: -results[k][m]["psnr"])
        best.append(f"K={k}: best {ranked[0]} ({results[k][ranked[0]]['psnr']:.2f} dB), "
                    f"DP exact rank {ranked.index('DP (exact)') + 1} of {len(ranked)}")
    sched_rows = [[f"K={k}", m, str(keys_used[(k, m)])] for k in ks for m in methods if (k, m) in keys_used]
    text = "\n\n".join([
        f"Model: built-in FLUX-like toy DiT (trained), T={T} Euler evaluations, shift {SHIFT}, "
        f"first_full_steps={FIRST_FULL}, Taylor order 2 (reference scheme); PACT from {len(calib)} "
        f"calibration prompts; {len(test)} held-out (class, seed) pairs. Machine: {machine()}.",
        "**Mean PSNR (dB, higher is better) / mean relative L1 (lower is better) of the final output "
        "against the full 50-evaluation run:**\n\n" + md_table(header, rows),
        "**Worst-case PSNR (dB) over the held-out pairs:**\n\n" + md_table(header, worst),
        "**Full evaluations actually made (mean per run):**\n\n" + md_table(header, fulls),
        "**Path cost of each schedule on the PACT (the DP objective, lower is better):**\n\n"
        + md_table(header, costs),
        "\n".join(f"- {b}" for b in best),
        "**Key steps:**\n\n" + md_table(["K", "method", "key steps"], sched_rows),
    ])
    write_result("quality", text)

    sizes = a.calibration
    cal_rows = [[f"{n} prompt{'s' if n > 1 else ''}"] + [f"{results[k][f'calib {n}']['psnr']:.2f}" for k in ks]
                for n in sizes]
    cal_rows.append(["uniform (no calibration)"] + [f"{results[k]['uniform + Taylor']['psnr']:.2f}" for k in ks])
    ord_rows = [[f"{kind}, order {o}"] + [f"{results[k][f'{kind} order {o}']['psnr']:.2f} dB / "
                                          f"{results[k][f'{kind} order {o}']['l1']:.4f}" for k in ks]
                for kind in ("DP", "uniform", "threshold") for o in (1, 2)]
    text2 = "\n\n".join([
        "**Calibration-set size: mean PSNR (dB) of the exact-DP schedule vs number of calibration "
        "prompts:**\n\n" + md_table(["calibration"] + header[1:], cal_rows),
        "**Taylor order (PACT, predictor and schedule of the same order; threshold: the same tuned "
        "threshold with a Taylor predictor of that order): mean PSNR (dB) / relative L1:**\n\n"
        + md_table(["schedule, order"] + header[1:], ord_rows),
    ])
    write_result("quality_calibration_order", text2)

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        ax[0].plot(ks, [results[k][m]["psnr"] for k in ks], marker="o", label=m)
    ax[0].set(xlabel="K (full evaluations of T=50)", ylabel="PSNR vs full run (dB)",
              title="Quality at equal budget (16 held-out prompts)")
    ax[0].legend(fontsize=7)
    ax[0].grid(alpha=0.3)
    for k in ks:
        ax[1].plot(sizes, [results[k][f"calib {n}"]["psnr"] for n in sizes], marker="o", label=f"K={k}")
    ax[1].set(xscale="log", xlabel="calibration prompts", ylabel="PSNR vs full run (dB)",
              title="Exact DP: calibration-set size")
    ax[1].set_xticks(sizes, [str(n) for n in sizes])
    ax[1].legend(fontsize=8)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    plot = os.path.join(RESULTS, "quality.png")
    fig.savefig(plot, dpi=100)
    # sample grid at the smallest K: one row per method, first 8 held-out prompts
    k0 = min(ks)
    rows = [("full run", list(toy_model.to_uint8(reference[:8])))]
    rows += [(m, list(toy_model.to_uint8(images[(k0, m)][:8]))) for m in methods]
    write_png(os.path.join(RESULTS, f"quality_samples_K{k0}.png"), render_image_rows(rows, scale=3))
    print(f"wrote {os.path.relpath(plot)} and quality_samples_K{k0}.png (rows: full run, then {', '.join(methods)}); "
          f"{time.time() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
