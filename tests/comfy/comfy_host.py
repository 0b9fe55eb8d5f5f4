"""Real-host tier helpers: the pack inside a real ComfyUI (CPU), found through COMFYUI_PATH.

Run with the host's own python (the one ComfyUI's requirements are installed in):
    COMFYUI_PATH=<ComfyUI checkout> <host venv>/bin/python -m pytest tests/comfy -q -s
Every test here skips, with the reason, when COMFYUI_PATH is unset or ComfyUI cannot be imported.

Models are tiny random-weight FLUX (dev and schnell), Wan2.1 (T2V, I2V), Chroma, HunyuanVideo (T2V),
Qwen-Image, Wan2.2 TI2V 5B and two Wan2.2 A14B-style experts (Wan2.1 architecture) diffusion models,
built in-process by ComfyUI's own model classes; conditioning is random tensors of the real
shapes. Nothing from ComfyUI is copied here.
"""
from __future__ import annotations

import asyncio
import math
import os
import sys

import pytest

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for real_tier
from real_tier import unset_reason  # noqa: E402

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    from bench.comfy_env import with_host_fields
except ImportError:  # run as a script (build_flux_w3072.py): the repository root last, after ComfyUI
    sys.path.append(PACK_DIR)
    from bench.comfy_env import with_host_fields
COMFY = os.environ.get("COMFYUI_PATH", "")

FLUX_CFG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 3,
    "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
}
WAN_CFG = {
    "image_model": "wan2.1", "patch_size": (1, 2, 2), "dim": 128, "ffn_dim": 256, "freq_dim": 256,
    "text_dim": 4096, "out_dim": 16, "num_heads": 2, "num_layers": 3, "window_size": (-1, -1),
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
CHROMA_CFG = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 64,
    "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 3, "axes_dim": [4, 6, 6], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 2,
}
HUNYUAN_VIDEO_CFG = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2], "vec_in_dim": 32,
    "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 256, "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
}
QWEN_IMAGE_CFG = {
    "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 3, "attention_head_dim": 32,
    "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12),
}
FLUX2_CFG = {  # FLUX.2's layout (global modulation, no biases, patch 1 on a 128-channel latent) at tiny width
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3,
    "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "txt_ids_dims": [3],
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
    "ref_index_scale": 10.0, "yak_mlp": False, "txt_norm": False,
}
HUNYUAN_VIDEO15_CFG = {  # HunyuanVideo 1.5's layout: 32-channel latent + image + mask in, patch 1, cond-type embedding
    "image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "patch_size": [1, 1, 1], "vec_in_dim": None,
    "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 256, "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
    "use_cond_type_embedding": True, "vision_in_dim": 1152, "meanflow_sum": True,
}
LTX2_CFG = {  # LTX-2: video stream 2 x 32, audio stream 2 x 16, text already through the connectors (64 + 32)
    "image_model": "ltxav", "in_channels": 128, "audio_in_channels": 128, "cross_attention_dim": 64,
    "audio_cross_attention_dim": 32, "attention_head_dim": 32, "audio_attention_head_dim": 16, "num_attention_heads": 2,
    "audio_num_attention_heads": 2, "caption_channels": 64, "num_layers": 3, "connector_attention_head_dim": 32,
    "connector_num_attention_heads": 2, "connector_num_layers": 1,
}
KANDINSKY5_CFG = {  # Kandinsky 5 video: 16-channel latent + zero image + mask (33 x 2 x 2 = 132 per patch)
    "image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 64, "in_text_dim2": 32,
    "time_dim": 32, "model_dim": 64, "ff_dim": 128, "visual_embed_dim": 132, "patch_size": (1, 2, 2),
    "num_text_blocks": 1, "num_visual_blocks": 3, "axes_dims": (8, 12, 12),
}
MODEL_KEYS = ("flux", "flux_schnell", "wan_t2v", "wan_i2v")
# the other DiT families (tests/comfy/test_host_families.py); wan22_high/low: Wan2.2 A14B-style experts
FAMILY_KEYS = ("chroma", "hunyuan_video", "qwen_image", "wan22_5b", "wan22_high", "wan22_low")
# families that exist only in newer ComfyUI (0.33): key -> the comfy.supported_models class it needs
NEW_KEYS = {"flux2": "Flux2", "flux2_klein": "Flux2", "hunyuan_video15": "HunyuanVideo15", "ltx2": "LTXAV",
            "kandinsky5": "Kandinsky5"}
