"""Train the built-in FLUX-like toy DiT on procedurally drawn coloured shapes (nothing downloaded).

    python -m bench.train_toy                # ~12 min (one torch thread, Xeon 2.1 GHz); weights + sample grid
    python -m bench.train_toy --steps 50 --out bench/cache/smoke.safetensors --grid ''  # smoke run

Dataset: 32x32 RGB images in [-1, 1], one shape (circle, square, triangle, cross) in one colour
(red, green, blue, yellow) at a random position and size on a random dull background; class id =
shape * 4 + colour (16 classes). Every batch is drawn from a generator seeded by (seed, step), so the
run is deterministic. Objective: rectified flow, v = noise - x0 at x = (1 - s) x0 + s noise, with
logit-normal s (mean 0.5: a little towards noise) and 10% label dropout (the empty prompt, for
optional guidance). The saved weights are an exponential moving average, stored as float16 safetensors (< 5 MB) with the config and
training settings in the metadata.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/train_toy.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpcache_demo.toy_model import (CLASS_NAMES, COLOURS, TOY_FLUX, WEIGHTS_PATH, build_model,
                                    load_model, make_noise, sample, save_model, to_uint8)
from dpcache_core.picture import render_image_rows, write_png

RGB = {"red": (0.9, 0.15, 0.12), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
       "yellow": (0.95, 0.85, 0.1)}


def shape_alpha(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of shape ids ``shape`` [n] (circle, square, triangle, cross) of
    radius ``rr`` at pixel offsets ``dx``, ``dy`` from their centres (all broadcast to [n, H, W])."""
    circle = np.hypot(dx, dy) - rr
    square = np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * rr
    # upward triangle: three half-planes (base at +0.6r, sides through the apex at -r)
    s3 = math.sqrt(3) / 2
    tri = np.maximum.reduce([dy - 0.6 * rr, s3 * dx - 0.5 * dy - 0.5 * rr,
                             -s3 * dx - 0.5 * dy - 0.5 * rr])
    bar = 0.3 * rr
    cross = np.minimum(np.maximum(np.abs(dx) - rr, np.abs(dy) - bar),
                       np.maximum(np.abs(dx) - bar, np.abs(dy) - rr))
    dist = np.choose(shape[:, None, None], [circle, square, tri, cross])
    return np.clip(0.5 - dist, 0.0, 1.0)


def draw_shapes(rng: np.random.Generator, n: int, size: int = 32):
    """n images [n, 3, size, size] in [-1, 1] and their class ids [n] (anti-aliased edges)."""
    labels = rng.integers(0, len(CLASS_NAMES), n)
    shape, colour = labels // len(COLOURS), labels % len(COLOURS)
    cx, cy = rng.uniform(0.3, 0.7, (2, n)) * size
    r = rng.uniform(0.17, 0.3, n) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    alpha = shape_alpha(shape, xx[None] - cx[:, None, None], yy[None] - cy[:, None, None], r[:, None, None])[:, None]
    fg = np.array([RGB[c] for c in COLOURS])[colour] + rng.uniform(-0.06, 0.06, (n, 3))
    bg = rng.uniform(0.05, 0.4, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3))
    img = alpha * fg[:, :, None, None] + (1 - alpha) * bg[:, :, None, None]
    return torch.from_numpy(np.clip(img, 0, 1) * 2 - 1).float(), torch.from_numpy(labels)


def ema_training(build, lr: float, init_state: dict | None = None):
    """(the model ``build()`` makes, in train mode, an EMA copy of it, its AdamW): how every bench
    trainer starts. ``init_state``: weights to start from (a second stage)."""
    model = build().train()
    if init_state is not None:
        model.load_state_dict(init_state)
    ema = build()
    ema.load_state_dict(model.state_dict())
    return model, ema, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def train(steps: int, batch: int, lr: float, seed: int, out: str, grid_path: str | None,
          threads: int = 2, log_every: int = 25, sigma_mean: float = 0.0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # denormal floats can slow CPU training down many times
    cfg = dict(TOY_FLUX)
    model, ema, opt = ema_training(lambda: build_model(cfg), lr)
    warmup = min(100, steps // 10 + 1)
    nc = cfg["num_classes"]
    t0, running = time.time(), None
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        x0, labels = draw_shapes(rng, batch, cfg["image_size"])
        drop = torch.from_numpy(rng.random(batch) < 0.1)
        labels = torch.where(drop, torch.full_like(labels, nc), labels)
        noise = torch.from_numpy(rng.standard_normal(x0.shape)).float()
        sig = torch.sigmoid(torch.from_numpy(rng.standard_normal(batch) + sigma_mean).float())
        xt = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * noise
        loss = F.mse_loss(model(xt, sig, labels), noise - x0)
        for g in opt.param_groups:
            progress = max(0.0, (step - warmup) / max(1, steps - warmup))
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.time() - t0:6.1f}s", flush=True)
    elapsed = time.time() - t0
    ema.eval()
    # store float16 weights (half the size); loading casts back to float32
    for p in ema.parameters():
        p.data = p.data.half()
    save_model(ema, out, extra={"trained": dict(steps=steps, batch=batch, lr=lr, seed=seed, sigma_mean=sigma_mean,
                                                  seconds=round(elapsed), final_loss=round(running, 4),
                                                  dataset="bench.train_toy.draw_shapes")})
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) after {elapsed:.0f}s")
    if grid_path:
        save_sample_grid(grid_path, out)


def save_sample_grid(path: str, weights: str = WEIGHTS_PATH, seeds: int = 4) -> None:
    """Sample every class with a few seeds (50 Euler steps) and write a PNG, one labelled row per class."""
    model = load_model(weights)
    rows = []
    for c in range(model.num_classes):
        noise = torch.cat([make_noise(model.config, 1000 + s) for s in range(seeds)])
        rows.append((CLASS_NAMES[c], list(to_uint8(sample(model, noise, c, 50)))))
    write_png(path, render_image_rows(rows, scale=2))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma-mean", type=float, default=0.5, help="mean of the logit-normal noise level")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: bit-identical on any machine, and robust on a busy one)")
    ap.add_argument("--out", default=WEIGHTS_PATH)
    ap.add_argument("--grid", default=os.path.join("bench", "results", "toy_samples.png"),
                    help="PNG grid of samples after training ('' to skip)")
    a = ap.parse_args()
    if a.grid:
        os.makedirs(os.path.dirname(a.grid) or ".", exist_ok=True)
    train(a.steps, a.batch, a.lr, a.seed, a.out, a.grid or None, a.threads, sigma_mean=a.sigma_mean)


if __name__ == "__main__":
    main()
