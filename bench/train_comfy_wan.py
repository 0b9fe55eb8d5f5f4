"""Train a small model in ComfyUI's own Wan2.1 (t2v) architecture on procedural clips of moving shapes.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.train_comfy_wan            # 1200 steps, 1 thread: ~10 min idle
    ... -m bench.train_comfy_wan --steps 20 --out out/smoke.safetensors     # smoke run
    ... -m bench.train_comfy_wan --evaluate --grid out/wan_samples.png      # sample 30 steps at cfg 5, score by class

The model is `comfy.ldm.wan.model.WanModel` itself (imported from COMFYUI_PATH at run time, never
copied): dim 128, 1 head (stock detection reads num_heads = dim // 128), FFN 512, 4 blocks, patch
(1, 2, 2), text dim 4096, 16 latent channels. Saved as a diffusion-model safetensors (float16,
~3.5 MB); stock ComfyUI detects it as WAN21_T2V and loads it with the stock UNETLoader, no fix needed.

Data (nothing downloaded): clips of FRAMES = 2 latent frames at 16 x 16 (what a 5-frame 128x128
video is in ComfyUI's Wan latent), one shape (circle, square, triangle, cross) in
one colour (red, green, blue, yellow) moving in a straight line over a dull background: 16 classes.
RGB frames are mapped into the 16-channel model-space latent by a fixed seeded linear map
(`prompts["rgb_to_latent"]`; its pseudo-inverse decodes). A "prompt" is a class: fixed random text
tokens (TXT_TOKENS x 4096) per class, plus one more set for the negative prompt, stored beside the
weights in `<out>_prompts.safetensors` and fed through ComfyUI conditioning.

Objective: rectified flow as ComfyUI's Wan sampling uses it (model_base.WAN21 is ModelType.FLOW:
ModelSamplingDiscreteFlow with shift 8 and multiplier 1000, CONST: x = (1 - s) x0 + s noise, the
model predicts noise - x0 at timestep 1000 s). Noise levels are drawn as sampling visits them:
s = shift8(u), u uniform. The class tokens are replaced by the negative ones with probability
--cond-drop, so cfg 5 with cond/uncond is meaningful. EMA weights.

ComfyUI's blocks add into their inputs in place, which autograd rejects; training saves a copy of
every tensor autograd keeps (saved-tensor hooks), as bench/train_comfy_flux.py does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.comfy_env import import_comfy
from bench.train_comfy_flux import logged_loss, optimizer_step
from bench.train_toy import CLASS_NAMES, COLOURS, RGB, ema_training, shape_alpha
from dpcache_core.picture import render_image_rows, write_png

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "comfy_wan_clips.safetensors")
CONFIG = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=128,
              ffn_dim=512, freq_dim=256, text_dim=4096, num_heads=1, num_layers=4, window_size=(-1, -1),
              qk_norm=True, cross_attn_norm=True, eps=1e-6)
LATENT_SIZE = 16        # latent 16x16 (128x128 px)
FRAMES = 2              # latent frames (a 5-frame clip: ComfyUI length 5)
TXT_TOKENS = 8
NUM_CLASSES = 16
SHIFT = 8.0             # ComfyUI's WAN21_T2V sampling shift
NEGATIVE = NUM_CLASSES  # index of the negative prompt's tokens


def prompts_path(weights: str) -> str:
    return os.path.splitext(weights)[0] + "_prompts.safetensors"


def make_prompts(seed: int = 4321) -> dict[str, torch.Tensor]:
    """Per-class text tokens (row NEGATIVE: the negative prompt) and the RGB <-> latent map (all seeded)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(NUM_CLASSES + 1, TXT_TOKENS, CONFIG["text_dim"], generator=g).half().float()
    q, _ = torch.linalg.qr(torch.randn(CONFIG["in_dim"], 3, generator=g))
    return {"context": context, "rgb_to_latent": q * math.sqrt(CONFIG["in_dim"] / 3)}


def load_prompts(weights: str = WEIGHTS) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(prompts_path(weights)).items()}


