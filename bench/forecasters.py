"""Forecasters and calibration-free schedules against Spectrum, at equal full evaluations (issue 18).

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.forecasters                 # trained FLUX model, real ComfyUI
    COMFYUI_PATH=<ComfyUI> <its python> -m bench.forecasters --keys 10 13 --prompts 2   # quick look

Every method runs through ComfyUI's own sampler on the trained FLUX-architecture comparison model
of bench/comfy_bench.py (euler, 50 steps, simple, cfg 1; its helpers, prompts and weights), with
DPCache Apply doing the skipping. PSNR of the decoded image against the plain run (as
comfy_compare), mean and worst over the held-out prompts, and PSNR of the final latent (peak = the
plain latent's range). Methods, each at K full evaluations of 50:

  Spectrum            Spectrum's own key steps (``spectrum_key_steps``) and its forecaster (the spectral
                      one fitted on every key so far)
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
import functools
import math
import os
import statistics
import tempfile
import time

import torch

from bench import comfy_bench as cb
from bench import comfy_env
from bench.spectrum import build_spectral_history, spectrum_key_steps
from bench.train_comfy_flux import WEIGHTS, load_prompts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KS = (7, 9, 10, 13, 17, 20, 25)
# Spectrum's own forecaster fits all the features computed so far (the paper; the ComfyUI ports keep
# up to 128); this pack's spectral forecaster keeps the last 8 (dpcache_core.spectral).
SPECTRUM_FORECASTER = {"max_history": cb.STEPS, "centred": False}  # the paper's fit: ridge on every coefficient


def node_schedule(pact: str, k: int, order: int = 2, forecaster: str | None = None):
    """DPCache Schedule's own output for a pact entry (a file, (uniform), (prior) ...)."""
    nodes = comfy_env.boot()["nodes"]
    extra = {} if forecaster is None else {"forecaster": forecaster}
    sched = nodes["DPCacheSchedule"]().schedule(pact, k, 3, 0, cb.STEPS, taylor_order=order, **extra)["result"][0]
    return sched


def keyed(keys, order: int = 2, predictor: str = "taylor"):
    core = comfy_env.boot()["core"]
    return core.Schedule(tuple(keys), cb.STEPS, order=order, scheme="reference", source="manual",
                         first_full_steps=min(3, len(keys)), predictor=predictor)


def record_trajectories(model, prompts, calib) -> list:
    """The cache-point feature at every evaluation of full runs of ``calib`` (cond stream), one
    (T, S) tensor per prompt: Apply DPCache with every evaluation a key, CacheRun.update observed."""
    boot = comfy_env.boot()
    core = boot["core"]
    full = core.Schedule(tuple(range(cb.STEPS)), cb.STEPS, first_full_steps=3)
    patched = boot["nodes"]["DPCacheApply"]().apply(model, full)["result"][0]
    seen, original = [], core.runtime.CacheRun.update

    def update(self, stream, feature):
        seen.append(feature.detach().reshape(-1).float().clone())
        return original(self, stream, feature)

    out = []
    core.runtime.CacheRun.update = update
    try:
        for c, s in calib:
            seen.clear()
            cb.sample(patched, prompts, c, s)
            out.append(torch.stack(seen))
    finally:
        core.runtime.CacheRun.update = original
    return out


def spectral_plan(history, k: int):
    """DP on the spectral history cost (the last ``memory`` gaps), spectral forecaster."""
    core = comfy_env.boot()["core"]
    keys = core.schedule.solve_schedule_history(history, k, 3, 0, scheme="exact")
    return keyed(keys, predictor="spectral")


