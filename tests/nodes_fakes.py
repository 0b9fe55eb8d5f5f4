"""Small fakes of the ComfyUI contracts the DPCache hooks rely on (no ComfyUI needed).

- a ModelPatcher with clone (deep-copied model_options, copied wrappers), set_model_patch_replace,
  add_wrapper_with_key and get_model_object;
- "FLUX" and "Wan" diffusion models whose block loops call ``patches_replace["dit"]`` with the same
  args / extra / return contract as comfy/ldm/flux/model.py and comfy/ldm/wan/model.py, with blocks
  that (like FLUX's) modify their inputs in place;
- a sampler loop: OUTER_SAMPLE wrappers around a run that calls the PREDICT_NOISE wrappers once per
  evaluation, then the model once (cond and uncond batched) or once per conditioning (split), each
  model call through the APPLY_MODEL wrappers (as comfy/model_base.py calls them);
- the two Skip Layer Guidance patterns of comfy_extras/nodes_slg.py: a second call for the positive
  conditioning in the same evaluation with some blocks replaced by a skip ("dit"), or the negative
  call made separately with some blocks skipped ("simple").
"""
from __future__ import annotations

import copy
import os
import sys
import uuid
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HIDDEN, TXT, IMG = 8, 3, 6


class Block(torch.nn.Module):
    """A residual block with a smooth dependence on sigma; modifies ``x`` in place like FLUX's."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        x += torch.tanh(x @ self.w) * (0.5 + sigma.reshape(-1, 1, 1))
        return x


class FakeFluxBase(torch.nn.Module):
    """FLUX / Chroma: double blocks on (img, txt), then single blocks on cat(txt, img)."""

    img_first = False  # HunyuanVideo's single stream is cat(img, txt)

    def __init__(self, depth=2, single=3):
        super().__init__()
        self.double_blocks = torch.nn.ModuleList(Block(i) for i in range(depth))
        self.single_blocks = torch.nn.ModuleList(Block(100 + i) for i in range(single))
        self.params = SimpleNamespace(guidance_embed=True)

    def forward(self, x, txt, sigma, to, control=None):
        rep = to.get("patches_replace", {}).get("dit", {})
        img = x.clone()
        txt = txt.clone()
        for i, block in enumerate(self.double_blocks):
            def original(a, block=block):
                return {"img": block(a["img"], sigma).clone(), "txt": block(a["txt"], sigma)}
            args = {"img": img, "txt": txt, "vec": sigma, "pe": None, "attn_mask": None, "transformer_options": to}
            if ("double_block", i) in rep:
                out = rep[("double_block", i)](args, {"original_block": original})
            else:
                out = original(args)
            img, txt = out["img"], out["txt"]
            if control is not None:
                img += control
        img_len = img.shape[1]
        img = torch.cat((img, txt), 1) if self.img_first else torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            def original(a, block=block):
                return {"img": block(a["img"], sigma)}
            args = {"img": img, "vec": sigma, "pe": None, "attn_mask": None, "transformer_options": to}
            img = rep[("single_block", i)](args, {"original_block": original})["img"] if ("single_block", i) in rep else original(args)["img"]
        return (img[:, :img_len] if self.img_first else img[:, txt.shape[1]:]) * 0.5


class FakeHunyuanBase(FakeFluxBase):
    img_first = True


class FakeQwenBase(torch.nn.Module):
    """Qwen-Image: one list of blocks returning (txt, img), both read back; then the non-replace
    ``patches["double_block"]`` after every block, like comfy/ldm/qwen_image/model.py."""

    def __init__(self, depth=3):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Block(300 + i) for i in range(depth))

    def forward(self, x, txt, sigma, to, control=None):
        rep = to.get("patches_replace", {}).get("dit", {})
        patches = to.get("patches", {})
        img, txt = x.clone(), txt.clone()
        for i, block in enumerate(self.transformer_blocks):
            def original(a, block=block):
                return {"txt": block(a["txt"].clone(), sigma), "img": block(a["img"].clone(), sigma)}
            args = {"img": img, "txt": txt, "vec": sigma, "pe": None, "transformer_options": to}
            out = rep[("double_block", i)](args, {"original_block": original}) if ("double_block", i) in rep else original(args)
            img, txt = out["img"], out["txt"]
            for p in patches.get("double_block", []):
                out = p({"img": img, "txt": txt, "x": x, "block_index": i, "transformer_options": to})
                img, txt = out["img"], out["txt"]
        return img * 0.5


class FakeWanBase(torch.nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(200 + i) for i in range(depth))

    def forward(self, x, txt, sigma, to, control=None):
        rep = to.get("patches_replace", {}).get("dit", {})
        x = x.clone()
        for i, block in enumerate(self.blocks):
            def original(a, block=block):
                return {"img": block(a["img"].clone(), sigma)}  # Wan blocks are out of place
            args = {"img": x, "txt": txt, "vec": sigma, "pe": None, "transformer_options": to}
            x = rep[("double_block", i)](args, {"original_block": original})["img"] if ("double_block", i) in rep else original(args)["img"]
        return x * 0.5


Flux = type("Flux", (FakeFluxBase,), {"__module__": "comfy.ldm.flux.model"})
Chroma = type("Chroma", (FakeFluxBase,), {"__module__": "comfy.ldm.chroma.model"})
HunyuanVideo = type("HunyuanVideo", (FakeHunyuanBase,), {"__module__": "comfy.ldm.hunyuan_video.model"})
QwenImageTransformer2DModel = type("QwenImageTransformer2DModel", (FakeQwenBase,), {"__module__": "comfy.ldm.qwen_image.model"})
WanModel = type("WanModel", (FakeWanBase,), {"__module__": "comfy.ldm.wan.model"})
VaceWanModel = type("VaceWanModel", (FakeWanBase,), {"__module__": "comfy.ldm.wan.model"})
UNetModel = type("UNetModel", (torch.nn.Module,), {"__module__": "comfy.ldm.modules.diffusionmodules.openaimodel"})


# The ComfyUI model class (ModelPatcher.model) around each fake diffusion model, as in comfy/model_base.py
BASE_CLASS = {"Flux": "Flux", "Chroma": "Chroma", "HunyuanVideo": "HunyuanVideo", "QwenImageTransformer2DModel": "QwenImage",
              "WanModel": "WAN21", "VaceWanModel": "WAN21_Vace"}


class FakePatcher:
    def __init__(self, dm, base=None):
        self.dm = dm
        base = base or BASE_CLASS.get(type(dm).__name__)
        self.model = type(base, (), {})() if base else None
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}

    def get_model_object(self, name):
        if name == "model_sampling":  # a flow model's sigma table: sigma = timestep, 1/1000 .. 1
            return SimpleNamespace(sigmas=torch.arange(1, 1001) / 1000.0)
        assert name == "diffusion_model"
        return self.dm

    def clone(self):
        n = FakePatcher(self.dm)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)  # what ComfyUI 0.3.64 does
        n.wrappers = {k: list(v) for k, v in self.wrappers.items()}
        if hasattr(self, "patches"):  # weight patches (LoRAs): copied per key like ModelPatcher.clone
            n.patches = {k: list(v) for k, v in self.patches.items()}
        if hasattr(self, "hook_patches"):  # weight hooks: {hook_ref: {key: [entries]}}, copied like ModelPatcher.clone
            n.hook_patches = {ref: {k: list(v) for k, v in keyed.items()} for ref, keyed in self.hook_patches.items()}
        return n

    def set_model_patch_replace(self, patch, name, block_name, number):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
        to["patches_replace"][name][(block_name, number)] = patch
        self.model_options["transformer_options"] = to

    def set_model_patch(self, patch, name):
        """A per-block patch (``patches[name]``), like ModelPatcher.set_model_double_block_patch."""
        to = dict(self.model_options["transformer_options"])
        to["patches"] = dict(to.get("patches", {}))
        to["patches"][name] = to["patches"].get(name, []) + [patch]
        self.model_options["transformer_options"] = to

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, []).append(fn)


class Executor:
    """Calls the wrappers in order, then ``fn``; ``class_obj`` is the guider."""

    def __init__(self, fn, class_obj, wrappers):
        self.fn, self.class_obj, self.wrappers = fn, class_obj, wrappers

    def __call__(self, *args, **kwargs):
        if not self.wrappers:
            return self.fn(*args, **kwargs)
        return self.wrappers[0](Executor(self.fn, self.class_obj, self.wrappers[1:]), *args, **kwargs)


class FakeSampler:
    def __init__(self, name, evals_per_step=1):
        self.evals_per_step = evals_per_step

        def fn():
            pass
        fn.__name__ = f"sample_{name}"
        self.sampler_function = fn


def skip_block(args, extra):
    """SkipLayerGuidance's replacement: the block's inputs, unchanged."""
    return args


def with_replacements(model_options, keys, fn=skip_block):
    """A copy of ``model_options`` with ``fn`` at the dit block ``keys`` (set_model_options_patch_replace)."""
    options = dict(model_options)
    to = dict(options["transformer_options"])
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["dit"] = dict(to["patches_replace"].get("dit", {}))
    for key in keys:
        to["patches_replace"]["dit"][key] = fn
    options["transformer_options"] = to
    return options


def sample(patcher, steps=10, cfg=2.0, batch=1, split=False, sampler="euler", evals_per_step=1,
           control=None, interrupt_at=None, context_handler=False, streams=None, img=IMG, window=None,
           last_single=False, sigmas=None, shift=None, seed=0, slg=None, slg_blocks=(("double_block", 1),),
           slg_sigmas=(0.0, 1.0)):
    """A sampling run of the fake model; returns the list of model outputs (one per evaluation), and
    keeps what the OUTER_SAMPLE wrappers returned (the sampler's output) in ``sample.last_output``.

    ``window=(start, end)``: only steps start..end-1 of the ``steps``, like KSamplerAdvanced.
    ``last_single``: the last step makes one evaluation (like heun's step to sigma 0).
    ``sigmas``: the run's sigmas (another scheduler); default ``steps`` evenly spaced from 1 to 0.
    ``shift``: shifted sigmas (another trajectory, like another scheduler); ``seed``: passed to the
    OUTER_SAMPLE wrappers like ComfyUI's guider does.

    ``slg="dit"``: after the normal call(s), the positive conditioning is called again with
    ``slg_blocks`` skipped (SkipLayerGuidanceDiT; that output is appended to the evaluation's);
    ``slg="simple"``: cond and uncond are called separately, uncond with ``slg_blocks`` skipped
    (SkipLayerGuidanceDiTSimple). Either only while the sigma is within ``slg_sigmas``."""
    dm = patcher.dm
    sigmas = torch.linspace(1.0, 0.0, steps + 1) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    if shift is not None:  # other sigmas (like another scheduler or shift): s' = shift s / (1 + (shift - 1) s)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if window is not None:
        sigmas = sigmas[window[0]:window[1] + 1]
    cond = {"uuid": uuid.uuid4(), "control": control}
    uncond = {"uuid": uuid.uuid4(), "control": control}
    chunks = [(1, uncond), (0, cond)] if cfg != 1.0 else [(0, cond)]
    if streams is not None:
        chunks = streams
    guider = SimpleNamespace(model_patcher=patcher, conds={"positive": [cond], "negative": [uncond]}, cfg=cfg)
    guider.model_options = copy.deepcopy(patcher.model_options)
    if context_handler:
        guider.model_options["context_handler"] = object()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, img, HIDDEN, generator=g)
    txt = torch.randn(batch, TXT, HIDDEN, generator=g)
    outputs = []

    def apply_model(x, t, c_concat, c_crossattn, control, transformer_options):
        return dm(x, c_crossattn, t, transformer_options, control)

    def model_call(x, sigma, model_options, parts):
        to = dict(model_options["transformer_options"])
        to.update(cond_or_uncond=[c for c, _ in parts], uuids=[p["uuid"] for _, p in parts], sigmas=sigma)
        n = len(parts)
        wrappers = patcher.wrappers.get("apply_model", [])
        return Executor(apply_model, dm, wrappers)(x.repeat(n, 1, 1), sigma.repeat(n * batch), None, txt.repeat(n, 1, 1), control, to)

    def predict_noise(x, sigma, model_options, seed):
        active = slg_sigmas[0] <= float(sigma[0]) <= slg_sigmas[1]
        if slg == "simple" and active:
            skipped = with_replacements(model_options, slg_blocks)
            return torch.cat([model_call(x, sigma, model_options if c == 0 else skipped, [(c, p)]) for c, p in chunks])
        if split:
            out = torch.cat([model_call(x, sigma, model_options, [p]) for p in chunks])
        else:
            out = model_call(x, sigma, model_options, chunks)
        if slg == "dit" and active:
            out = torch.cat([out, model_call(x, sigma, with_replacements(model_options, slg_blocks), [(0, cond)])])
        return out

    def outer_sample(noise, latent, sampler_obj, sigmas, *rest):
        options = guider.model_options
        options["transformer_options"]["sample_sigmas"] = sigmas
        x = noise
        n = 0
        for i in range(len(sigmas) - 1):
            for _ in range(1 if last_single and i == len(sigmas) - 2 else evals_per_step):
                if interrupt_at is not None and n == interrupt_at:
                    raise KeyboardInterrupt("interrupted")
                out = Executor(predict_noise, guider, patcher.wrappers.get("predict_noise", []))(x, sigmas[i:i + 1], options, 0)
                outputs.append(out)
                n += 1
            x = x + 0.01 * out[: x.shape[0]]
        return x

    sample.last_output = None
    sample.last_output = Executor(outer_sample, guider, patcher.wrappers.get("outer_sample", []))(
        x0, x0 * 0, FakeSampler(sampler, evals_per_step), sigmas, None, None, True, seed)
    sample.last_guider = guider
    return outputs


def block_calls(model):
    """Calls per fake block, by module name."""
    return {name: b.calls for name, b in model.dm.named_modules() if isinstance(b, Block)}


def reset_calls(model):
    for b in model.dm.modules():
        if isinstance(b, Block):
            b.calls = 0
