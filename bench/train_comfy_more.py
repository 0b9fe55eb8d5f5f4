"""Two more small bench models in ComfyUI's own architectures, on other procedural data.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.train_comfy_more --model qwen        # ~15 min on a busy 2-core machine
    COMFYUI_PATH=<ComfyUI> <its python> -m bench.train_comfy_more --model hunyuan
    ... --model qwen --steps 20 --out out/smoke.safetensors                             # smoke run
    ... --model qwen --evaluate --grid out/qwen_samples.png                            # sample and score by class

- **qwen**: `comfy.ldm.qwen_image.model.QwenImageTransformer2DModel` (imported at run time, never
  copied): 1 head of 128, 4 transformer blocks, text dim 64, patch 2, 16 latent channels (ComfyUI's
  Wan21 latent format, one frame). Stock ComfyUI 0.3.64 reads only in_channels and the block count
  of a Qwen-Image file: loading this narrow one needs the test harness's shape-detection fix (as the
  bench FLUX). Data: 16x16 *patterns* (linear gradient, stripes, rings, a glyph of bars) in one of
  four colour pairs: 16 classes; random orientation, frequency, phase and centre. Sampled as
  Qwen-Image's own model sampling (ModelSamplingFlux, shift 1.15: sigma = shift_e(t) with
  e^1.15), cfg 2.5 against a negative prompt.
- **hunyuan**: `comfy.ldm.hunyuan_video.model.HunyuanVideo`: hidden 128, 1 head (stock detection
  reads hidden // 128), MLP ratio 4, 2 double + 2 single blocks, patch (1, 2, 2), text dim 64
  through the token refiner, a pooled vector of 768 (without it stock ComfyUI detects HunyuanImage
  2.1), no guidance embedding; loads with stock detection.
  Data: clips of 2 latent frames at 16x16 where a shape *changes in place* (rotates, grows, shrinks
  or changes colour) instead of moving: 16 classes = shape x change. Sampled as HunyuanVideo's own
  model sampling (FLOW, shift 7), cfg 1.

Both map RGB into the 16-channel latent by a fixed seeded linear map (its pseudo-inverse decodes),
give each class fixed random text tokens, and train rectified flow as ComfyUI samples them (the
model predicts noise - x0), noise levels drawn as sampling visits them, with the optimizer step of
bench/train_comfy_flux.py (warm-up, cosine, clipping, EMA) and saved-tensor copies (the blocks add
in place). Weights: bench/weights/comfy_qwen_patterns*.safetensors, comfy_hunyuan_changes*.safetensors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.comfy_env import import_comfy
from bench.train_comfy_flux import logged_loss, optimizer_step
from bench.train_comfy_wan import shift_sigma
from bench.train_toy import COLOURS, RGB, ema_training, shape_alpha
from dpcache_core.picture import render_image_rows, write_png

HERE = os.path.dirname(os.path.abspath(__file__))
LATENT_SIZE = 16
TXT_TOKENS = 8
NUM_CLASSES = 16
NEGATIVE = NUM_CLASSES      # row of the negative prompt's tokens
TEXT_DIM = 64
POOLED_DIM = 768           # HunyuanVideo's CLIP-L pooled vector: without one, ComfyUI detects HunyuanImage 2.1

QWEN_CONFIG = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                   attention_head_dim=128, num_attention_heads=1, joint_attention_dim=TEXT_DIM, pooled_projection_dim=64)
HUNYUAN_CONFIG = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM,
                      context_in_dim=TEXT_DIM, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2,
                      depth_single_blocks=2, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True,
                      guidance_embed=False, byt5=False, meanflow=False)

PALETTES = (((0.9, 0.2, 0.15), (0.1, 0.15, 0.35)), ((0.95, 0.85, 0.2), (0.15, 0.3, 0.1)),
            ((0.3, 0.8, 0.95), (0.35, 0.1, 0.3)), ((0.95, 0.95, 0.95), (0.45, 0.25, 0.1)))
PATTERNS = ("gradient", "stripes", "rings", "glyph")
CHANGES = ("rotates", "grows", "shrinks", "recolours")


def draw_patterns(rng: np.random.Generator, n: int, size: int = LATENT_SIZE, labels=None):
    """n images [n, 3, 1, size, size] in [-1, 1] (one latent frame) and class ids (pattern * 4 + palette)."""
    labels = np.asarray(rng.integers(0, NUM_CLASSES, n) if labels is None else labels)
    pattern, palette = labels // 4, labels % 4
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    theta = rng.uniform(0, 2 * math.pi, n)
    u = np.cos(theta)[:, None, None] * (xx - 0.5) + np.sin(theta)[:, None, None] * (yy - 0.5)
    v = -np.sin(theta)[:, None, None] * (xx - 0.5) + np.cos(theta)[:, None, None] * (yy - 0.5)
    freq, phase = rng.uniform(2.0, 3.5, n)[:, None, None], rng.uniform(0, 2 * math.pi, n)[:, None, None]
    centre = rng.uniform(0.3, 0.7, (2, n))
    radius = np.hypot(xx - centre[0][:, None, None], yy - centre[1][:, None, None])
    t = np.empty((n, size, size))
    for p in range(4):
        m = pattern == p
        if p == 0:
            t[m] = np.clip(u[m] * 1.2 + 0.5, 0, 1)
        elif p == 1:
            t[m] = (np.sin(2 * math.pi * freq[m] * u[m] + phase[m]) > 0).astype(float)
        elif p == 2:
            t[m] = 0.5 + 0.5 * np.cos(2 * math.pi * freq[m] * radius[m] * 1.6)
        else:  # a glyph: an "H"-like figure of three bars, rotated
            bar = lambda a, b, w: (np.abs(a) < w) & (np.abs(b) < 0.3)  # noqa: E731
            t[m] = (bar(u[m] - 0.2, v[m], 0.06) | bar(u[m] + 0.2, v[m], 0.06) | bar(v[m], u[m], 0.05)).astype(float)
    fg = np.array([PALETTES[k][0] for k in palette]) + rng.uniform(-0.05, 0.05, (n, 3))
    bg = np.array([PALETTES[k][1] for k in palette]) + rng.uniform(-0.05, 0.05, (n, 3))
    img = t[:, None] * fg[:, :, None, None] + (1 - t[:, None]) * bg[:, :, None, None]
    return torch.from_numpy(np.clip(img, 0, 1)[:, :, None] * 2 - 1).float(), torch.from_numpy(labels)


def rotate_alpha(shape, x, y, r, angle):
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    return shape_alpha(shape, c * x + s * y, -s * x + c * y, r)


def draw_changes(rng: np.random.Generator, n: int, size: int = LATENT_SIZE, frames: int = 2, labels=None):
    """n clips [n, 3, frames, size, size] in [-1, 1] and class ids (shape * 4 + change): a shape in a
    random colour stays in place and rotates (by 30-60 degrees), grows or shrinks (by 1.4-1.8x) or
    changes colour over the clip."""
    labels = np.asarray(rng.integers(0, NUM_CLASSES, n) if labels is None else labels)
    shape, change = labels // 4, labels % 4
    r0 = rng.uniform(0.2, 0.28, n) * size
    factor = rng.uniform(1.4, 1.8, n)
    turn = rng.uniform(math.pi / 6, math.pi / 3, n) * rng.choice([-1, 1], n)
    angle0 = rng.uniform(0, math.pi / 2, n)
    centre = rng.uniform(0.4, 0.6, (2, n)) * size
    colours = np.array([RGB[c] for c in COLOURS])
    first = rng.integers(0, 4, n)
    second = (first + rng.integers(1, 4, n)) % 4
    bg = rng.uniform(0.05, 0.35, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.empty((n, 3, frames, size, size))
    for f in range(frames):
        a = f / max(1, frames - 1)
        r = r0 * np.where(change == 1, 1 / factor + a * (1 - 1 / factor), np.where(change == 2, 1 - a * (1 - 1 / factor), 1.0))
        angle = angle0 + np.where(change == 0, turn * a, 0.0)
        colour = np.where((change == 3)[:, None], (1 - a) * colours[first] + a * colours[second], colours[first])
        alpha = rotate_alpha(shape, xx[None] - centre[0][:, None, None], yy[None] - centre[1][:, None, None],
                             r[:, None, None], angle)[:, None]
        out[:, :, f] = alpha * colour[:, :, None, None] + (1 - alpha) * bg[:, :, None, None]
    return torch.from_numpy(np.clip(out, 0, 1) * 2 - 1).float(), torch.from_numpy(labels)


def _build(kind: str):
    import comfy.ops
    if kind == "qwen":
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
        model = QwenImageTransformer2DModel(**QWEN_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    else:
        from comfy.ldm.hunyuan_video.model import HunyuanVideo
        model = HunyuanVideo(**HUNYUAN_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # N(0, 1/fan_in), zero biases, unit norms; modulations and output layers at zero
        for name, p in model.named_parameters():
            if any(z in name for z in ("mod.", "modulation", "norm_out", "proj_out", "final_layer", "adaLN")) and p.ndim >= 1 \
                    and not name.endswith("norm.weight"):
                p.zero_()
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model


def _forward(kind, model, x, sigma, context, pooled=None):
    # Qwen-Image is ModelType.FLUX (timestep = sigma); HunyuanVideo is FLOW (timestep = 1000 sigma)
    if kind == "qwen":
        return model(x, sigma, context)
    return model(x, sigma * 1000.0, context, y=pooled)


SPECS = {
    "qwen": SimpleNamespace(weights=os.path.join(HERE, "weights", "comfy_qwen_patterns.safetensors"), draw=draw_patterns,
                            frames=1, shift=math.exp(1.15), cfg=2.5, cond_drop=0.15, prompt_seed=5151,
                            names=[f"{p} {i}" for p in PATTERNS for i in range(4)]),
    "hunyuan": SimpleNamespace(weights=os.path.join(HERE, "weights", "comfy_hunyuan_changes.safetensors"), draw=draw_changes,
                               frames=2, shift=7.0, cfg=1.0, cond_drop=0.0, prompt_seed=6262,
                               names=[f"{s} {c}" for s in ("circle", "square", "triangle", "cross") for c in CHANGES]),
}


def prompts_path(weights: str) -> str:
    return os.path.splitext(weights)[0] + "_prompts.safetensors"


def make_prompts(kind: str) -> dict[str, torch.Tensor]:
    """Per-class text tokens (row NEGATIVE: the negative prompt), HunyuanVideo's pooled vectors, and
    the RGB <-> latent map (all seeded)."""
    g = torch.Generator().manual_seed(SPECS[kind].prompt_seed)
    context = torch.randn(NUM_CLASSES + 1, TXT_TOKENS, TEXT_DIM, generator=g).half().float()
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=g))
    out = {"context": context, "rgb_to_latent": q * math.sqrt(16 / 3)}
    if kind == "hunyuan":
        out["pooled"] = torch.randn(NUM_CLASSES + 1, POOLED_DIM, generator=g).half().float()
    return out


def load_prompts(weights: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(prompts_path(weights)).items()}


def rgb_to_latent(rgb: torch.Tensor, prompts: dict) -> torch.Tensor:
    return torch.einsum("lc,bcfhw->blfhw", prompts["rgb_to_latent"].to(rgb), rgb)


def latent_to_rgb(latent: torch.Tensor, prompts: dict) -> torch.Tensor:
    """Model-space latents [B, 16, F, H, W] -> RGB [B, 3, F, H, W] in [-1, 1] (least squares)."""
    a = prompts["rgb_to_latent"].to(latent)
    return torch.einsum("lc,blfhw->bcfhw", torch.linalg.pinv(a).T, latent).clamp(-1, 1)


def trainer(kind: str) -> SimpleNamespace:
    """What bench.comfy_compare needs of a bench model's trainer (load_prompts, latent_to_rgb)."""
    return SimpleNamespace(load_prompts=load_prompts, latent_to_rgb=latent_to_rgb, WEIGHTS=SPECS[kind].weights)