ALL_KEYS = MODEL_KEYS + FAMILY_KEYS
# timestep-embedding input layers (columns) that are low-passed so outputs change smoothly with sigma
TIME_LAYERS = {
    "time_in.in_layer.weight": None, "guidance_in.in_layer.weight": None, "time_embedding.0.weight": None,
    "txt_in.t_embedder.in_layer.weight": None, "time_text_embed.timestep_embedder.linear_1.weight": None,
    "distilled_guidance_layer.in_proj.weight": (0, 16),  # Chroma: [16 timestep | 16 guidance | 32 index]
    "adaln_single.emb.timestep_embedder.linear_1.weight": None, "time_embeddings.in_layer.weight": None,
}

_state = {}


def _skip_reason():
    if not COMFY:
        return unset_reason()
    if not os.path.isfile(os.path.join(COMFY, "main.py")):
        return f"COMFYUI_PATH={COMFY} has no main.py"
    return None


def boot():
    """Import ComfyUI like `main.py --cpu` does, load this pack with ComfyUI's loader."""
    if "pack" in _state:
        return _state
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        saved = sys.argv
        sys.argv = [os.path.join(COMFY, "main.py"), "--cpu"]
        try:
            from comfy.cli_args import args  # noqa: F401  parses --cpu before model_management loads
        finally:
            sys.argv = saved
        import folder_paths  # noqa: F401
        import utils.extra_config  # noqa: F401  (before nodes: nodes puts comfy/ first on sys.path)
        import comfy.model_management  # noqa: F401
        import comfy.utils
        import nodes
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"cannot import ComfyUI from COMFYUI_PATH={COMFY}: {exc!r} (run with ComfyUI's python)")
    comfy.utils.set_progress_bar_enabled(False)
    import torch
    torch.set_num_threads(1)  # tiny models: threads only add contention
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    import server
    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer(loop)
    assert loop.run_until_complete(nodes.load_custom_node(PACK_DIR)), "the pack failed to load"
    mod = PACK_DIR.replace(".", "_x_")
    _state.update(loop=loop, pack=sys.modules[mod], run_state=sys.modules[mod + ".nodes.run_state"],
                  block_patches=sys.modules[mod + ".nodes.block_patches"],
                  sampler_counts=sys.modules[mod + ".nodes.sampler_counts"],
                  core=sys.modules[mod + ".dpcache_core"])
    return _state


