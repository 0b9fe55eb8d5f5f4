"""DPCache against ComfyUI's own EasyCache and LazyCache, and against Spectrum, inside a real ComfyUI.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.comfy_compare            # the classic table (BENCHMARKS §7)
    ... -m bench.comfy_compare --prompts 2 --rounds 1 --quick --out-dir out/compare_smoke   # smoke run
    ... -m bench.comfy_compare --compare --model wan --steps 30 --prompts 8   # the K sweep against Spectrum

--compare runs one trained model (--model flux: euler, cfg 1; --model wan: the trained Wan2.1
of bench/train_comfy_wan.py with uni_pc, scheduler simple, ModelSamplingSD3 shift 8, cfg 5 against a
negative prompt; --model qwen / hunyuan: the Qwen-Image- and HunyuanVideo-architecture models of
bench/train_comfy_more.py; ``bench.comfy_bench.MODELS``) at --steps, and compares at equal full evaluations K (7..25 of 50, scaled to other
step counts): Spectrum (its own key steps, ``spectrum_key_steps``, and the spectral forecaster, run by
Apply DPCache as a (manual) schedule), DPCache Schedule's (uniform) and default entries, calibrated
DPCache with Taylor 1, Taylor 2 and the spectral forecaster and with the forecaster chosen by replay
(forecaster auto on the order-1 PACT), and EasyCache / LazyCache at several
thresholds; writes bench/results/comfy_compare_<model>_<steps>.md and a sample grid. The rest of this
docstring describes the classic table:

Every method runs through ComfyUI's own sampler (comfy.sample.sample: KSampler's path, euler, 50
steps, scheduler simple, cfg 1) on a small model in ComfyUI's FLUX architecture trained on coloured
shapes (bench/train_comfy_flux.py, weights in bench/weights/), loaded with the stock UNETLoader.
Stock ComfyUI 0.3.64 hard-codes FLUX.1's width when it detects a Flux file: this narrow model needs
the test harness's shape-detection fix (custom node `harness_nodes`, found in
$COMFYUI_PATH/custom_nodes or at $DPCACHE_FLUX_DETECT_FIX), which this bench loads; a real FLUX.1
never triggers it.

Methods, each on held-out prompts (class, seed) never used for calibration:
  plain; EasyCache (ComfyUI core node, several reuse_threshold, as it is and with its model input
  copied: it adds into that tensor in place); LazyCache (several thresholds); DPCache with
  (uniform) key steps and with a PACT calibrated by DPCache Calibrate on separate prompts, Taylor
  order 1 and 2, several K.
Reported per method: mean and worst PSNR and mean / worst SSIM of the decoded final image against
the plain run, the fraction of transformer-block calls skipped (counted by wrapping the blocks),
and the measured speed-up (median over prompts and rounds of t_plain / t_method, every method run
interleaved with plain in one process). Results: bench/results/comfy_compare.{md,png} and a sample
grid comfy_compare_samples.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from bench import comfy_env
from bench.comfy_bench import (MODELS, RESULTS, STEPS, BlockCounter, calibrate, count_evaluations, decode,
                               flux_detect_fix_dir, frames_side_by_side, load_model, machine_name, prompt_list, psnr,
                               sample, ssim, to_uint8)
from bench.spectrum import spectrum_key_steps
from bench.train_comfy_flux import WEIGHTS, load_prompts
from dpcache_core.picture import font, render_image_rows, text_width, write_png

SAMPLER, SCHEDULER = "euler", "simple"
THRESHOLDS = (0.05, 0.1, 0.2, 0.4)
KS = (9, 13, 20)
QUICK_THRESHOLDS, QUICK_KS = (0.2,), (13,)


# ----------------------------------------------------------------------------------- methods

@dataclasses.dataclass
class Method:
    name: str
    series: str
    patch: object  # model -> patched model
    latents: list = dataclasses.field(default_factory=list)
    seconds: list = dataclasses.field(default_factory=list)
    calls: list = dataclasses.field(default_factory=list)
    block_share: list = dataclasses.field(default_factory=list)


def copy_model_input(executor, x, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: hand the wrappers inside a copy of the model input."""
    return executor(x.clone(), *args, **kwargs)