def train(kind: str, steps: int, batch: int, lr: float, seed: int, out: str, threads: int) -> None:
    import_comfy(cpu=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    spec = SPECS[kind]
    prompts = make_prompts(kind)
    model, ema, opt = ema_training(lambda: _build(kind), lr)
    warmup = min(100, steps // 10 + 1)
    t0, running = time.time(), None
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        rgb, labels = spec.draw(rng, batch)
        x0 = rgb_to_latent(rgb, prompts)
        noise = torch.from_numpy(rng.standard_normal(x0.shape)).float()
        sig = shift_sigma(torch.from_numpy(rng.uniform(0.0, 1.0, batch)).float(), spec.shift)
        drop = torch.from_numpy(rng.uniform(size=batch) < spec.cond_drop)
        rows = torch.where(drop, NEGATIVE, labels)
        context, pooled = prompts["context"][rows], prompts["pooled"][rows] if "pooled" in prompts else None
        s = sig[:, None, None, None, None]
        xt = (1 - s) * x0 + s * noise
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            loss = F.mse_loss(_forward(kind, model, xt, sig, context, pooled), noise - x0)
        optimizer_step(model, ema, opt, loss, step, steps, warmup, lr)
        running = logged_loss(running, loss, step, steps, t0)
    elapsed = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    config = QWEN_CONFIG if kind == "qwen" else HUNYUAN_CONFIG
    meta = {"config": json.dumps(config),  # JSON: ComfyUI 0.33 parses a file's "config"
            "trained": str(dict(steps=steps, batch=batch, lr=lr, seed=seed, cond_drop=spec.cond_drop,
                                                          seconds=round(elapsed), final_loss=round(running, 4))),
            "dataset": f"bench.train_comfy_more.{spec.draw.__name__} at {spec.frames}x{LATENT_SIZE}x{LATENT_SIZE}"}
    tmp = out + ".tmp"
    save_file({k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}, tmp, metadata=meta)
    os.replace(tmp, out)
    ptmp = prompts_path(out) + ".tmp"
    save_file({k: (v if k == "rgb_to_latent" else v.half()).contiguous() for k, v in prompts.items()}, ptmp)
    os.replace(ptmp, prompts_path(out))
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) after {elapsed:.0f}s")


@torch.enable_grad()
def classifier(kind: str, steps: int = 600, batch: int = 64, seed: int = 777):
    """A small CNN trained on real data (frames stacked as channels): the judge of generated samples."""
    spec = SPECS[kind]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3 * spec.frames, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * (LATENT_SIZE // 4) ** 2, NUM_CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        rgb, labels = spec.draw(np.random.default_rng([seed, step]), batch)
        x = rgb.flatten(1, 2)
        loss = F.cross_entropy(net(x + 0.05 * torch.randn(x.shape, generator=g)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def evaluate(kind: str, weights: str, n: int = 32, steps: int = 30, seed: int = 99) -> dict:
    """Sample n (classes cycling; euler on the model's shifted schedule, its cfg against the negative
    prompt) and score them with a classifier trained on real data; also its accuracy on real data
    and on the starting noise."""
    import_comfy(cpu=True)
    spec = SPECS[kind]
    model = _build(kind).eval()
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    prompts = load_prompts(weights)
    labels = torch.arange(n) % NUM_CLASSES
    noise = torch.randn(n, 16, spec.frames, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))
    ctx = prompts["context"][labels]
    pooled = prompts["pooled"][labels] if "pooled" in prompts else None
    unc = prompts["context"][NEGATIVE].expand_as(ctx)
    sig = shift_sigma(torch.linspace(1, 0, steps + 1), spec.shift)
    x = noise
    for i in range(steps):
        s = sig[i].expand(n)
        if spec.cfg == 1.0:
            v = _forward(kind, model, x, s, ctx, pooled)
        else:
            vc, vu = _forward(kind, model, torch.cat([x, x]), torch.cat([s, s]), torch.cat([ctx, unc])).chunk(2)
            v = vu + spec.cfg * (vc - vu)
        x = x + (sig[i + 1] - sig[i]) * v
    net = classifier(kind)
    samples = latent_to_rgb(x, prompts)
    real, real_labels = spec.draw(np.random.default_rng(31337), 512)

    def acc(rgb, lab, part=None):
        pred = net(rgb.flatten(1, 2)).argmax(1)
        pick = {None: lambda c: c, "first": lambda c: c // 4, "second": lambda c: c % 4}[part]
        return (pick(pred) == pick(lab)).double().mean().item()
    return {"generated": acc(samples, labels), "first": acc(samples, labels, "first"), "second": acc(samples, labels, "second"),
            "real": acc(real, real_labels), "noise": acc(latent_to_rgb(noise, prompts), labels), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SPECS), required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: bench/weights/comfy_<model>_*.safetensors")
    ap.add_argument("--evaluate", action="store_true", help="sample the saved weights (30 steps) and score them by class")
    ap.add_argument("--grid", default="", help="with --evaluate: write the samples (frames side by side) to this PNG")
    a = ap.parse_args()
    out = a.out or SPECS[a.model].weights
    torch.set_num_threads(a.threads)
    if a.evaluate:
        res = evaluate(a.model, out)
        first, second = ("pattern", "palette") if a.model == "qwen" else ("shape", "change")
        print(f"class accuracy (a CNN trained on real data): generated {res['generated']:.0%} ({first} {res['first']:.0%}, "
              f"{second} {res['second']:.0%}); real {res['real']:.0%}; the starting noise {res['noise']:.0%} "
              f"({NUM_CLASSES} classes: chance {1 / NUM_CLASSES:.0%})")
        if a.grid:
            s = ((res["samples"][:16].clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
            s = s.permute(0, 3, 2, 4, 1).flatten(2, 3).numpy()  # [B, H, F * W, 3]
            write_png(a.grid, render_image_rows([(a.model, list(s))], scale=4))
            print(f"wrote {a.grid}")
        return
    train(a.model, a.steps, a.batch, a.lr, a.seed, out, a.threads)


if __name__ == "__main__":
    main()