def init_weights(module, seed):
    """N(0, 1/fan_in) weights, small biases, unit norms; the timestep-embedding input layers
    are low-passed so that, like a trained model, the output changes smoothly with sigma."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1] if name.endswith("modulation") else math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0)
            if name in TIME_LAYERS:
                cols = TIME_LAYERS[name]
                p = p if cols is None else p[:, cols[0]:cols[1]]
                half = p.shape[1] // 2
                freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
                damp = (1.0 / (1.0 + (freq / 0.005) ** 2)).to(p.dtype).repeat(2)
                scaled = p * damp
                p.copy_(scaled * (p.norm() / scaled.norm()))


def new_family_skip(key):
    """Why ``key`` cannot be built on this host (a family newer than it), or None."""
    import comfy.supported_models as sm
    need = NEW_KEYS.get(key)
    if need and not hasattr(sm, need):
        return f"{key}: this ComfyUI has no comfy.supported_models.{need} (the family is newer than this host)"
    return None


def build_model(key):
    """A ModelPatcher of ComfyUI's real model classes with tiny random weights (cached per key)."""
    boot()
    cache = _state.setdefault("models", {})
    if key in cache:
        return cache[key]
    reason = new_family_skip(key)
    if reason:
        pytest.skip(reason)
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm
    cpu = torch.device("cpu")
    if key == "flux":
        mc = sm.Flux(with_host_fields(dict(FLUX_CFG, guidance_embed=True)))
    elif key == "flux_schnell":
        mc = sm.FluxSchnell(with_host_fields(dict(FLUX_CFG, guidance_embed=False)))
    elif key == "wan_t2v":
        mc = sm.WAN21_T2V(dict(WAN_CFG, model_type="t2v", in_dim=16))
    elif key == "wan_i2v":
        mc = sm.WAN21_I2V(dict(WAN_CFG, model_type="i2v", in_dim=36))
    elif key == "chroma":
        mc = sm.Chroma(with_host_fields(dict(CHROMA_CFG)))
    elif key == "hunyuan_video":
        mc = sm.HunyuanVideo(with_host_fields(dict(HUNYUAN_VIDEO_CFG)))
    elif key == "qwen_image":
        mc = sm.QwenImage(dict(QWEN_IMAGE_CFG))
    elif key == "wan22_5b":
        mc = sm.WAN22_T2V(dict(WAN_CFG, model_type="t2v", in_dim=48, out_dim=48))
    elif key in ("wan22_high", "wan22_low"):
        mc = sm.WAN21_T2V(dict(WAN_CFG, model_type="t2v", in_dim=16))
    elif key == "wan_vace":  # unsupported: VACE adds residuals between blocks
        mc = sm.WAN21_Vace(dict(WAN_CFG, model_type="vace", in_dim=16, vace_layers=1, vace_in_dim=96))
    elif key == "flux2":  # FLUX.2 dev (guidance embedding)
        mc = sm.Flux2(dict(FLUX2_CFG, guidance_embed=True))
    elif key == "flux2_klein":  # FLUX.2 Klein: the same class, no guidance embedding
        mc = sm.Flux2(dict(FLUX2_CFG, guidance_embed=False))
    elif key == "hunyuan_video15":
        mc = sm.HunyuanVideo15(with_host_fields(HUNYUAN_VIDEO15_CFG))
    elif key == "ltx2":
        mc = sm.LTXAV(dict(LTX2_CFG))
    elif key == "kandinsky5":
        mc = sm.Kandinsky5(dict(KANDINSKY5_CFG))
    else:
        raise KeyError(key)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device=cpu)
    init_weights(model.diffusion_model, seed=(ALL_KEYS + ("wan_vace",) + tuple(NEW_KEYS)).index(key) + 1)
    cache[key] = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return cache[key]