def methods_for(k: int, pacts: dict, which: set, spectral_costs: dict | None = None) -> dict:
    comfy_env.boot()
    spectrum = spectrum_key_steps(cb.STEPS, k)
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
    add("(uniform) o1", lambda: node_schedule("(uniform)", k, 1, "taylor"))
    add("(uniform) o2", lambda: node_schedule("(uniform)", k, 2, "taylor"))
    add("(uniform) spectral", lambda: node_schedule("(uniform)", k, 2, "spectral"))
    add("calibrated o1", lambda: node_schedule(pacts[1], k, forecaster="taylor"))
    add("calibrated o2", lambda: node_schedule(pacts[2], k, forecaster="taylor"))
    add("calibrated o1 keys + spectral", lambda: node_schedule(pacts[1], k, forecaster="spectral"))
    add("calibrated o2 keys + spectral", lambda: node_schedule(pacts[2], k, forecaster="spectral"))
    for memory, history in (spectral_costs or {}).items():
        add(f"calibrated sp m{memory}", lambda history=history: spectral_plan(history, k))
    for name in PRIOR_ENTRIES:
        add(f"{name} auto = the default", lambda name=name: node_schedule(name, k))
        add(f"{name} spectral", lambda name=name: node_schedule(name, k, forecaster="spectral"))
        add(f"{name} o2", lambda name=name: node_schedule(name, k, 2, forecaster="taylor"))
        add(f"{name} o1", lambda name=name: node_schedule(name, k, 1, forecaster="taylor"))
    return out


PRIOR_ENTRIES: tuple = ()


