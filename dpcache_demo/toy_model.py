"""Built-in toy diffusion transformers and a rectified-flow Euler sampler.

Two small pure-torch models (torch, einops and numpy only; no ComfyUI import) that have the
structure DPCache cares about:

* ``ToyFlux``: FLUX-like. Latent image ``[B, C, H, W]`` -> patch tokens; class id -> a few
  "text" tokens; timestep (sinusoidal of ``1000 * sigma``) + pooled class vector -> ``vec``;
  double-stream blocks (separate img / txt weights, joint attention, adaLN from ``vec``), then
  single-stream blocks over ``[txt | img]``; a final adaLN + linear layer on the image tokens.
* ``ToyWan``: Wan2.1-like. Latent video ``[B, C, F, H, W]`` -> one token stream; self-attention,
  cross-attention to the text tokens, adaLN from the timestep.

Both split ``forward`` at the DPCache cache point::

    state   = model.embed(x, t, cond)      # everything before the blocks
    feature = model.run_blocks(state)      # [B, L_img, hidden]: image tokens after the last block
    v       = model.head(feature, state)   # final layer + unpatchify -> velocity, shaped like x

``model.block_calls`` counts transformer block calls, so a test can check that a skipped
evaluation ran no block. ``sample`` is a rectified-flow Euler sampler whose ``feature_fn`` hook
lets a cache decide, per evaluation, whether to call ``run_blocks`` or return a predicted feature.

Conventions: ``sigma`` runs from 1 (pure noise) to 0 (data); ``x_sigma = (1 - sigma) x0 + sigma
noise``; the model predicts the velocity ``v = noise - x0``; ``x_{i+1} = x_i + (s_{i+1} - s_i) v``.
``cond`` is a LongTensor of class ids ``[B]`` (or an int); id ``num_classes`` is the empty
("unconditional") prompt.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

log = logging.getLogger("dpcache")

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)

#: Demo config: the trained built-in model (32x32x3 "latent" = RGB in [-1, 1]).
TOY_FLUX = dict(arch="flux", in_channels=3, image_size=32, patch_size=4, hidden=128, heads=4,
                mlp_ratio=3.0, depth_double=2, depth_single=3, txt_tokens=4, txt_dim=64,
                num_classes=len(CLASS_NAMES), time_dim=256, seed=0)
#: Wan-like variant of the same size (latent video [B, 3, F, 32, 32]).
TOY_WAN = dict(arch="wan", in_channels=3, image_size=32, frames=2, patch_size=4, hidden=128,
               heads=4, mlp_ratio=3.0, depth=4, txt_tokens=4, txt_dim=64,
               num_classes=len(CLASS_NAMES), time_dim=256, seed=0)
#: Speed-benchmark config: the transformer blocks dominate the run time on a CPU.
BENCH_FLUX = dict(TOY_FLUX, patch_size=2, hidden=384, heads=6, mlp_ratio=4.0,
                  depth_double=4, depth_single=8, txt_tokens=16)

WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                            "toy_flux.safetensors")


# ----------------------------------------------------------------------------- helpers

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """FLUX's sinusoidal embedding of ``1000 * t`` (t = sigma in [0, 1]) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, *sizes: int) -> torch.Tensor:
    """Fixed sin-cos position table for a grid of ``sizes`` (row-major) -> [prod(sizes), dim]."""
    axes = len(sizes)
    per = (dim // axes) // 2 * 2
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in sizes], indexing="ij")
    parts = []
    for g in grids:
        omega = 1.0 / 100.0 ** (torch.arange(per // 2, dtype=torch.float32) / max(per // 2, 1))
        a = g.reshape(-1)[:, None] * omega[None]
        parts += [torch.sin(a), torch.cos(a)]
    pe = torch.cat(parts, dim=-1)
    return F.pad(pe, (0, dim - pe.shape[-1]))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain SDPA on [B, heads, L, d] -> [B, L, heads * d]."""
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


class _Base(nn.Module):
    """Shared pieces: class -> text tokens, time embedding, deterministic init, counters."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        h, td = cfg["hidden"], cfg["txt_dim"]
        self.hidden, self.heads, self.patch = h, cfg["heads"], cfg["patch_size"]
        self.num_classes = cfg["num_classes"]
        # +1: the empty prompt (used for classifier-free guidance / label dropout).
        self.class_tokens = nn.Embedding(self.num_classes + 1, cfg["txt_tokens"] * td)
        self.time_in = MLPEmbedder(cfg["time_dim"], h)
        self.block_calls = 0

    def _txt(self, cond: torch.Tensor) -> torch.Tensor:
        return rearrange(self.class_tokens(cond), "b (n d) -> b n d", n=self.config["txt_tokens"])

    def _init_weights(self) -> None:
        """Seeded init: small random weights, a time MLP that down-weights high frequencies.

        The sinusoid of ``1000 * sigma`` contains frequencies that change by many radians per
        sampling step; a random MLP over them would make even the untrained model jump between
        steps. Scaling each input column by ``1 / (1 + (1000 * freq / 4) ** 2)`` keeps only the slow
        components, so features and outputs change smoothly with the timestep, as in a trained
        model. Output projections are small so every block is a gentle residual update.
        """
        g = torch.Generator().manual_seed(int(self.config.get("seed", 0)))
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith(".weight"):     # norm scales
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        with torch.no_grad():
            self.class_tokens.weight.mul_(50.0)        # embeddings ~ N(0, 1)
            half = self.config["time_dim"] // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
            damp = 1.0 / (1.0 + (1000.0 * freqs / 4.0) ** 2)
            self.time_in.in_layer.weight.mul_(5.0 * torch.cat([damp, damp])[None])
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear) and name.split(".")[-1] in ("proj", "o", "linear2"):
                    m.weight.mul_(0.5)
                if isinstance(m, nn.Linear) and name.split(".")[-1] == "2" and "mlp" in name:
                    m.weight.mul_(0.5)

    @staticmethod
    def _cond(cond, batch: int, device) -> torch.Tensor:
        cond = torch.as_tensor(cond, dtype=torch.long, device=device)
        return cond.expand(batch) if cond.dim() == 0 else cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """Velocity prediction: ``head(run_blocks(embed(x, t, cond)), state)``."""
        state = self.embed(x, t, cond)
        return self.head(self.run_blocks(state), state)


# ----------------------------------------------------------------------------- FLUX-like

class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(dim, eps=1e-6)
        self.key_norm = nn.RMSNorm(dim, eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)

    def qkv_heads(self, x):
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    def __init__(self, hidden: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(hidden, n * hidden)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class DoubleStreamBlock(nn.Module):
    """FLUX double block: img and txt keep their own weights and attend jointly."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(hidden, 6), Modulation(hidden, 6)
        self.img_attn, self.txt_attn = SelfAttention(hidden, heads), SelfAttention(hidden, heads)
        self.img_mlp, self.txt_mlp = _mlp(hidden, mlp_ratio), _mlp(hidden, mlp_ratio)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)

    def forward(self, img, txt, vec):
        i1, i2, i3, i4, i5, i6 = self.img_mod(vec)
        t1, t2, t3, t4, t5, t6 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(self.norm(img), i1, i2))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.norm(txt), t1, t2))
        out = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2))
        t_out, i_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + i3 * self.img_attn.proj(i_out)
        img = img + i6 * self.img_mlp(modulate(self.norm(img), i4, i5))
        txt = txt + t3 * self.txt_attn.proj(t_out)
        txt = txt + t6 * self.txt_mlp(modulate(self.norm(txt), t4, t5))
        return img, txt


class SingleStreamBlock(nn.Module):
    """FLUX single block over [txt | img]: parallel attention + MLP from one linear."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.mlp_hidden = heads, int(hidden * mlp_ratio)
        self.modulation = Modulation(hidden, 3)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)

    def forward(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.heads)
        out = attention(self.norm.query_norm(q), self.norm.key_norm(k), v)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], -1))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(F.silu(vec))[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ToyFlux(_Base):
    """FLUX-like DiT on a latent image [B, C, H, W] (see module docstring)."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        h, p, c = cfg["hidden"], cfg["patch_size"], cfg["in_channels"]
        self.img_in = nn.Linear(c * p * p, h)
        self.txt_in = nn.Linear(cfg["txt_dim"], h)
        self.vector_in = MLPEmbedder(cfg["txt_dim"], h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth_double"]))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth_single"]))
        self.final_layer = LastLayer(h, c * p * p)
        side = cfg["image_size"] // p
        self.register_buffer("pos", sincos_pos_embed(h, side, side), persistent=False)
        self._init_weights()

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond) -> dict:
        """Everything before the blocks -> state dict (img, txt, vec tokens + shape info)."""
        b, _, hh, ww = x.shape
        cond = self._cond(cond, b, x.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(b)
        img = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch)
        txt_raw = self._txt(cond)
        vec = self.time_in(timestep_embedding(t, self.config["time_dim"]))
        vec = vec + self.vector_in(txt_raw.mean(1))
        return dict(img=self.img_in(img) + self.pos, txt=self.txt_in(txt_raw), vec=vec,
                    shape=(hh, ww))

    def run_blocks(self, state: dict) -> torch.Tensor:
        """All transformer blocks -> the cache-point feature: image tokens [B, L_img, hidden]."""
        img, txt, vec = state["img"], state["txt"], state["vec"]
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
            self.block_calls += 1
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec)
            self.block_calls += 1
        return x[:, txt.shape[1]:]

    def head(self, feature: torch.Tensor, state: dict) -> torch.Tensor:
        """Final layer on the image tokens + unpatchify -> velocity [B, C, H, W]."""
        out = self.final_layer(feature, state["vec"])
        hh, ww = state["shape"]
        return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=hh // self.patch,
                         p=self.patch, q=self.patch)


# ----------------------------------------------------------------------------- Wan-like

class WanBlock(nn.Module):
    """Wan2.1 block: adaLN self-attention, cross-attention to text, adaLN FFN."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.modulation = nn.Parameter(torch.zeros(1, 6, hidden))
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm3 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn = SelfAttention(hidden, heads)
        self.q, self.kv = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * hidden)
        self.o = nn.Linear(hidden, hidden)
        self.ffn = _mlp(hidden, mlp_ratio)

    def forward(self, x, e, context):
        e0, e1, e2, e3, e4, e5 = (self.modulation + e).chunk(6, dim=1)
        q, k, v = self.self_attn.qkv_heads(modulate(self.norm1(x), e0, e1))
        x = x + e2 * self.self_attn.proj(attention(q, k, v))
        q = rearrange(self.q(self.norm3(x)), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (k h d) -> k b h l d", k=2, h=self.heads)
        x = x + self.o(attention(q, k, v))
        return x + e5 * self.ffn(modulate(self.norm2(x), e3, e4))


class ToyWan(_Base):
    """Wan-like DiT on a latent video [B, C, F, H, W] (see module docstring)."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        h, p, c = cfg["hidden"], cfg["patch_size"], cfg["in_channels"]
        self.patch_embedding = nn.Linear(c * p * p, h)
        self.text_embedding = nn.Sequential(nn.Linear(cfg["txt_dim"], h), nn.GELU(approximate="tanh"),
                                            nn.Linear(h, h))
        self.time_projection = nn.Linear(h, 6 * h)
        self.blocks = nn.ModuleList(WanBlock(h, cfg["heads"], cfg["mlp_ratio"])
                                    for _ in range(cfg["depth"]))
        self.head_modulation = nn.Parameter(torch.zeros(1, 2, h))
        self.head_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.head_linear = nn.Linear(h, c * p * p)
        side = cfg["image_size"] // p
        self.register_buffer("pos", sincos_pos_embed(h, cfg["frames"], side, side), persistent=False)
        self._init_weights()

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond) -> dict:
        """Everything before the blocks -> state dict (video tokens, context, time modulation)."""
        b, _, f, hh, ww = x.shape
        cond = self._cond(cond, b, x.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(b)
        tok = rearrange(x, "b c f (h p) (w q) -> b (f h w) (c p q)", p=self.patch, q=self.patch)
        e = self.time_in(timestep_embedding(t, self.config["time_dim"]))
        e0 = rearrange(self.time_projection(F.silu(e)), "b (n d) -> b n d", n=6)
        return dict(x=self.patch_embedding(tok) + self.pos[:tok.shape[1]], e=e, e0=e0,
                    context=self.text_embedding(self._txt(cond)), shape=(f, hh, ww))

    def run_blocks(self, state: dict) -> torch.Tensor:
        """All blocks -> the cache-point feature: video tokens [B, L, hidden]."""
        x = state["x"]
        for block in self.blocks:
            x = block(x, state["e0"], state["context"])
            self.block_calls += 1
        return x

    def head(self, feature: torch.Tensor, state: dict) -> torch.Tensor:
        """Head (adaLN + linear) + unpatchify -> velocity [B, C, F, H, W]."""
        shift, scale = (self.head_modulation + state["e"][:, None]).chunk(2, dim=1)
        out = self.head_linear(modulate(self.head_norm(feature), shift, scale))
        f, hh, ww = state["shape"]
        return rearrange(out, "b (f h w) (c p q) -> b c f (h p) (w q)", f=f, h=hh // self.patch,
                         p=self.patch, q=self.patch)


# ----------------------------------------------------------------------------- building / loading

def build_model(config: Optional[dict] = None) -> _Base:
    """A seeded, deterministically initialised model for ``config`` (default ``TOY_FLUX``)."""
    cfg = dict(TOY_FLUX if config is None else config)
    with torch.random.fork_rng(devices=[]):       # leave the global RNG untouched
        model = {"flux": ToyFlux, "wan": ToyWan}[cfg["arch"]](cfg)
    return model.eval()


def save_model(model: _Base, path: str, extra: Optional[dict] = None) -> None:
    """Save weights as safetensors with the JSON config (and ``extra``) in the metadata."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"config": json.dumps(model.config)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, meta)


def load_model(path: str) -> _Base:
    """Load a model saved by ``save_model``."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    model = build_model(cfg)
    model.load_state_dict(load_file(path))
    return model.eval()


def load_builtin_model(path: Optional[str] = None) -> _Base:
    """The trained built-in FLUX-like model; the seeded random init if its file is missing."""
    path = path or WEIGHTS_PATH
    if os.path.isfile(path):
        return load_model(path)
    log.warning("[DPCache] built-in toy model weights not found at %s; using the seeded random "
                "init (run `python -m bench.train_toy` to train them)", os.path.basename(path))
    return build_model(TOY_FLUX)


def make_noise(config: dict, seed: int, batch: int = 1, frames: Optional[int] = None) -> torch.Tensor:
    """Seeded Gaussian noise shaped like the model's latent."""
    g = torch.Generator().manual_seed(int(seed))
    c, s = config["in_channels"], config["image_size"]
    shape = (batch, c, s, s) if config["arch"] == "flux" else (batch, c, frames or config["frames"], s, s)
    return torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- sampler

def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 to 0, time-shifted like FLUX / SD3: s' = k s / (1 + (k-1) s)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@torch.no_grad()
def sample(model: _Base, noise: torch.Tensor, cond, num_steps: int = 50, shift: float = 3.0,
           feature_fn: Optional[Callable[[int, dict], torch.Tensor]] = None,
           on_evaluation: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
           guidance: float = 1.0) -> torch.Tensor:
    """Rectified-flow Euler sampling: one model evaluation per step, ``num_steps`` in all.

    ``feature_fn(index, state) -> feature`` replaces ``model.run_blocks(state)`` at evaluation
    ``index`` (0-based): a cache returns ``model.run_blocks(state)`` at key evaluations and a
    predicted feature elsewhere. ``on_evaluation(index, feature, velocity)`` is called after each
    evaluation (e.g. to record the trajectory). With ``guidance != 1`` each evaluation runs one
    batch ``[cond; uncond]`` (rows ``:B`` conditional, ``B:`` the empty prompt) and combines the
    velocities with classifier-free guidance. Never writes into ``noise``.
    """
    sigmas = sigma_schedule(num_steps, shift).to(noise.device)
    b = noise.shape[0]
    cond = model._cond(cond, b, noise.device)
    if guidance != 1.0:
        cond = torch.cat([cond, torch.full_like(cond, model.num_classes)])
    x = noise.clone()
    for i in range(num_steps):
        xin = torch.cat([x, x]) if guidance != 1.0 else x
        state = model.embed(xin, sigmas[i].expand(xin.shape[0]), cond)
        feature = feature_fn(i, state) if feature_fn is not None else model.run_blocks(state)
        v = model.head(feature, state)
        if guidance != 1.0:
            v = v[b:] + guidance * (v[:b] - v[b:])
        if on_evaluation is not None:
            on_evaluation(i, feature, v)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def to_uint8(x: torch.Tensor):
    """[B, 3, H, W] in [-1, 1] -> numpy uint8 [B, H, W, 3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
