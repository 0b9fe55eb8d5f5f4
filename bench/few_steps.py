"""Few steps: DPCache with K key evaluations against simply sampling K steps, inside a real ComfyUI.

    COMFYUI_PATH=<ComfyUI 0.3.64> <its python> -m bench.few_steps            # T = 8 and 12, 8 held-out prompts
    ... -m bench.few_steps --steps 8 --prompts 2 --ks 4 6 --out-dir out/few_smoke   # smoke run

When T is small (distilled or few-step sampling), skipping blocks competes with the plainest speed-up of
all: sample fewer steps. For each T this runs the trained FLUX-architecture bench model (bench/comfy_bench.py:
euler, scheduler simple, cfg 1) on held-out prompts and compares, at each K < T, against the plain T-step run
(PSNR of the decoded image, mean and worst over the prompts):

- fewer steps: the same sampler and scheduler with K steps (K full evaluations, nothing else);
- DPCache calibrated: DPCache Calibrate at T on other prompts, then DPCache Schedule's plan at K with its
  default forecaster, first_full_steps 3 (the node's default) and 1 (the plan chooses every key);
- DPCache (prior): the calibration-free default entry;
- the automatic mode: Apply DPCache alone at target_speedup T/K (its first run, on another prompt, calibrates;
  the K it plans is the one reported, it keeps a minimum of its own).

A DPCache run with K keys makes K full evaluations plus T - K skipped ones (embeddings, refiners and the final
layer still run), so it costs at least what K steps cost: caching pays only where its PSNR at K beats fewer
steps at K. No timing (on a shared CPU it measures the neighbours). Writes bench/results/few_steps.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import tempfile
import time

import torch

from bench import comfy_env
from bench.comfy_bench import (FLUX, RESULTS, BlockCounter, calibrate, decode, flux_detect_fix_dir, load_model,
                               machine_name, prompt_list, psnr, sample)
from bench.comfy_compare import node_schedule

FEWER, CAL3, CAL1, PRIOR, AUTO = ("fewer steps", "DPCache calibrated (first 3)", "DPCache calibrated (first 1)",
                                  "DPCache (prior)", "DPCache automatic mode")
METHODS = (FEWER, CAL3, CAL1, PRIOR, AUTO)


class PlannedKeys(logging.Handler):
    """The key steps of the last run the pack logged (``keys [0, 1, 2, 4, 6]``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.keys = None

    def emit(self, record):
        found = re.search(r"keys (\[[0-9, ]*\])", record.getMessage())
        if found:
            self.keys = found.group(1)


def auto_patch(model, steps: int, k: int):
    """Apply DPCache in the automatic mode at target speed-up T/K."""
    nodes = comfy_env.boot()["nodes"]
    (patched,) = nodes["DPCacheApply"]().apply(model, target_speedup=max(1.0, steps / k))
    return patched


def run_steps(model, prompts, steps: int, ks, held_out, calib, folder: str) -> list[dict]:
    """Rows (method, K asked, full evaluations made, PSNR per prompt, key steps) at T = ``steps``."""
    bench = FLUX
    apply = comfy_env.boot()["nodes"]["DPCacheApply"]()

    def images(patched, n_steps):
        latents, fulls = [], []
        for cls, seed in held_out:
            with BlockCounter(model) as counter:
                latents.append(sample(patched, prompts, cls, seed, n_steps, bench))
            fulls.append(counter.calls / len(counter.blocks))
        return decode(model, torch.cat(latents), prompts, bench), statistics.fmean(fulls)

    logged = PlannedKeys()
    logging.getLogger("dpcache").addHandler(logged)
    logging.getLogger("dpcache").setLevel(logging.INFO)
    ref, _ = images(model, steps)
    pact = calibrate(model, prompts, calib, 2, folder, steps, bench)
    auto_model = auto_patch(model, steps, 1)
    cls, seed = calib[0]
    sample(auto_model, prompts, cls, seed, steps, bench)  # the automatic mode's run 1 at this setting: calibrates
    rows = [dict(method="plain", k=steps, full=float(steps), psnr=[float("inf")] * len(held_out), keys=None)]
    for k in ks:
        plans = {FEWER: None, CAL3: lambda: node_schedule(pact, k, steps, first_full_steps=3),
                 CAL1: lambda: node_schedule(pact, k, steps, first_full_steps=1),
                 PRIOR: lambda: node_schedule("(prior: no calibration)", k, steps), AUTO: None}
        for method in METHODS:
            logged.keys = None
            if method == FEWER:
                img, full = images(model, k)
            elif method == AUTO:
                img, full = images(auto_patch(model, steps, k), steps)
            else:
                try:
                    sched = plans[method]()
                except ValueError as exc:
                    print(f"T={steps} K={k} {method}: no plan ({exc})", flush=True)
                    rows.append(dict(method=method, k=k, full=None, psnr=None, keys=None))
                    continue
                img, full = images(apply.apply(model, sched)["result"][0], steps)
            ps = [psnr(img[i], ref[i]) for i in range(len(held_out))]
            keys = None if method == FEWER else logged.keys
            rows.append(dict(method=method, k=k, full=full, psnr=ps, keys=keys))
            print(f"T={steps} K={k} {method:30s} full {full:5.2f}  PSNR {statistics.fmean(ps):6.2f} (worst {min(ps):6.2f})"
                  f"  keys {keys}", flush=True)
    logging.getLogger("dpcache").removeHandler(logged)
    return rows


def db(v) -> str:
    return "inf" if v == float("inf") else f"{v:.1f}"


def report(results: dict, args, machine: str, wall: float) -> str:
    """Markdown: per T, mean (worst) PSNR per method and K, and where DPCache stops beating fewer steps."""
    lines = [
        f"Model: {FLUX.text}. {args.prompts} held-out prompts; DPCache Calibrate on {args.calib} other prompts at each T "
        "(Taylor order 2 PACT, DPCache Schedule's default forecaster). PSNR of the decoded image against the plain "
        "T-step run, mean (worst) in dB. Every DPCache row makes K full evaluations (counted) plus T - K skipped "
        "ones; the fewer-steps row makes K evaluations and nothing else. On a large model, where the blocks are nearly "
        "all of an evaluation's work, equal K is equal cost; on a small one a skipped evaluation still costs its "
        "embeddings and final layer, so DPCache at K costs more than K steps (no timing here: this shared CPU measures "
        "its neighbours). The automatic mode's cell names the K it planned when that differs from the K asked (it keeps "
        "a minimum of its own: the first 3 evaluations and enough keys for its forecaster).", ""]
    for steps, rows in results.items():
        ks = sorted({r["k"] for r in rows if r["method"] != "plain"})
        lines += [f"### T = {steps}", "", "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        cell = {(r["method"], r["k"]): r for r in rows}
        for method in METHODS:
            cells = []
            for k in ks:
                r = cell.get((method, k))
                if r is None or r["psnr"] is None:
                    cells.append("no plan")
                    continue
                text = f"{db(statistics.fmean(r['psnr']))} ({db(min(r['psnr']))})"
                if round(r["full"]) != k:
                    text += f" [K={r['full']:.0f}]"
                cells.append(text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"At equal full evaluations K, T = {steps}: " + pays(rows, ks), ""]
        keyed = [f"K={r['k']} {r['method']}: {r['keys']}" for r in rows if r.get("keys")]
        lines += ["<details><summary>Key steps</summary>", "", "; ".join(keyed), "", "</details>", ""]
    lines += [f"Machine: {machine}. Wall time: {wall:.0f} s."]
    return "\n".join(lines)


def pays(rows, ks) -> str:
    """The K where the best DPCache row (mean PSNR) beats fewer steps, and by how much."""
    cell = {(r["method"], r["k"]): r for r in rows if r["psnr"] is not None}
    parts = []
    for k in ks:
        fewer = statistics.fmean(cell[(FEWER, k)]["psnr"])
        best = max(((statistics.fmean(cell[(m, k)]["psnr"]), m) for m in METHODS[1:]
                    if (m, k) in cell and round(cell[(m, k)]["full"]) == k), default=None)
        if best is None:
            parts.append(f"K={k}: only fewer steps ({db(fewer)} dB)")
        else:
            parts.append(f"K={k}: {'DPCache' if best[0] > fewer else 'fewer steps'} ({best[1]} {db(best[0])} dB "
                         f"vs fewer steps {db(fewer)} dB)")
    return "; ".join(parts) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 12], help="T: the plain run's steps")
    ap.add_argument("--ks", type=int, nargs="*", default=None, help="K values (default: 2 .. T-1)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    ap.add_argument("--calib", type=int, default=4, help="calibration prompts (DPCache Calibrate)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    comfy_env.boot(cpu=True, extra_nodes=(flux_detect_fix_dir(),))
    torch.set_num_threads(args.threads)
    prompts = FLUX.trainer.load_prompts(FLUX.weights)
    model = load_model(FLUX.weights, FLUX)
    held_out, calib = prompt_list(args.prompts, 9000, offset=0), prompt_list(args.calib, 1000, offset=2)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        import folder_paths
        folder_paths.add_model_folder_path("dpcache", folder, is_default=True)  # the automatic mode's files too
        for steps in args.steps:
            ks = args.ks or list(range(2, steps))
            results[steps] = run_steps(model, prompts, steps, [k for k in ks if k < steps], held_out, calib, folder)
    text = report(results, args, machine_name(), time.perf_counter() - t0)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "few_steps.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
