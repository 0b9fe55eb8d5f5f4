"""The trained bench models inside a real ComfyUI, and what every real-ComfyUI bench does with them.

Which models (``MODELS``: FLUX, Wan, Qwen-Image- and HunyuanVideo-architecture ones trained by
bench/train_comfy_*.py) and how each is sampled; loading them with the stock UNETLoader (the narrow
FLUX and Qwen-Image ones need the test harness's shape-detection fix, ``flux_detect_fix_dir``),
sampling on KSampler's path, decoding, counting block calls, the image metrics, and DPCache Calibrate
on a list of prompts. Used by bench.comfy_compare, bench.replay_choice, bench.lomo, bench.auto,
bench.forecasters, bench.few_steps and the real-ComfyUI tier's bench tests.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import comfy_env
from bench import train_comfy_flux, train_comfy_more, train_comfy_wan
from bench.train_comfy_flux import LATENT_SIZE, WEIGHTS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEPS = 50


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A trained benchmark model and how it is sampled (as its ComfyUI workflows sample it)."""
    name: str
    weights: str
    sampler: str
    scheduler: str
    cfg: float
    shift: float | None     # ModelSamplingSD3 shift put on the loaded model; None: the file's own sampling
    latent_shape: tuple     # the empty latent [1, 16, (frames,) H, W]
    trainer: object         # the module that trained it: load_prompts, latent_to_rgb
    negative: int | None    # row of prompts["context"] that is the negative prompt (cfg > 1)
    text: str
    detect_fix: bool = False  # narrow FLUX / Qwen-Image: loading needs the harness's shape-detection fix


FLUX = BenchModel(
    "flux", WEIGHTS, "euler", "simple", 1.0, None, (1, 16, LATENT_SIZE, LATENT_SIZE), train_comfy_flux, None,
    "ComfyUI's Flux class (hidden 128, 2 double + 3 single blocks) trained on coloured shapes "
    "(bench/train_comfy_flux.py); latent 16x16 (128x128 px), euler, scheduler simple, cfg 1", True)
WAN = BenchModel(
    "wan", train_comfy_wan.WEIGHTS, "uni_pc", "simple", 5.0, 8.0,
    (1, 16, train_comfy_wan.FRAMES, train_comfy_wan.LATENT_SIZE, train_comfy_wan.LATENT_SIZE), train_comfy_wan,
    train_comfy_wan.NEGATIVE,
    "ComfyUI's WanModel (Wan2.1 t2v: dim 128, 4 blocks) trained on moving-shape clips (bench/train_comfy_wan.py); "
    f"latent {train_comfy_wan.FRAMES}x16x16 (a 5-frame 128x128 clip), uni_pc, scheduler simple, ModelSamplingSD3 "
    "shift 8, cfg 5 with the class prompt against a negative prompt")
QWEN = BenchModel(
    "qwen", train_comfy_more.SPECS["qwen"].weights, "euler", "simple", train_comfy_more.SPECS["qwen"].cfg, None,
    (1, 16, 1, train_comfy_more.LATENT_SIZE, train_comfy_more.LATENT_SIZE), train_comfy_more.trainer("qwen"),
    train_comfy_more.NEGATIVE,
    "ComfyUI's QwenImageTransformer2DModel (1 head of 128, 4 blocks) trained on coloured patterns "
    "(bench/train_comfy_more.py --model qwen); latent 16x16 (128x128 px), euler, scheduler simple, the file's own "
    "sampling (shift 1.15), cfg 2.5 with the class prompt against a negative prompt", True)
HUNYUAN = BenchModel(
    "hunyuan", train_comfy_more.SPECS["hunyuan"].weights, "dpmpp_2m", "simple", 1.0, None,
    (1, 16, 2, train_comfy_more.LATENT_SIZE, train_comfy_more.LATENT_SIZE), train_comfy_more.trainer("hunyuan"), None,
    "ComfyUI's HunyuanVideo (hidden 128, 2 double + 2 single blocks) trained on clips of shapes that rotate, grow, "
    "shrink or change colour (bench/train_comfy_more.py --model hunyuan); latent 2x16x16, dpmpp_2m, scheduler simple, "
    "the file's own sampling (shift 7), cfg 1")
MODELS = {m.name: m for m in (FLUX, WAN, QWEN, HUNYUAN)}


# ----------------------------------------------------------------------------------- setup