def add_cache_diff_per_half(holder, x, uuids):
    """EasyCache's cached-output step with each batch half getting only its own cached difference
    (ComfyUI 0.3.64's ``apply_cache_diff`` adds every half's difference to the whole batch when cond
    and uncond share one batch). Bench-only, for the "(cond/uncond fix)" rows."""
    if holder.first_cond_uuid in uuids:
        holder.total_steps_skipped += 1
    rows = x.shape[0] // len(uuids)
    for i, uuid in enumerate(uuids):
        x[i * rows:(i + 1) * rows] += holder.uuid_cache_diffs[uuid].to(x.device)
    return x


def per_half_cache_diff(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: EasyCache's holder class uses ``add_cache_diff_per_half`` while this
    model samples (restored afterwards)."""
    import sys
    easy = sys.modules[comfy_env.boot()["nodes"]["EasyCache"].__module__]  # the module ComfyUI loaded
    saved = easy.EasyCacheHolder.apply_cache_diff
    easy.EasyCacheHolder.apply_cache_diff = add_cache_diff_per_half
    try:
        return executor(*args, **kwargs)
    finally:
        easy.EasyCacheHolder.apply_cache_diff = saved


def easycache(threshold: float, copy_input: bool, per_half: bool = False):
    def patch(model):
        nodes = comfy_env.boot()["nodes"]
        import comfy.patcher_extension as pe
        if copy_input or per_half:
            model = model.clone()
        if copy_input:  # registered first: the outermost wrapper, EasyCache then writes into the copy
            model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_copy_input", copy_model_input)
        if per_half:
            model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "bench_per_half", per_half_cache_diff)
        return nodes["EasyCache"].execute(model, threshold, 0.15, 0.95, False).result[0]
    return patch


def lazycache(threshold: float):
    def patch(model):
        return comfy_env.boot()["nodes"]["LazyCache"].execute(model, threshold, 0.15, 0.95, False).result[0]
    return patch


def dpcache(pact: str, k: int, order: int):
    """Apply DPCache with DPCache Schedule's plan for ``pact`` at K = ``k``, Taylor forecaster of
    ``order`` ((uniform) takes it as its taylor_order; a PACT brings its own)."""
    def patch(model):
        nodes = comfy_env.boot()["nodes"]
        sched = nodes["DPCacheSchedule"]().schedule(pact, k, 3, 0, STEPS, taylor_order=order, forecaster="taylor")["result"][0]
        return nodes["DPCacheApply"]().apply(model, sched)["result"][0]
    return patch


# ----------------------------------------------------------------------------------- report

SERIES_COLOURS = {
    "plain": (0, 0, 0), "EasyCache (as is)": (220, 40, 40), "EasyCache (input copied)": (245, 150, 20),
    "LazyCache": (150, 60, 200), "DPCache uniform o1": (120, 160, 230), "DPCache uniform o2": (40, 80, 200),
    "DPCache calibrated o1": (90, 200, 90), "DPCache calibrated o2": (20, 120, 40),
}


def pareto_png(path: str, rows: list[dict], x_key: str = "skipped") -> None:
    """PSNR (mean, dB) against the fraction of block work skipped (``x_key="skipped"``) or the
    measured speed-up (``"speedup"``), one polyline per series."""
    from PIL import Image, ImageDraw

    labels = []  # (x, y, text): drawn with Pillow once the pixels are in place

    def draw_text(_img, x, y, text, colour):
        labels.append((x, y, text, colour))

    fnt = font(11)
    w, h, left, right, top, bottom = 760, 460, 56, 230, 30, 44
    img = np.full((h, w, 3), 255, np.uint8)
    finite = [r["psnr_mean"] for r in rows if math.isfinite(r["psnr_mean"])]
    y_lo = max(0.0, math.floor(min(finite) / 5) * 5) if finite else 0.0
    y_hi = math.ceil(max(finite) / 5) * 5 + 5 if finite else 60.0
    pw, ph = w - left - right, h - top - bottom

    if x_key == "skipped":
        x_lo, x_hi, ticks = 0.0, 1.0, [k / 10 for k in range(0, 11, 2)]
        title = "PSNR vs plain (mean over held-out prompts) against block work skipped"
        label = "fraction of transformer-block calls skipped"
    else:
        x_lo, x_hi = 1.0, max(2.0, math.ceil(max(r["speedup"] for r in rows) * 2) / 2)
        ticks = list(np.arange(x_lo, x_hi + 1e-9, 0.5))
        title = "PSNR vs plain (mean over held-out prompts) against measured speed-up (this CPU)"
        label = "measured speed-up over plain (median of ratios)"

    def px(xv, db):
        db = y_hi if not math.isfinite(db) else min(max(db, y_lo), y_hi)
        return left + (xv - x_lo) / (x_hi - x_lo) * pw, top + (1 - (db - y_lo) / (y_hi - y_lo)) * ph

    img[top:top + ph + 1, left] = 0
    img[top + ph, left:left + pw + 1] = 0
    for tick in ticks:
        x = int(left + (tick - x_lo) / (x_hi - x_lo) * pw)
        img[top + ph:top + ph + 4, min(x, w - 1)] = 0
        draw_text(img, x - 8, top + ph + 7, f"{tick:.1f}", (0, 0, 0))
    step = 5 if y_hi - y_lo <= 40 else 10
    for db in range(int(y_lo), int(y_hi) + 1, step):
        _, y = px(0, db)
        img[int(y), left - 4:left] = 0
        img[int(y), left + 1:left + pw:4] = 200
        draw_text(img, 8, int(y) - 4, f"{db:3d}", (0, 0, 0))
    draw_text(img, left, 8, title, (0, 0, 0))
    draw_text(img, left + (pw - text_width(fnt, label)) // 2, h - 14, label, (0, 0, 0))
    draw_text(img, 6, top - 14, "dB", (0, 0, 0))
    for n, (series, colour) in enumerate(SERIES_COLOURS.items()):
        pts = sorted((r[x_key], r["psnr_mean"]) for r in rows if r["series"] == series)
        if not pts:
            continue
        xy = [px(s, d) for s, d in pts]
        for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
            for t in np.linspace(0, 1, int(max(abs(x1 - x0), abs(y1 - y0))) + 2):
                img[int(y0 + t * (y1 - y0)), int(x0 + t * (x1 - x0))] = colour
        for x, y in xy:
            img[max(int(y) - 3, 0):int(y) + 4, max(int(x) - 3, 0):int(x) + 4] = colour
        ly = top + 6 + 16 * n
        img[ly:ly + 8, left + pw + 16:left + pw + 24] = colour
        draw_text(img, left + pw + 30, ly, series, (0, 0, 0))
    picture = Image.fromarray(img, "RGB")
    pen = ImageDraw.Draw(picture)
    for x, y, text, colour in labels:
        pen.text((x, y - 2), text, fill=colour, font=fnt)
    write_png(path, np.asarray(picture))


# ----------------------------------------------------------------------------------- main

def build_methods(model, prompts, calib, folder, quick: bool) -> list[Method]:
    thresholds, ks = (QUICK_THRESHOLDS, QUICK_KS) if quick else (THRESHOLDS, KS)
    methods = []
    for thr in thresholds:
        methods.append(Method(f"EasyCache {thr:g} (as is)", "EasyCache (as is)", easycache(thr, False)))
        methods.append(Method(f"EasyCache {thr:g} (input copied)", "EasyCache (input copied)", easycache(thr, True)))
        methods.append(Method(f"LazyCache {thr:g}", "LazyCache", lazycache(thr)))
    for order in (1, 2):
        t0 = time.perf_counter()
        pact = calibrate(model, prompts, calib, order, folder)
        print(f"calibrated order {order} on {len(calib)} prompts in {time.perf_counter() - t0:.1f}s", flush=True)
        for k in ks:
            methods.append(Method(f"DPCache uniform K={k} o{order}", f"DPCache uniform o{order}", dpcache("(uniform)", k, order)))
            methods.append(Method(f"DPCache calibrated K={k} o{order}", f"DPCache calibrated o{order}", dpcache(pact, k, order)))
    return methods


def run(args) -> list[dict]:
    comfy_env.boot(cpu=True, extra_nodes=(flux_detect_fix_dir(),))
    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.weights)
    model = load_model(args.weights)
    held_out = prompt_list(args.prompts, 9000, offset=0)
    calib = prompt_list(args.calib, 1000, offset=2)
    with tempfile.TemporaryDirectory() as folder:
        methods = build_methods(model, prompts, calib, folder, args.quick)
        patched = {m.name: m.patch(model) for m in methods}
        plain = Method("plain", "plain", None)
        full_calls = None
        rng = random.Random(0)
        for rnd in range(args.rounds):
            t_round = time.perf_counter()
            for p, (cls, seed) in enumerate(held_out):
                order = [plain] + methods
                rng.shuffle(order)
                for m in order:
                    with BlockCounter(model) as counter:
                        t0 = time.perf_counter()
                        out = sample(patched.get(m.name, model), prompts, cls, seed)
                        dt = time.perf_counter() - t0
                    if rnd == 0:
                        m.latents.append(out)
                        m.calls.append(counter.calls)
                    m.seconds.append(dt)
                    m.block_share.append(counter.seconds / dt)
            print(f"round {rnd + 1}/{args.rounds}: {len(held_out)} prompts x {len(methods) + 1} methods in "
                  f"{time.perf_counter() - t_round:.0f}s", flush=True)
        full_calls = plain.calls[0]
        ref = decode(model, torch.cat(plain.latents), prompts)
        rows = []
        for m in [plain] + methods:
            img = decode(model, torch.cat(m.latents), prompts)
            ps = [psnr(img[i], ref[i]) for i in range(len(held_out))]
            ss = [ssim(img[i:i + 1], ref[i:i + 1]) for i in range(len(held_out))]
            ratios = [a / b for a, b in zip(plain.seconds, m.seconds)]
            rows.append(dict(name=m.name, series=m.series, psnr_mean=statistics.fmean(ps), psnr_worst=min(ps),
                             ssim_mean=statistics.fmean(ss), ssim_worst=min(ss),
                             skipped=1 - statistics.fmean(m.calls) / full_calls,
                             speedup=statistics.median(ratios), images=img))
        block_share = statistics.median(plain.block_share)
        return rows, held_out, calib, full_calls, block_share


def report(rows, held_out, calib, full_calls, block_share, args, machine: str) -> str:
    def db(v):
        return "inf" if not math.isfinite(v) else f"{v:.1f}"
    lines = [
        f"Model: ComfyUI's Flux class (hidden 128, 2 double + 3 single blocks), trained on coloured shapes "
        f"(bench/train_comfy_flux.py); latent 16x16 (128x128 px), euler {STEPS} steps, scheduler {SCHEDULER}, cfg 1. "
        f"{len(held_out)} held-out prompts, DPCache calibrated on {len(calib)} other prompts (DPCache Calibrate), "
        f"{args.rounds} timing rounds. Full run: {full_calls} block calls. PSNR/SSIM of the decoded 16x16 RGB image "
        f"against the plain run. Speed-up: median of t_plain / t_method, interleaved in one process. "
        f"The transformer blocks take {block_share:.0%} of a plain run's time here (median): the rest (ComfyUI's "
        f"sampler and model wrapper, embeddings, final layer) is not skipped by DPCache, while EasyCache and "
        f"LazyCache skip the whole model call.",
        "",
        "| method | PSNR mean (dB) | PSNR worst | SSIM mean | SSIM worst | block work skipped | measured speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {db(r['psnr_mean'])} | {db(r['psnr_worst'])} | {r['ssim_mean']:.3f} | "
                     f"{r['ssim_worst']:.3f} | {r['skipped']:.0%} | {r['speedup']:.2f}x |")
    lines += ["", f"Machine: {machine}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- against Spectrum (issue 18)

COMPARE_KS = {50: (7, 9, 10, 13, 17, 20, 25), 30: (4, 5, 6, 8, 10, 12, 15)}  # at 30: the 50-step K x 3/5
COMPARE_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)
SPECTRUM, UNIFORM_ENTRY, DEFAULT_ENTRY = "Spectrum", "(uniform)", "default (no calibration)"
CAL_O1, CAL_O2, CAL_SPECTRAL = "calibrated, Taylor 1", "calibrated, Taylor 2", "calibrated, spectral"
CAL_CHOSEN = "calibrated, data-chosen"  # DPCache Schedule's forecaster auto on the order-1 PACT: chosen by replay
# candidate defaults (issue 18), only with --methods: "(prior) last n" keeps the last n evaluations as
# keys (the pack's prior.PRIOR_LAST_FULL_STEPS set to n for that plan; 0 = the default before commit 4546844)
PRIOR_LAST0, PRIOR_LAST0_O1, PRIOR_LAST1 = "(prior) last 0", "(prior) last 0, Taylor 1", "(prior) last 1"
PRIOR_LAST1_O1, PRIOR_LAST1_O2, PRIOR_LAST2 = "(prior) last 1, Taylor 1", "(prior) last 1, Taylor 2", "(prior) last 2"
PRIOR_LAST3, PRIOR_FIRST5 = "(prior) last 3", "(prior) first 5, last 1"
SPECTRUM_O1, SPECTRUM_O2 = "Spectrum keys, Taylor 1", "Spectrum keys, Taylor 2"
CANDIDATES = (PRIOR_LAST0, PRIOR_LAST0_O1, PRIOR_LAST1, PRIOR_LAST1_O1, PRIOR_LAST1_O2, PRIOR_LAST2, PRIOR_LAST3,
              PRIOR_FIRST5, SPECTRUM_O1, SPECTRUM_O2)
SWEEP = (SPECTRUM, UNIFORM_ENTRY, DEFAULT_ENTRY, CAL_O1, CAL_O2, CAL_SPECTRAL, CAL_CHOSEN)
CALIBRATED = (CAL_O1, CAL_O2, CAL_SPECTRAL, CAL_CHOSEN)


def compare_ks(steps: int) -> tuple[int, ...]:
    """The K sweep at ``steps``: 7..25 of 50, or those scaled to another step count."""
    return COMPARE_KS.get(steps) or tuple(sorted({max(1, round(k * steps / 50)) for k in COMPARE_KS[50]}))


def schedule_defaults() -> dict:
    """DPCache Schedule's defaults as a user gets them: its first pact entry and its forecaster."""
    spec = comfy_env.boot()["nodes"]["DPCacheSchedule"].INPUT_TYPES()
    entries, options = spec["required"]["pact"]
    forecaster = spec["optional"]["forecaster"][1]["default"] if "forecaster" in spec["optional"] else "taylor"
    return {"pact": options.get("default", entries[0]), "forecaster": forecaster}


def node_schedule(pact: str, k: int, num_evals: int, last_full_steps: int = 0, first_full_steps: int = 3, **options):
    """DPCache Schedule's own plan for a pact entry at K = ``k`` (T = ``num_evals`` for the entries
    without a file); ``options``: its optional inputs (taylor_order, forecaster)."""
    nodes = comfy_env.boot()["nodes"]
    return nodes["DPCacheSchedule"]().schedule(pact, k, first_full_steps, last_full_steps, num_evals, **options)["result"][0]


def prior_schedule(last: int, k: int, num_evals: int, **options):
    """DPCache Schedule's (prior) plan at K = ``k`` keeping the last ``last`` evaluations as keys (the
    pack's ``prior.PRIOR_LAST_FULL_STEPS`` set to ``last`` while it plans; a candidate default)."""
    prior = comfy_env.boot()["core"].prior
    kept = prior.PRIOR_LAST_FULL_STEPS
    prior.PRIOR_LAST_FULL_STEPS = last
    try:
        return node_schedule("(prior: no calibration)", k, num_evals, **options)
    finally:
        prior.PRIOR_LAST_FULL_STEPS = kept


def spectrum_schedule(num_evals: int, k: int, predictor: str = "spectral", order: int = 2):
    """Spectrum as a DPCache schedule: its own key steps (``spectrum_key_steps``: warm-up, growing
    windows, tail) run by Apply DPCache with the spectral forecaster (a (manual) schedule); another
    ``predictor`` / ``order``: the same keys with that forecaster (a candidate default)."""
    core = comfy_env.boot()["core"]
    keys = spectrum_key_steps(num_evals, k)
    return core.Schedule(tuple(keys), num_evals, order=order, source="manual", first_full_steps=1, predictor=predictor)


def sweep_schedules(k: int, num_evals: int, pacts: dict, methods=SWEEP) -> dict:
    """{method: DPCache schedule} of the K sweep at K = ``k`` for the named ``methods`` (a method
    without a finite plan at this K is left out, with a printed reason)."""
    defaults = schedule_defaults()
    plans = {
        SPECTRUM: lambda: spectrum_schedule(num_evals, k),
        UNIFORM_ENTRY: lambda: node_schedule("(uniform)", k, num_evals, forecaster=defaults["forecaster"]),
        DEFAULT_ENTRY: lambda: node_schedule(defaults["pact"], k, num_evals),
        CAL_O1: lambda: node_schedule(pacts[1], k, num_evals, forecaster="taylor"),
        CAL_O2: lambda: node_schedule(pacts[2], k, num_evals, forecaster="taylor"),
        CAL_SPECTRAL: lambda: node_schedule(pacts[2], k, num_evals, forecaster="spectral"),
        CAL_CHOSEN: lambda: node_schedule(pacts[1], k, num_evals, forecaster="auto"),
        PRIOR_LAST0: lambda: prior_schedule(0, k, num_evals),
        PRIOR_LAST0_O1: lambda: prior_schedule(0, k, num_evals, forecaster="taylor", taylor_order=1),
        PRIOR_LAST1: lambda: prior_schedule(1, k, num_evals),
        PRIOR_LAST1_O1: lambda: prior_schedule(1, k, num_evals, forecaster="taylor", taylor_order=1),
        PRIOR_LAST1_O2: lambda: prior_schedule(1, k, num_evals, forecaster="taylor", taylor_order=2),
        PRIOR_LAST2: lambda: prior_schedule(2, k, num_evals),
        PRIOR_LAST3: lambda: prior_schedule(3, k, num_evals),
        PRIOR_FIRST5: lambda: prior_schedule(1, k, num_evals, first_full_steps=5),
        SPECTRUM_O1: lambda: spectrum_schedule(num_evals, k, "taylor", 1),
        SPECTRUM_O2: lambda: spectrum_schedule(num_evals, k, "taylor", 2),
    }
    out = {}
    for name in methods:
        plan = plans[name]
        try:
            out[name] = plan()
        except ValueError as exc:
            print(f"K={k} {name}: no schedule ({exc})", flush=True)
    return out


def run_compare(args) -> dict:
    """The equal-full-evaluation comparison on one model at one step count. Returns the rows and context."""
    bench = MODELS[args.model]
    extra = (flux_detect_fix_dir(),) if bench.detect_fix else ()
    comfy_env.boot(cpu=True, extra_nodes=extra)
    torch.set_num_threads(args.threads)
    weights = args.weights or bench.weights
    prompts = bench.trainer.load_prompts(weights)
    model = load_model(weights, bench)
    held_out = prompt_list(args.prompts, 9000, offset=0)
    calib = prompt_list(args.calib, 1000, offset=2)
    num_evals = count_evaluations(model, prompts, bench, args.steps)
    ks = tuple(args.ks) if args.ks else compare_ks(args.steps)
    defaults = schedule_defaults()
    print(f"{bench.name}: {args.steps} steps = {num_evals} evaluations; K sweep {ks}; defaults {defaults}", flush=True)
    apply = comfy_env.boot()["nodes"]["DPCacheApply"]()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        sweep = tuple(args.methods) if args.methods else SWEEP
        pacts = {}
        if any(name in CALIBRATED for name in sweep):
            pacts = {o: calibrate(model, prompts, calib, o, folder, args.steps, bench) for o in (1, 2)}
            print(f"calibrated orders 1 and 2 on {len(calib)} prompts in {time.perf_counter() - t0:.0f}s", flush=True)
        methods = [("plain", None, None, None)]
        for thr in args.thresholds:
            methods.append((f"EasyCache {thr:g}", "EasyCache", None, easycache(thr, True)))
            if bench.cfg != 1.0:  # cond and uncond in one batch: also EasyCache with its per-half bug fixed
                methods.append((f"EasyCache {thr:g} (cond/uncond fix)", "EasyCache", None, easycache(thr, True, True)))
            methods.append((f"LazyCache {thr:g}", "LazyCache", None, lazycache(thr)))
        for k in ks:
            for name, sched in sweep_schedules(k, num_evals, pacts, sweep).items():
                methods.append((name, name, (k, sched), lambda m, sched=sched: apply.apply(m, sched)["result"][0]))
        plain_latents, rows = [], []
        for name, series, planned, patch in methods:
            t_method = time.perf_counter()
            patched = model if patch is None else patch(model)
            latents, calls = [], []
            for cls, seed in held_out:
                with BlockCounter(model) as counter:
                    latents.append(sample(patched, prompts, cls, seed, args.steps, bench))
                calls.append(counter.calls / len(counter.blocks))
            if patch is None:
                plain_latents = latents
            img = decode(model, torch.cat(latents), prompts, bench)
            ref = decode(model, torch.cat(plain_latents), prompts, bench)
            ps = [psnr(img[i], ref[i]) for i in range(len(held_out))]
            row = dict(name=name, series=series, k=planned[0] if planned else None,
                       keys=list(planned[1].key_steps) if planned else None, full=statistics.fmean(calls),
                       psnr_mean=statistics.fmean(ps), psnr_worst=min(ps), images=img)
            rows.append(row)
            print(f"{name:28s} K={row['k']!s:4s} full {row['full']:5.1f}  PSNR {row['psnr_mean']:6.2f} "
                  f"(worst {row['psnr_worst']:6.2f})  {time.perf_counter() - t_method:5.0f}s  keys {row['keys']}",
                  flush=True)
    return dict(rows=rows, bench=bench, steps=args.steps, num_evals=num_evals, ks=ks, held_out=held_out,
                calib=calib, defaults=defaults)


def compare_report(result: dict, args, machine: str) -> str:
    """Markdown: the K sweep (mean (worst) PSNR per method and K), the threshold methods, the key steps."""
    rows, bench, ks = result["rows"], result["bench"], result["ks"]

    def db(v):
        return "inf" if not math.isfinite(v) else f"{v:.1f}"
    cell = {(r["series"], r["k"]): r for r in rows if r["k"] is not None}
    lines = [
        f"Model: {bench.text}; {result['steps']} steps = {result['num_evals']} model evaluations. "
        f"{len(result['held_out'])} held-out prompts; PACTs from DPCache Calibrate on {len(result['calib'])} other "
        f"prompts at this step count. PSNR of the decoded RGB {'clip' if bench.latent_shape[2] > 1 and len(bench.latent_shape) == 5 else 'image'} against the plain "
        f"run, mean (worst) in dB, at K full evaluations of {result['num_evals']} (the full evaluations each run made "
        f"were counted: they equal K for every DPCache and Spectrum row). DPCache Schedule's defaults: pact entry "
        f"{result['defaults']['pact']!r}, forecaster {result['defaults']['forecaster']!r}.",
        "",
        "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for series in SWEEP + CANDIDATES:
        cells = [cell.get((series, k)) for k in ks]
        if any(cells):
            lines.append(f"| {series} | " + " | ".join("no plan" if c is None else f"{db(c['psnr_mean'])} ({db(c['psnr_worst'])})"
                                                       for c in cells) + " |")
    lines += ["", "Threshold methods (ComfyUI core nodes, start 0.15, end 0.95; EasyCache with its input copied, see "
              "§7): full evaluations made (mean over prompts) and PSNR:", "",
              "| method | full evaluations | PSNR mean (dB) | PSNR worst |", "|---|---|---|---|"]
    for r in rows:
        if r["k"] is None and r["name"] != "plain":
            lines.append(f"| {r['name']} | {r['full']:.1f} | {db(r['psnr_mean'])} | {db(r['psnr_worst'])} |")
    lines += ["", "<details><summary>Key steps</summary>", "", "| K | method | key steps |", "|---|---|---|"]
    for r in rows:
        if r["k"] is not None:
            lines.append(f"| {r['k']} | {r['series']} | {r['keys']} |")
    lines += ["", "</details>", "", f"Machine: {machine}."]
    return "\n".join(lines)


def main_compare(args) -> None:
    t0 = time.perf_counter()
    result = run_compare(args)
    text = compare_report(result, args, machine_name()) + f" Wall time: {time.perf_counter() - t0:.0f} s."
    os.makedirs(args.out_dir, exist_ok=True)
    stem = f"comfy_compare_{args.model}_{args.steps}"
    with open(os.path.join(args.out_dir, stem + ".md"), "w") as f:
        f.write(text + "\n")
    shown = [r for r in result["rows"] if r["name"] == "plain" or r["k"] == min(result["ks"][2:] or result["ks"])]
    grid = [(f"{r['name']}" + (f" K={r['k']}" if r["k"] else ""),
             list(to_uint8(frames_side_by_side(r["images"][:min(6, len(result['held_out']))])))) for r in shown]
    write_png(os.path.join(args.out_dir, stem + "_samples.png"), render_image_rows(grid, scale=4))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts")
    ap.add_argument("--calib", type=int, default=4, help="calibration prompts (DPCache Calibrate)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (images are taken from the first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one threshold and one K (smoke run)")
    ap.add_argument("--weights", default=None, help="default: the trained weights of --model in bench/weights/")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--compare", action="store_true",
                    help="the equal-full-evaluation comparison with Spectrum (K sweep; writes comfy_compare_<model>_<steps>.md)")
    ap.add_argument("--model", choices=sorted(MODELS), default="flux", help="with --compare: the trained model")
    ap.add_argument("--steps", type=int, default=STEPS, help="with --compare: sampling steps")
    ap.add_argument("--ks", type=int, nargs="*", default=None, help="with --compare: K values (default: 7..25 of 50, scaled)")
    ap.add_argument("--thresholds", type=float, nargs="*", default=list(COMPARE_THRESHOLDS),
                    help="with --compare: EasyCache / LazyCache reuse thresholds")
    ap.add_argument("--methods", nargs="+", choices=SWEEP + CANDIDATES, default=None,
                    help="with --compare: only these K-sweep methods (default: " + ", ".join(SWEEP) + "); add "
                         "--thresholds with no value to leave out EasyCache and LazyCache")
    args = ap.parse_args()
    if args.compare:
        main_compare(args)
        return
    if args.model != "flux" or args.steps != STEPS:
        raise SystemExit("the classic table (without --compare) is FLUX at 50 steps only: add --compare for --model/--steps")
    args.weights = args.weights or WEIGHTS
    t0 = time.perf_counter()
    rows, held_out, calib, full_calls, block_share = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    text = report(rows, held_out, calib, full_calls, block_share, args, machine_name())
    text += f" Wall time of the whole bench: {time.perf_counter() - t0:.0f} s."
    with open(os.path.join(args.out_dir, "comfy_compare.md"), "w") as f:
        f.write(text + "\n")
    pareto_png(os.path.join(args.out_dir, "comfy_compare.png"), rows)
    pareto_png(os.path.join(args.out_dir, "comfy_compare_speed.png"), rows, x_key="speedup")
    shown = [r for r in rows if r["name"] == "plain" or r["name"].endswith(("0.2 (as is)", "0.2 (input copied)"))
             or r["name"] in ("LazyCache 0.2", "DPCache uniform K=13 o1", "DPCache calibrated K=13 o1")]
    rows_img = [(r["name"], list(to_uint8(r["images"][:min(8, len(held_out))]))) for r in shown]
    write_png(os.path.join(args.out_dir, "comfy_compare_samples.png"), render_image_rows(rows_img, scale=4))
    print(text)
    print("rows of the sample grid:", ", ".join(r["name"] for r in shown))


if __name__ == "__main__":
    main()
