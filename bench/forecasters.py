"""Forecasters and calibration-free schedules against Spectrum, at equal full evaluations (issue 18).

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.forecasters                 # trained FLUX model, real ComfyUI
    COMFYUI_PATH=<ComfyUI> <its python> -m bench.forecasters --keys 10 13 --prompts 2   # quick look

Every method runs through ComfyUI's own sampler on the trained FLUX-architecture comparison model
of bench/comfy_compare.py (euler, 50 steps, simple, cfg 1; its helpers, prompts and weights), with
DPCache Apply doing the skipping. PSNR of the decoded image against the plain run (as
comfy_compare), mean and worst over the held-out prompts, and PSNR of the final latent (peak = the
plain latent's range). Methods, each at K full evaluations of 50:

  Spectrum            Spectrum's own key steps (``spectrum_key_steps``) and the spectral forecaster
  Spectrum keys o1/o2 the same keys, Taylor order 1 / 2
  (uniform) o1/o2     evenly spaced keys after 3 full steps, Taylor order 1 / 2
  calibrated o1       DP on an order-1 PACT from DPCache Calibrate (skip-only costs), Taylor 1
  calibrated o2       DP on an order-2 PACT (history-exact costs), Taylor 2
  calibrated sp       DP on the spectral cost (``--spectral-plan``), spectral forecaster
  (prior) ...         the calibration-free default of DPCache Schedule (``dpcache_core.prior``)

Results: bench/results/forecasters.md (also printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import tempfile
import time

import torch

from bench import comfy_compare as cc
from bench import comfy_env

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KS = (7, 9, 10, 13, 17, 20, 25)


def node_schedule(pact: str, k: int, order: int = 2, forecaster: str | None = None):
    """DPCache Schedule's own output for a pact entry (a file, (uniform), (prior) ...)."""
    nodes = comfy_env.boot()["nodes"]
    extra = {} if forecaster is None else {"forecaster": forecaster}
    sched = nodes["DPCacheSchedule"]().schedule(pact, k, 3, 0, cc.STEPS, taylor_order=order, **extra)["result"][0]
    return sched


def keyed(keys, order: int = 2, predictor: str = "taylor"):
    core = comfy_env.boot()["core"]
    return core.Schedule(tuple(keys), cc.STEPS, order=order, scheme="reference", source="manual",
                         first_full_steps=min(3, len(keys)), predictor=predictor)


def methods_for(k: int, pacts: dict, which: set) -> dict:
    core = comfy_env.boot()["core"]
    spectrum = core.spectrum_key_steps(cc.STEPS, k)
    out = {}

    def add(name, make):
        if not which or any(name.startswith(w) for w in which):
            try:
                out[name] = make()
            except ValueError as exc:
                print(f"K={k} {name}: {exc}", flush=True)

    add("Spectrum", lambda: keyed(spectrum, predictor="spectral"))
    add("Spectrum keys o1", lambda: keyed(spectrum, 1))
    add("Spectrum keys o2", lambda: keyed(spectrum, 2))
    add("(uniform) o1", lambda: node_schedule("(uniform)", k, 1))
    add("(uniform) o2", lambda: node_schedule("(uniform)", k, 2))
    add("calibrated o1", lambda: node_schedule(pacts[1], k))
    add("calibrated o2", lambda: node_schedule(pacts[2], k))
    add("calibrated o1 keys + spectral", lambda: dataclasses.replace(node_schedule(pacts[1], k), predictor="spectral"))
    add("calibrated o2 keys + spectral", lambda: dataclasses.replace(node_schedule(pacts[2], k), predictor="spectral"))
    for name in PRIOR_ENTRIES:
        add(name, lambda name=name: node_schedule(name, k))
    return out


PRIOR_ENTRIES: tuple = ()


def latent_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((out.double() - ref.double()) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def run(args) -> tuple[list[dict], list]:
    boot = comfy_env.boot(cpu=True, extra_nodes=(cc.flux_detect_fix_dir(),))
    global PRIOR_ENTRIES
    PRIOR_ENTRIES = tuple(p for p in boot["nodes"]["DPCacheSchedule"].INPUT_TYPES()["required"]["pact"][0]
                          if p.startswith("(prior"))
    torch.set_num_threads(args.threads)
    prompts = cc.load_prompts(args.weights)
    model = cc.load_model(args.weights)
    held_out = cc.prompt_list(args.prompts, 9000, offset=0)
    calib = cc.prompt_list(args.calib, 1000, offset=2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        pacts = {o: cc.calibrate(model, prompts, calib, o, folder) for o in (1, 2)}
        plain = [cc.sample(model, prompts, c, s) for c, s in held_out]
        ref_img = cc.decode(model, torch.cat(plain), prompts)
        apply = boot["nodes"]["DPCacheApply"]()
        for k in args.keys:
            t0 = time.perf_counter()
            for name, sched in methods_for(k, pacts, set(args.only)).items():
                patched = apply.apply(model, sched)["result"][0]
                img_db, lat_db, calls = [], [], []
                for i, (c, s) in enumerate(held_out):
                    with cc.BlockCounter(model) as counter:
                        out = cc.sample(patched, prompts, c, s)
                    calls.append(counter.calls)
                    img_db.append(cc.psnr(cc.decode(model, out, prompts)[0], ref_img[i]))
                    lat_db.append(latent_psnr(out, plain[i]))
                full = statistics.fmean(calls) / (len(counter.blocks))
                rows.append(dict(k=k, method=name, keys=list(sched.key_steps), full=full,
                                 psnr=statistics.fmean(img_db), worst=min(img_db), latent=statistics.fmean(lat_db)))
                print(f"K={k:2d} {name:32s} full {full:5.1f}  PSNR {rows[-1]['psnr']:6.2f} dB (worst "
                      f"{rows[-1]['worst']:6.2f}, latent {rows[-1]['latent']:6.2f})  keys {rows[-1]['keys']}", flush=True)
            print(f"K={k}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, held_out


def report(rows, held_out, args) -> str:
    ks = sorted({r["k"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["k"]): r for r in rows}

    def fmt(r):
        return "" if r is None else f"{r['psnr']:.1f} ({r['worst']:.1f})"
    lines = [
        f"Trained FLUX-architecture model of bench/comfy_compare.py in real ComfyUI 0.3.64 (euler, {cc.STEPS} steps, "
        f"simple, cfg 1), {len(held_out)} held-out prompts, PACTs from DPCache Calibrate on {args.calib} other prompts. "
        "Mean (worst) PSNR in dB of the decoded image against the plain run, at K full evaluations of 50:",
        "",
        "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(cell.get((n, k))) for k in ks) + " |")
    lines += ["", "Mean PSNR of the final latent (dB, peak = the plain latent's range):", "",
              "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join("" if (n, k) not in cell else f"{cell[(n, k)]['latent']:.1f}" for k in ks) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=list(KS))
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    ap.add_argument("--calib", type=int, default=4, help="calibration prompts (DPCache Calibrate)")
    ap.add_argument("--only", nargs="*", default=[], help="method name prefixes to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=cc.WEIGHTS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "forecasters.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, held_out = run(args)
    text = report(rows, held_out, args) + f"\n\nWall time: {time.perf_counter() - t0:.0f} s, machine: {cc.machine_name()}."
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