def conditioning(key, seed=0, batch=1, frames=9, height=64, width=64):
    """(positive, negative, latent) of the right shapes for the model."""
    import torch
    import comfy.clip_vision
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    t = (frames - 1) // 4 + 1
    if key in NEW_KEYS:
        return new_family_conditioning(key, rnd, batch, frames, height, width)
    if key.startswith("flux") or key in ("chroma", "qwen_image", "hunyuan_video"):
        if key.startswith("flux"):
            extra = lambda: {"pooled_output": rnd(1, 32), "guidance": 3.5}  # noqa: E731
        elif key == "hunyuan_video":
            extra = lambda: {"pooled_output": rnd(1, 32), "guidance": 6.0}  # noqa: E731
        else:  # T5 / Qwen2.5-VL encoders have no pooled output
            extra = lambda: {"pooled_output": None}  # noqa: E731
        pos = [[rnd(1, 8, 64), extra()]]
        neg = [[rnd(1, 8, 64), extra()]]
        shape = (batch, 16, t, height // 8, width // 8) if key == "hunyuan_video" else (batch, 16, height // 8, width // 8)
        return pos, neg, torch.zeros(shape)
    pos, neg = [[rnd(1, 12, 4096), {}]], [[rnd(1, 12, 4096), {}]]
    if key == "wan22_5b":  # 48 channels, 16x spatial compression
        return pos, neg, torch.zeros(batch, 48, t, height // 16, width // 16)
    latent = torch.zeros(batch, 16, t, height // 8, width // 8)
    if key == "wan_i2v":
        mask = torch.ones(1, 1, t, height // 8, width // 8)
        mask[:, :, :1] = 0.0
        clip = comfy.clip_vision.Output()
        clip["penultimate_hidden_states"] = rnd(1, 257, 1280)
        values = {"concat_latent_image": rnd(1, 16, t, height // 8, width // 8), "concat_mask": mask,
                  "clip_vision_output": clip}
        pos = [[pos[0][0], dict(values)]]
        neg = [[neg[0][0], dict(values)]]
    return pos, neg, latent


def new_family_conditioning(key, rnd, batch, frames, height, width):
    """(positive, negative, latent) for the families only newer ComfyUI has."""
    import torch
    t = (frames - 1) // 4 + 1
    if key.startswith("flux2"):  # 128-channel latent at 1/16; Qwen3 / Mistral text, no pooled output
        extra = {"guidance": 3.5} if key == "flux2" else {}
        return ([[rnd(1, 8, 64), dict(extra)]], [[rnd(1, 8, 64), dict(extra)]],
                torch.zeros(batch, 128, height // 16, width // 16))
    if key == "hunyuan_video15":  # 32-channel latent at 1/16 spatially, 1/4 in time
        return ([[rnd(1, 8, 64), {"pooled_output": None}]], [[rnd(1, 8, 64), {"pooled_output": None}]],
                torch.zeros(batch, 32, t, height // 16, width // 16))
    if key == "kandinsky5":  # HunyuanVideo's latent; Qwen2.5-VL text and a pooled CLIP vector
        return ([[rnd(1, 8, 64), {"pooled_output": rnd(1, 32)}]], [[rnd(1, 8, 64), {"pooled_output": rnd(1, 32)}]],
                torch.zeros(batch, 16, t, height // 8, width // 8))
    if key == "ltx2":  # video (128 ch at 1/32, 1/8 in time) and audio (8 ch x 16 bins) latents, as LTXVConcatAVLatent
        # makes; the text as the connectors return it (2 x caption_channels)
        import comfy.nested_tensor
        video = torch.zeros(batch, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
        audio = torch.zeros(batch, 8, 6, 16)
        extra = {"frame_rate": 25}
        return ([[rnd(1, 8, 128), dict(extra)]], [[rnd(1, 8, 128), dict(extra)]],
                comfy.nested_tensor.NestedTensor((video, audio)))
    raise KeyError(key)


class BlockCounter:
    """Counts calls of every transformer block (and of the diffusion model) by wrapping the
    instances' forward; a block DPCache skips is never called."""

    def __init__(self, model):
        import torch
        self.dm = model.model.diffusion_model
        self.blocks = []
        for attr in ("double_blocks", "single_blocks", "blocks", "transformer_blocks", "visual_transformer_blocks"):
            ml = getattr(self.dm, attr, None)
            if isinstance(ml, torch.nn.ModuleList):
                self.blocks += [(f"{attr}.{i}", m) for i, m in enumerate(ml)]
        self.counts = {name: 0 for name, _ in self.blocks}
        self.model_calls = 0
        self.batch_sizes = []

    def _wrap(self, module, name):
        inner = module.forward

        def counting(*args, **kwargs):
            if name is None:
                self.model_calls += 1
                x = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]  # LTX-2: [video, audio]
                self.batch_sizes.append(int(x.shape[0]))
            else:
                self.counts[name] += 1
            return inner(*args, **kwargs)

        module.forward = counting

    def __enter__(self):
        self._wrap(self.dm, None)
        for name, m in self.blocks:
            self._wrap(m, name)
        return self

    def __exit__(self, *exc):
        self.dm.__dict__.pop("forward", None)
        for _, m in self.blocks:
            m.__dict__.pop("forward", None)
        return False

    @property
    def total(self):
        return sum(self.counts.values())


def sample(model, key, steps=20, cfg=1.0, sampler="euler", scheduler="simple", seed=42, batch=1,
           height=64, width=64, frames=9, callback=None, noise_mask=None):
    """One KSampler-equivalent run (comfy.sample.sample) on the tiny model; returns the latent."""
    import comfy.sample
    pos, neg, latent = conditioning(key, batch=batch, height=height, width=width, frames=frames)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)  # as KSampler does (Qwen-Image: 3-D latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return flat(comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, seed=seed,
                                    disable_pbar=True, callback=callback, noise_mask=noise_mask))


def flat(out):
    """A sampled latent as one tensor: a NestedTensor (LTX-2's video + audio) flattened per batch row and joined."""
    import torch
    parts = getattr(out, "tensors", None)
    if parts is None:
        return out
    return torch.cat([t.reshape(t.shape[0], -1) for t in parts], 1)


def psnr(ref, out):
    import torch
    mse = torch.mean((ref.double() - out.double()) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)
