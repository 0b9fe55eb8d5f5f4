"""DPCache against ComfyUI's own EasyCache and LazyCache, side by side inside a real ComfyUI.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.comfy_compare            # ~10 min on 2 CPU cores
    ... -m bench.comfy_compare --prompts 2 --rounds 1 --quick --out-dir out/compare_smoke   # smoke run

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
import torch.nn.functional as F

from bench import comfy_env
from dpcache_core.picture import font, render_image_rows, text_width, write_png
from bench.train_comfy_flux import LATENT_SIZE, WEIGHTS, latent_to_rgb, load_prompts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEPS = 50
SAMPLER, SCHEDULER = "euler", "simple"
THRESHOLDS = (0.05, 0.1, 0.2, 0.4)
KS = (9, 13, 20)
QUICK_THRESHOLDS, QUICK_KS = (0.2,), (13,)


# ----------------------------------------------------------------------------------- setup

def flux_detect_fix_dir() -> str:
    path = os.environ.get("DPCACHE_FLUX_DETECT_FIX") or os.path.join(comfy_env.comfy_path(), "custom_nodes", "harness_nodes")
    if not os.path.isfile(os.path.join(path, "flux_detect_patch.py")):
        raise SystemExit(
            "this bench's FLUX is 128 wide and stock ComfyUI 0.3.64 detects every Flux file as 3072 wide: it needs the "
            "test harness's shape-detection fix (custom node folder harness_nodes with flux_detect_patch.py). Put it in "
            "$COMFYUI_PATH/custom_nodes or point DPCACHE_FLUX_DETECT_FIX at it.")
    return path


def load_model(weights: str):
    """The stock UNETLoader on the bench weights (their folder added to diffusion_models)."""
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(os.path.abspath(weights)))
    nodes = comfy_env.boot()["nodes"]
    (model,) = nodes["UNETLoader"]().load_unet(os.path.basename(weights), "default")
    return model


def prompt_list(n: int, first_seed: int, offset: int = 0) -> list[tuple[int, int]]:
    """(class, seed) pairs: classes cycle from ``offset``, seeds count up from ``first_seed``."""
    return [((offset + 5 * k) % 16, first_seed + k) for k in range(n)]


def conditioning(prompts: dict, cls: int):
    return [[prompts["context"][cls][None].clone(), {"pooled_output": prompts["pooled"][cls][None].clone()}]]


def sample(model, prompts: dict, cls: int, seed: int) -> torch.Tensor:
    """KSampler's path: comfy.sample.sample under inference mode, euler 50 steps, cfg 1; returns the output latent."""
    import comfy.sample
    latent = torch.zeros(1, 16, LATENT_SIZE, LATENT_SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = conditioning(prompts, cls)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return comfy.sample.sample(model, noise, STEPS, 1.0, SAMPLER, SCHEDULER, cond, cond, latent, seed=seed,
                                   disable_pbar=True)


def decode(model, latent: torch.Tensor, prompts: dict) -> torch.Tensor:
    """Output latent -> RGB [B, 3, H, W] in [0, 1] (the training map's inverse)."""
    z = model.model.latent_format.process_in(latent.float())
    return (latent_to_rgb(z, prompts) + 1) / 2


class BlockCounter:
    """Counts calls of every transformer block, and the time spent in them, by wrapping the
    instances' forward."""

    def __init__(self, model):
        dm = model.model.diffusion_model
        self.blocks = list(dm.double_blocks) + list(dm.single_blocks)
        self.calls = 0
        self.seconds = 0.0

    def __enter__(self):
        for block in self.blocks:
            inner = block.forward

            def counting(*args, inner=inner, **kwargs):
                self.calls += 1
                t0 = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0

            block.forward = counting
        return self

    def __exit__(self, *exc):
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        return False


# ----------------------------------------------------------------------------------- metrics

def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((out.double() - ref.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(out: torch.Tensor, ref: torch.Tensor, win: int = 7) -> float:
    """Mean SSIM over channels, images in [0, 1], uniform win x win window (scikit-image's default)."""
    x, y = out.double(), ref.double()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    pool = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731
    n = win * win
    cov = n / (n - 1)
    mx, my = pool(x), pool(y)
    vx, vy, vxy = cov * (pool(x * x) - mx * mx), cov * (pool(y * y) - my * my), cov * (pool(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean().item()


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


def easycache(threshold: float, copy_input: bool):
    def patch(model):
        nodes = comfy_env.boot()["nodes"]
        if copy_input:  # registered first: the outermost wrapper, EasyCache then writes into the copy
            import comfy.patcher_extension as pe
            model = model.clone()
            model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_copy_input", copy_model_input)
        return nodes["EasyCache"].execute(model, threshold, 0.15, 0.95, False).result[0]
    return patch


def lazycache(threshold: float):
    def patch(model):
        return comfy_env.boot()["nodes"]["LazyCache"].execute(model, threshold, 0.15, 0.95, False).result[0]
    return patch


def dpcache(pact: str, k: int, order: int):
    def patch(model):
        nodes = comfy_env.boot()["nodes"]
        sched = nodes["DPCacheSchedule"]().schedule(pact, k, 3, 0, STEPS)["result"][0]
        if sched.order != order:  # (uniform) has no file to take the order from
            sched = dataclasses.replace(sched, order=order)
        return nodes["DPCacheApply"]().apply(model, sched)["result"][0]
    return patch


def calibrate(model, prompts: dict, calib: list[tuple[int, int]], order: int, folder: str) -> str:
    """DPCache Calibrate on ``calib`` prompts (one sample each); returns the PACT's file name."""
    import folder_paths
    folder_paths.add_model_folder_path("dpcache", folder, is_default=True)
    nodes = comfy_env.boot()["nodes"]
    name = f"bench_compare_o{order}"
    (recording,) = nodes["DPCacheCalibrate"]().calibrate(model, name, order, True)
    for cls, seed in calib:
        sample(recording, prompts, cls, seed)
    return name + ".safetensors"


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


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


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


def machine_name() -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {name} CPU, no GPU, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts")
    ap.add_argument("--calib", type=int, default=4, help="calibration prompts (DPCache Calibrate)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (images are taken from the first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one threshold and one K (smoke run)")
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args()
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
