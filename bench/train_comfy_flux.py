"""Train a small model in ComfyUI's own FLUX architecture on procedural coloured shapes.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.train_comfy_flux          # 1600 steps, 1 thread: ~7 min idle, 30 min on a busy 2-core machine
    ... -m bench.train_comfy_flux --steps 20 --out out/smoke.safetensors    # smoke run

The model is `comfy.ldm.flux.model.Flux` itself (imported from COMFYUI_PATH at run time, never
copied): hidden 128, 2 heads of 64, MLP ratio 2, 2 double + 3 single blocks, patch 2, 16 latent
channels, no guidance embedding (loaded as FLUX "schnell"-style: FluxSchnell model sampling).
It is saved as a diffusion-model safetensors for the stock UNETLoader (float16, ~3.6 MB). Stock
ComfyUI 0.3.64 hard-codes FLUX.1's width when it detects a Flux file, so loading this narrow one needs
the shape-detection fix of the test harness (see bench/comfy_bench.py).

Data (nothing downloaded): 16x16 RGB shapes from bench.train_toy.draw_shapes (circle, square,
triangle, cross in red, green, blue, yellow: 16 classes), mapped into a 16-channel "latent" by a fixed
seeded linear map (`prompts["rgb_to_latent"]`; its pseudo-inverse decodes). A "prompt" is a class:
fixed random text tokens (context, 8 x 64) and pooled vector (y, 32) per class, stored beside the
weights in `<out>_prompts.safetensors` and fed through ComfyUI conditioning. Objective: rectified flow
as ComfyUI's FLUX sampling uses it (x = (1 - s) x0 + s noise, the model predicts noise - x0 at
timestep s), logit-normal s; EMA weights.

ComfyUI's blocks add into their inputs in place, which autograd rejects; training saves a copy of
every tensor autograd keeps (saved-tensor hooks), which gives exact gradients (checked against
finite differences).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.comfy_env import import_comfy
from bench.train_toy import draw_shapes, ema_training

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "comfy_flux_shapes.safetensors")
CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
              hidden_size=128, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=3,
              axes_dim=[8, 28, 28], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False)
LATENT_SIZE = 16        # latent 16x16 (a 128x128 "image" for ComfyUI's EmptyLatentImage)
TXT_TOKENS = 8
NUM_CLASSES = 16


def prompts_path(weights: str) -> str:
    return os.path.splitext(weights)[0] + "_prompts.safetensors"


def make_prompts(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Per-class text tokens and pooled vectors, and the RGB <-> latent map (all seeded)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(NUM_CLASSES, TXT_TOKENS, CONFIG["context_in_dim"], generator=g)
    pooled = torch.randn(NUM_CLASSES, CONFIG["vec_in_dim"], generator=g)
    q, _ = torch.linalg.qr(torch.randn(CONFIG["in_channels"], 3, generator=g))
    return {"context": context, "pooled": pooled, "rgb_to_latent": q * math.sqrt(CONFIG["in_channels"] / 3)}


def load_prompts(weights: str = WEIGHTS) -> dict[str, torch.Tensor]:
    return load_file(prompts_path(weights))


def rgb_to_latent(rgb: torch.Tensor, prompts: dict) -> torch.Tensor:
    return torch.einsum("lc,bchw->blhw", prompts["rgb_to_latent"], rgb)


def latent_to_rgb(latent: torch.Tensor, prompts: dict) -> torch.Tensor:
    """Decode a model-space latent [B, 16, H, W] to RGB in [-1, 1] (least squares)."""
    a = prompts["rgb_to_latent"].to(latent)
    return torch.einsum("lc,blhw->bchw", torch.linalg.pinv(a).T, latent).clamp(-1, 1)


def build_flux():
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    model = Flux(**CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    init_weights(model)
    return model


def init_weights(model) -> None:
    """N(0, 1/fan_in) linears, zero biases, unit norms; the adaLN modulations and the final layer
    start at zero (every block starts as the identity, as in DiT)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final_layer"):
                p.zero_()
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def forward(model, x, sigma, labels, prompts):
    return model(x, sigma, prompts["context"][labels], y=prompts["pooled"][labels])


def optimizer_step(model, ema, opt, loss, step: int, steps: int, warmup: int, lr: float) -> None:
    """One training step: warm-up then cosine learning rate, gradient clipping, and the EMA update."""
    progress = max(0.0, (step - warmup) / max(1, steps - warmup))
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(0.995, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)

def logged_loss(running, loss, step: int, steps: int, t0: float) -> float:
    """The running loss (an exponential mean) with ``loss`` added, printed every 25 steps and at the last."""
    running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    if step % 25 == 0 or step == steps - 1:
        print(f"step {step:5d}  loss {running:.4f}  {time.time() - t0:6.1f}s", flush=True)
    return running


def train(steps: int, batch: int, lr: float, seed: int, out: str, threads: int, sigma_mean: float) -> None:
    import_comfy(cpu=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    prompts = make_prompts()
    model, ema, opt = ema_training(build_flux, lr)
    warmup = min(100, steps // 10 + 1)
    t0, running = time.time(), None
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        rgb, labels = draw_shapes(rng, batch, LATENT_SIZE)
        x0 = rgb_to_latent(rgb, prompts)
        noise = torch.from_numpy(rng.standard_normal(x0.shape)).float()
        sig = torch.sigmoid(torch.from_numpy(rng.standard_normal(batch) + sigma_mean).float())
        xt = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * noise
        # ComfyUI's blocks add into their inputs in place: keep copies of what autograd saves
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            loss = F.mse_loss(forward(model, xt, sig, labels, prompts), noise - x0)
        optimizer_step(model, ema, opt, loss, step, steps, warmup, lr)
        running = logged_loss(running, loss, step, steps, t0)
    elapsed = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}
    meta = {"config": str(CONFIG), "trained": str(dict(steps=steps, batch=batch, lr=lr, seed=seed, sigma_mean=sigma_mean,
                                                          seconds=round(elapsed), final_loss=round(running, 4))),
            "dataset": "bench.train_toy.draw_shapes at 16x16, bench.train_comfy_flux.rgb_to_latent"}
    save_file(state, out, metadata=meta)
    save_file({k: v.contiguous() for k, v in prompts.items()}, prompts_path(out))
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) after {elapsed:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma-mean", type=float, default=0.3, help="mean of the logit-normal noise level")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=WEIGHTS)
    a = ap.parse_args()
    train(a.steps, a.batch, a.lr, a.seed, a.out, a.threads, a.sigma_mean)


if __name__ == "__main__":
    main()