def draw_clips(rng: np.random.Generator, n: int, size: int = LATENT_SIZE, frames: int = FRAMES,
               labels: np.ndarray | None = None):
    """n clips [n, 3, frames, size, size] in [-1, 1] and their class ids [n] (shape * 4 + colour).

    The shape keeps its colour, size and background and moves in a straight line, by 1.5 to 3.5
    pixels per frame (at 16 px), half-way through the clip in the middle band of the frame."""
    if labels is None:
        labels = rng.integers(0, len(CLASS_NAMES), n)
    labels = np.asarray(labels)
    shape, colour = labels // len(COLOURS), labels % len(COLOURS)
    r = rng.uniform(0.17, 0.26, n) * size
    angle = rng.uniform(0, 2 * math.pi, n)
    speed = rng.uniform(1.5, 3.5, n) * size / 16
    vx, vy = np.cos(angle) * speed, np.sin(angle) * speed
    mid = rng.uniform(0.3, 0.7, (2, n)) * size   # where the shape is half-way through the clip
    cx0, cy0 = mid[0] - vx * (frames - 1) / 2, mid[1] - vy * (frames - 1) / 2
    fg = np.array([RGB[c] for c in COLOURS])[colour] + rng.uniform(-0.06, 0.06, (n, 3))
    bg = rng.uniform(0.05, 0.4, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.empty((n, 3, frames, size, size))
    for f in range(frames):
        cx, cy = cx0 + vx * f, cy0 + vy * f
        alpha = shape_alpha(shape, xx[None] - cx[:, None, None], yy[None] - cy[:, None, None], r[:, None, None])[:, None]
        out[:, :, f] = alpha * fg[:, :, None, None] + (1 - alpha) * bg[:, :, None, None]
    return torch.from_numpy(np.clip(out, 0, 1) * 2 - 1).float(), torch.from_numpy(labels)


def rgb_to_latent(rgb: torch.Tensor, prompts: dict) -> torch.Tensor:
    """RGB clips [B, 3, F, H, W] -> model-space latents [B, 16, F, H, W]."""
    return torch.einsum("lc,bcfhw->blfhw", prompts["rgb_to_latent"].to(rgb), rgb)


def latent_to_rgb(latent: torch.Tensor, prompts: dict) -> torch.Tensor:
    """Decode model-space latents [B, 16, F, H, W] to RGB in [-1, 1] (least squares)."""
    a = prompts["rgb_to_latent"].to(latent)
    return torch.einsum("lc,blfhw->bcfhw", torch.linalg.pinv(a).T, latent).clamp(-1, 1)


def shift_sigma(u: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """ComfyUI's time_snr_shift: the sigma sampling visits at uniform time u."""
    return shift * u / (1 + (shift - 1) * u)


def build_wan():
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    model = WanModel(**CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    init_weights(model)
    return model


def init_weights(model) -> None:
    """N(0, 1/fan_in) weights, zero biases, unit norms; the block modulations start at zero and the
    head's projection at zero (every block starts near the identity, as in DiT)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation") or name.startswith("head.head"):
                p.zero_()
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def forward(model, x, sigma, context):
    return model(x, sigma * 1000.0, context)


def clip_classifier(steps: int = 1000, batch: int = 64, seed: int = 777):
    """A small CNN trained on real clips to tell the 16 classes apart (the frames stacked as channels):
    the judge of generated clips. Seeded; about a minute on one thread."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3 * FRAMES, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * (LATENT_SIZE // 4) ** 2, NUM_CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        rgb, labels = draw_clips(np.random.default_rng([seed, step]), batch)
        loss = F.cross_entropy(net(rgb.flatten(1, 2) + 0.05 * torch.randn(rgb.flatten(1, 2).shape, generator=g)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def class_accuracy(net, rgb: torch.Tensor, labels: torch.Tensor, part: str = "class") -> float:
    """Share of clips [B, 3, F, H, W] the classifier puts in their class (``part``: "class", or only
    its "colour" or "shape")."""
    pred = net(rgb.flatten(1, 2)).argmax(1)
    n = len(COLOURS)
    pick = {"class": lambda c: c, "colour": lambda c: c % n, "shape": lambda c: c // n}[part]
    return (pick(pred) == pick(labels)).double().mean().item()


@torch.no_grad()
def euler_cfg(model, context, uncond, noise, steps: int = 30, cfg: float = 5.0, shift: float = SHIFT) -> torch.Tensor:
    """Plain euler sampling with cond/uncond guidance on ComfyUI's shifted 'simple' schedule
    (no ComfyUI sampler: for the training-time check only)."""
    sig = shift_sigma(torch.linspace(1, 0, steps + 1), shift)
    x = noise
    for i in range(steps):
        s = sig[i].expand(x.shape[0])
        v = forward(model, torch.cat([x, x]), torch.cat([s, s]), torch.cat([context, uncond]))
        vc, vu = v.chunk(2)
        x = x + (sig[i + 1] - sig[i]) * (vu + cfg * (vc - vu))
    return x


def evaluate(model, prompts, n: int = 32, steps: int = 30, cfg: float = 5.0, seed: int = 99) -> dict:
    """Sample n clips (classes cycling) and score them with a classifier trained on real clips; also
    its accuracy on held-out real clips (the metric's ceiling), on the same clips sampled without
    guidance (cfg 1) and on the noise they start from (the floor)."""
    labels = torch.arange(n) % NUM_CLASSES
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 16, FRAMES, LATENT_SIZE, LATENT_SIZE, generator=g)
    ctx = prompts["context"][labels]
    unc = prompts["context"][NEGATIVE].expand_as(ctx)
    out = euler_cfg(model, ctx, unc, noise, steps, cfg)
    out1 = euler_cfg(model, ctx, unc, noise, steps, 1.0)
    net = clip_classifier()
    real, real_labels = draw_clips(np.random.default_rng(31337), 512)
    samples = latent_to_rgb(out, prompts)
    return {"generated": class_accuracy(net, samples, labels),
            "colour": class_accuracy(net, samples, labels, "colour"),
            "shape": class_accuracy(net, samples, labels, "shape"),
            "generated cfg 1": class_accuracy(net, latent_to_rgb(out1, prompts), labels),
            "real": class_accuracy(net, real, real_labels),
            "noise": class_accuracy(net, latent_to_rgb(noise, prompts), labels),
            "samples": samples}


def train(steps: int, batch: int, lr: float, seed: int, out: str, threads: int, cond_drop: float,
          init: str = "") -> None:
    import_comfy(cpu=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    prompts = make_prompts()
    init_state = {k: v.float() for k, v in load_file(init).items()} if init else None  # a second stage: from saved (EMA) weights
    model, ema, opt = ema_training(build_wan, lr, init_state)
    warmup = min(100, steps // 10 + 1)
    t0, running, curve = time.time(), None, []
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        rgb, labels = draw_clips(rng, batch)
        x0 = rgb_to_latent(rgb, prompts)
        noise = torch.from_numpy(rng.standard_normal(x0.shape)).float()
        sig = shift_sigma(torch.from_numpy(rng.uniform(0.0, 1.0, batch)).float())
        drop = torch.from_numpy(rng.uniform(size=batch) < cond_drop)
        context = prompts["context"][torch.where(drop, NEGATIVE, labels)]
        s = sig[:, None, None, None, None]
        xt = (1 - s) * x0 + s * noise
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            loss = F.mse_loss(forward(model, xt, sig, context), noise - x0)
        optimizer_step(model, ema, opt, loss, step, steps, warmup, lr)
        running = logged_loss(running, loss, step, steps, t0)
        if step % 25 == 0 or step == steps - 1:
            curve.append((step, round(running, 4)))
    elapsed = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}
    before = safe_open_metadata(init) if init else {}
    meta = {"config": json.dumps(CONFIG), "trained": str(dict(steps=steps, batch=batch, lr=lr, seed=seed, cond_drop=cond_drop,
                                                          seconds=round(elapsed), final_loss=round(running, 4))),
            "initialised_from": str({"file": os.path.basename(init), "trained": before.get("trained", "")}) if init else "",
            "loss_curve": str(curve[:: max(1, len(curve) // 16)] + curve[-1:]),
            "dataset": f"bench.train_comfy_wan.draw_clips at {FRAMES}x{LATENT_SIZE}x{LATENT_SIZE}, rgb_to_latent"}
    tmp = out + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, out)
    ptmp = prompts_path(out) + ".tmp"
    save_file({"context": prompts["context"].half().contiguous(), "rgb_to_latent": prompts["rgb_to_latent"].contiguous()}, ptmp)
    os.replace(ptmp, prompts_path(out))
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) after {elapsed:.0f}s")


def clip_rows(rgb: torch.Tensor) -> list[tuple[str, list[np.ndarray]]]:
    """Rows for render_image_rows: one per frame, the clips [B, 3, F, H, W] in [-1, 1] side by side."""
    frames = ((rgb.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(2, 0, 3, 4, 1).numpy()
    return [(f"frame {f}", list(frames[f])) for f in range(frames.shape[0])]


def safe_open_metadata(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def load_trained(weights: str = WEIGHTS):
    import_comfy(cpu=True)
    model = build_wan().eval()
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cond-drop", type=float, default=0.15, help="share of samples trained on the negative prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=WEIGHTS)
    ap.add_argument("--init", default="", help="continue from these weights (a second training stage)")
    ap.add_argument("--evaluate", action="store_true", help="sample the saved weights (30 steps, cfg 5) and score them")
    ap.add_argument("--grid", default="", help="with --evaluate: write the samples' frames to this PNG")
    a = ap.parse_args()
    if a.evaluate:
        torch.set_num_threads(a.threads)
        res = evaluate(load_trained(a.out), load_prompts(a.out))
        print(f"class accuracy (a CNN trained on real clips): generated at cfg 5 {res['generated']:.0%} (colour "
              f"{res['colour']:.0%}, shape {res['shape']:.0%}), at cfg 1 "
              f"{res['generated cfg 1']:.0%}; real clips {res['real']:.0%}; the starting noise {res['noise']:.0%} "
              f"({NUM_CLASSES} classes: chance {1 / NUM_CLASSES:.0%})")
        if a.grid:
            write_png(a.grid, render_image_rows(clip_rows(res["samples"][:16]), scale=4))
            print(f"wrote {a.grid}")
        return
    train(a.steps, a.batch, a.lr, a.seed, a.out, a.threads, a.cond_drop, a.init)


if __name__ == "__main__":
    main()