def latent_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((out.double() - ref.double()) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def run(args) -> tuple[list[dict], list]:
    boot = comfy_env.boot(cpu=True, extra_nodes=(cb.flux_detect_fix_dir(),))
    global PRIOR_ENTRIES
    PRIOR_ENTRIES = tuple(p for p in boot["nodes"]["DPCacheSchedule"].INPUT_TYPES()["required"]["pact"][0]
                          if p.startswith("(prior"))
    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.weights)
    model = cb.load_model(args.weights)
    held_out = cb.prompt_list(args.prompts, 9000, offset=0)
    calib = cb.prompt_list(args.calib, 1000, offset=2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        pacts = {o: cb.calibrate(model, prompts, calib, o, folder) for o in (1, 2)}
        spectral_costs = {}
        if not args.only or any(w.startswith("calibrated sp") for w in args.only):
            trajectories = record_trajectories(model, prompts, calib)
            for memory in args.memory:
                t0 = time.perf_counter()
                spectral_costs[memory] = sum(build_spectral_history(t, memory)
                                             for t in trajectories) / len(trajectories)
                print(f"spectral history cost m={memory}: {time.perf_counter() - t0:.0f} s", flush=True)
        plain = [cb.sample(model, prompts, c, s) for c, s in held_out]
        ref_img = cb.decode(model, torch.cat(plain), prompts)
        apply = boot["nodes"]["DPCacheApply"]()
        for k in args.keys:
            t0 = time.perf_counter()
            for name, sched in methods_for(k, pacts, set(args.only), spectral_costs).items():
                patched = apply.apply(model, sched)["result"][0]
                own = boot["core"].runtime.SpectralPredictor
                if name == "Spectrum":  # built when sampling starts: swap the class for this method only
                    boot["core"].runtime.SpectralPredictor = functools.partial(own, **SPECTRUM_FORECASTER)
                img_db, lat_db, calls = [], [], []
                for i, (c, s) in enumerate(held_out):
                    with cb.BlockCounter(model) as counter:
                        out = cb.sample(patched, prompts, c, s)
                    calls.append(counter.calls)
                    img_db.append(cb.psnr(cb.decode(model, out, prompts)[0], ref_img[i]))
                    lat_db.append(latent_psnr(out, plain[i]))
                boot["core"].runtime.SpectralPredictor = own
                full = statistics.fmean(calls) / (len(counter.blocks))
                rows.append(dict(k=k, method=name, keys=list(sched.key_steps), full=full,
                                 psnr=statistics.fmean(img_db), worst=min(img_db), latent=statistics.fmean(lat_db)))
                print(f"K={k:2d} {name:32s} full {full:5.1f}  PSNR {rows[-1]['psnr']:6.2f} dB (worst "
                      f"{rows[-1]['worst']:6.2f}, latent {rows[-1]['latent']:6.2f})  keys {rows[-1]['keys']}", flush=True)
            print(f"K={k}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, held_out


def paid_cost(core, trajectory, keys) -> float:
    """What a run with the spectral forecaster pays on a recorded trajectory (its true features at
    the keys): sum of mean|pred - F_t| / 2 over the skipped t, plus the sentinel term at T."""
    from dpcache_core.pact import sentinel_target
    num_evals = trajectory.shape[0]
    predictor = core.SpectralPredictor()  # the pack's forecaster: its default ring
    total = 0.0
    for t in range(num_evals):
        if t in keys:
            predictor.update(t / num_evals, trajectory[t])
        else:
            total += float((predictor.predict(t / num_evals) - trajectory[t]).abs().mean()) / 2
    target = sentinel_target(trajectory, 1, "reference")
    return total + float((predictor.predict(1.0) - target).abs().mean()) / 2


def check_costs(args) -> str:
    """How well planning costs predict what the spectral forecaster pays (teacher-forced on the
    calibration trajectories): Spearman rank correlation over random key sets, per K."""
    import numpy as np
    boot = comfy_env.boot(cpu=True, extra_nodes=(cb.flux_detect_fix_dir(),))
    core = boot["core"]
    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.weights)
    model = cb.load_model(args.weights)
    trajectories = record_trajectories(model, prompts, cb.prompt_list(args.calib, 1000, offset=2))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    o1 = mean([core.build_pact(list(t), order=1) for t in trajectories])
    sp = {m: mean([build_spectral_history(t, m) for t in trajectories]) for m in args.memory}
    prior = core.prior_cost(cb.STEPS)
    rng = np.random.default_rng(0)
    cap = core.default_max_gap(cb.STEPS)
    lines = ["| K | key sets | o1 skip-only PACT | (prior) | " + " | ".join(f"spectral history m={m}" for m in sp)
             + " | paid / o1 cost (median) |", "|---|---|---|---|" + "---|" * len(sp) + "---|"]

    def spearman(a, b):
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])
    for k in args.keys:
        sets = []
        while len(sets) < args.key_sets:
            keys = sorted({0, 1, 2} | set(rng.choice(np.arange(3, cb.STEPS), k - 3, replace=False).tolist()))
            if all(b - a <= cap for a, b in zip(keys, keys[1:] + [cb.STEPS])):
                sets.append(keys)
        paid = [mean([paid_cost(core, t, set(keys)) for t in trajectories]) for keys in sets]
        cols = [spearman([core.path_cost(o1, keys, "skip") for keys in sets], paid),
                spearman([core.path_cost(prior, keys, "skip") for keys in sets], paid)]
        planned = {m: [core.path_cost_history(h, keys, 1, "exact") for keys in sets] for m, h in sp.items()}
        cols += [spearman(planned[m], paid) for m in sp]
        ratio = np.median(np.array(paid) / np.array([core.path_cost(o1, keys, "skip") for keys in sets]))
        lines.append(f"| {k} | {len(sets)} | " + " | ".join(f"{c:.2f}" for c in cols) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def run_toy(args) -> tuple[list[dict], list]:
    """The same comparison on the built-in toy model (dpcache_demo, no ComfyUI; bench/common.py's
    prompts): calibrated DP on an order-1 PACT (skip-only costs), no history-exact order 2."""
    import dataclasses

    import dpcache_core as core
    from dpcache_demo import toy_model
    from dpcache_demo.demo import accelerated_sample

    from . import common
    common.setup(args.threads)
    model = toy_model.load_builtin_model()
    held_out = common.held_out_prompts(args.prompts)
    _, samples = common.full_runs(model, common.calibration_prompts(args.calib), cb.STEPS, orders=(1,))
    pact = common.mean_pact(samples[1])
    noise, cond = common.batch_inputs(model, held_out)
    reference = toy_model.sample(model, noise, cond, cb.STEPS, common.SHIFT)
    prior = core.prior_cost(cb.STEPS)
    rows = []
    for k in args.keys:
        def sched(keys, order=2, predictor="taylor"):
            return core.Schedule(tuple(keys), cb.STEPS, order=order, predictor=predictor, first_full_steps=3)
        cal = core.solve_schedule(pact, k, 3, convention="skip")
        pri = core.solve_schedule(prior, k, 3, convention="skip")
        auto = "spectral" if cb.STEPS / k >= 2.9 else "taylor"
        methods = {
            "Spectrum": sched(spectrum_key_steps(cb.STEPS, k), predictor="spectral"),
            "(uniform) o2": sched(core.uniform_key_steps(cb.STEPS, k, 3)),
            "calibrated o1": sched(cal, 1),
            "calibrated o1 keys + spectral": sched(cal, predictor="spectral"),
            "(prior) auto = the default": sched(pri, 1, auto),
            "(prior) spectral": sched(pri, predictor="spectral"),
            "(prior) o1": sched(pri, 1),
            "(prior) o2": sched(pri, 2),
        }
        for name, schedule in methods.items():
            own = core.runtime.SpectralPredictor
            if name == "Spectrum":
                core.runtime.SpectralPredictor = functools.partial(own, **SPECTRUM_FORECASTER)
            try:
                out, _ = accelerated_sample(model, noise, cond, dataclasses.replace(schedule), common.SHIFT)
            finally:
                core.runtime.SpectralPredictor = own
            db = common.psnr(out, reference)
            rows.append(dict(k=k, method=name, keys=list(schedule.key_steps), full=float(k), psnr=float(db.mean()),
                             worst=float(db.min()), latent=float(db.mean())))
            print(f"K={k:2d} {name:32s} PSNR {rows[-1]['psnr']:6.2f} dB (worst {rows[-1]['worst']:6.2f})", flush=True)
    return rows, held_out


def report(rows, held_out, args) -> str:
    ks = sorted({r["k"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["k"]): r for r in rows}

    def fmt(r):
        return "" if r is None else f"{r['psnr']:.1f} ({r['worst']:.1f})"
    if args.toy:
        intro = (f"Built-in toy model (dpcache_demo, trained), {cb.STEPS} Euler evaluations, shift 3, {len(held_out)} "
                 f"held-out (class, seed) pairs, order-1 PACT from {args.calib} calibration prompts. Mean (worst) PSNR in "
                 "dB of the output against the full run, at K full evaluations of 50:")
    else:
        intro = (f"Trained FLUX-architecture model of bench/comfy_bench.py in real ComfyUI 0.3.64 (euler, {cb.STEPS} "
                 f"steps, simple, cfg 1), {len(held_out)} held-out prompts, PACTs from DPCache Calibrate on {args.calib} "
                 "other prompts. Mean (worst) PSNR in dB of the decoded image against the plain run, at K full "
                 "evaluations of 50:")
    lines = [
        intro,
        "",
        "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(cell.get((n, k))) for k in ks) + " |")
    if args.toy:
        return "\n".join(lines)
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
    ap.add_argument("--memory", type=int, nargs="*", default=[2], help="spectral history costs: gaps remembered")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "forecasters.md"))
    ap.add_argument("--toy", action="store_true", help="the built-in toy model instead (no ComfyUI; quick)")
    ap.add_argument("--check-costs", action="store_true",
                    help="only compare planning costs with what the spectral forecaster pays (rank correlation)")
    ap.add_argument("--key-sets", type=int, default=60, help="random key sets per K for --check-costs")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.check_costs:
        text = check_costs(args)
        print(text + f"\n\nWall time: {time.perf_counter() - t0:.0f} s")
        return
    rows, held_out = run_toy(args) if args.toy else run(args)
    text = report(rows, held_out, args) + f"\n\nWall time: {time.perf_counter() - t0:.0f} s, machine: {cb.machine_name()}."
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