def write_json(path: str, data, **options) -> None:
    """``data`` as JSON at ``path``, atomically (a file beside it, then renamed): an interrupted run
    leaves the previous file whole."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, **options)
    os.replace(tmp, path)


def flux_detect_fix_dir() -> str:
    path = os.environ.get("DPCACHE_FLUX_DETECT_FIX") or os.path.join(comfy_env.comfy_path(), "custom_nodes", "harness_nodes")
    if not os.path.isfile(os.path.join(path, "flux_detect_patch.py")):
        raise SystemExit(
            "this bench's FLUX is 128 wide and stock ComfyUI 0.3.64 detects every Flux file as 3072 wide: it needs the "
            "test harness's shape-detection fix (custom node folder harness_nodes with flux_detect_patch.py). Put it in "
            "$COMFYUI_PATH/custom_nodes or point DPCACHE_FLUX_DETECT_FIX at it.")
    return path


def load_model(weights: str, bench: BenchModel = FLUX):
    """The stock UNETLoader on the bench weights (their folder added to diffusion_models), then
    ComfyUI's ModelSamplingSD3 node when the model is sampled with a shift (Wan: 8)."""
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(os.path.abspath(weights)))
    nodes = comfy_env.boot()["nodes"]
    (model,) = nodes["UNETLoader"]().load_unet(os.path.basename(weights), "default")
    if bench.shift is not None:
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3
        (model,) = ModelSamplingSD3().patch(model, bench.shift)
    return model


def prompt_list(n: int, first_seed: int, offset: int = 0) -> list[tuple[int, int]]:
    """(class, seed) pairs: classes cycle from ``offset``, seeds count up from ``first_seed``."""
    return [((offset + 5 * k) % 16, first_seed + k) for k in range(n)]


def conditioning(prompts: dict, cls: int):
    """ComfyUI conditioning for prompt row ``cls`` (FLUX: text tokens and pooled vector; Wan: tokens)."""
    extra = {"pooled_output": prompts["pooled"][cls][None].clone()} if "pooled" in prompts else {}
    return [[prompts["context"][cls][None].clone(), extra]]


def sample(model, prompts: dict, cls: int, seed: int, steps: int = STEPS, bench: BenchModel = FLUX) -> torch.Tensor:
    """KSampler's path: comfy.sample.sample under inference mode with the model's sampler, scheduler
    and cfg (FLUX: euler, cfg 1; Wan: uni_pc, cfg 5 against the negative prompt); returns the output latent."""
    import comfy.sample
    latent = torch.zeros(bench.latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = conditioning(prompts, cls)
    negative = cond if bench.negative is None else conditioning(prompts, bench.negative)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return comfy.sample.sample(model, noise, steps, bench.cfg, bench.sampler, bench.scheduler, cond, negative, latent,
                                   seed=seed, disable_pbar=True)


def decode(model, latent: torch.Tensor, prompts: dict, bench: BenchModel = FLUX) -> torch.Tensor:
    """Output latent -> RGB [B, 3, H, W] (FLUX) or [B, 3, F, H, W] (Wan) in [0, 1] (the training map's inverse)."""
    z = model.model.latent_format.process_in(latent.float())
    return (bench.trainer.latent_to_rgb(z, prompts) + 1) / 2


def frames_side_by_side(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] as is; clips [B, 3, F, H, W] as [B, 3, H, F * W] (the frames left to right)."""
    return rgb if rgb.ndim == 4 else rgb.permute(0, 1, 3, 2, 4).flatten(3, 4)


class BlockCounter:
    """Counts calls of every transformer block, and the time spent in them, by wrapping the
    instances' forward."""

    def __init__(self, model):
        dm = model.model.diffusion_model
        self.blocks = [b for name in ("double_blocks", "single_blocks", "blocks", "transformer_blocks") for b in getattr(dm, name, [])]
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


def calibrate(model, prompts: dict, calib: list[tuple[int, int]], order: int, folder: str, steps: int = STEPS,
              bench: BenchModel = FLUX, check_runs: int = 0) -> str:
    """DPCache Calibrate on ``calib`` prompts (one sample each; ``check_runs`` of them followed by
    the check runs); returns the PACT's file name."""
    import folder_paths
    folder_paths.add_model_folder_path("dpcache", folder, is_default=True)
    nodes = comfy_env.boot()["nodes"]
    name = f"bench_compare_{bench.name}_{steps}_o{order}"
    (recording,) = nodes["DPCacheCalibrate"]().calibrate(model, name, order, True, check_runs=check_runs)
    for cls, seed in calib:
        sample(recording, prompts, cls, seed, steps, bench)
    return name + ".safetensors"


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def count_evaluations(model, prompts, bench: BenchModel, steps: int) -> int:
    """Model evaluations of one plain run (block calls / blocks: cond and uncond run as one batch)."""
    with BlockCounter(model) as counter:
        sample(model, prompts, 0, 0, steps, bench)
    return counter.calls // len(counter.blocks)


def machine_name() -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {name} CPU, no GPU, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
