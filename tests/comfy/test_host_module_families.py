"""Apply DPCache on the families whose model routes no ``patches_replace["dit"]`` inside a real ComfyUI:
Lumina 2 and Z-Image (``NextDiT``: ``layers`` plus the noise and context refiners) and Krea2
(``SingleStreamDiT``), tiny random-weight models of ComfyUI's own classes, each block hooked by an
object patch (nodes/module_hooks.py). Z-Image and Krea2 need ComfyUI 0.33 or later (skipped before).

Done-when of the module hook: euler 8 steps, cfg 1, ``(uniform)`` K = 8 of 8 gives the plain output bit
for bit and K = 5 runs to a finite output with 5 x blocks block calls; the automatic mode's run 1 is the
plain output and its run 2 is planned; the object patches are undone (the plain model after is unchanged)."""
from __future__ import annotations

import functools
import logging

import pytest

from comfy_host import MODULE_KEYS, BlockCounter, build_model, psnr, sample
from test_host_compose import runs  # noqa: F401  (the fixture run_case reads the run's report from)

pytestmark = pytest.mark.comfy

STEPS = 8
MIN_PSNR = 20.0  # dB against the plain run at K = 5 of 8 (the tiny models give 31-44 dB)


def apply(model, sched=None):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]()
    return node.apply(model, sched)["result"][0] if sched is not None else node.apply(model)[0]


def refiner_calls(model):
    """Calls of the refiner blocks (NextDiT's noise and context refiners; Krea2's text fusion blocks)."""
    dm = model.model.diffusion_model
    counts = []
    for attr in ("noise_refiner", "context_refiner"):
        counts += list(getattr(dm, attr, None) or ())
    fusion = getattr(dm, "txtfusion", None)
    if fusion is not None:
        counts += list(fusion.refiner_blocks)
    return counts


class CallCount:
    """Counts calls of some modules (forward hooks are not used by the pack; the test may)."""

    def __init__(self, modules):
        self.modules, self.n, self.handles = modules, 0, []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self.hit) for m in self.modules]
        return self

    def hit(self, *args):
        self.n += 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("key", MODULE_KEYS)
def test_module_family_uniform_k8_and_k5_of_8(host, key, cfg):
    model = build_model(key)
    info = host["block_patches"].model_info(model)
    assert info.family == key and info.spec.hook == "module"
    ref = sample(model, key, steps=STEPS, cfg=cfg)
    schedule = host["core"].Schedule
    with BlockCounter(model) as c_full:
        exact = sample(apply(model, schedule(tuple(range(STEPS)), STEPS)), key, steps=STEPS, cfg=cfg)
    assert (exact - ref).abs().max().item() == 0.0  # bit for bit
    blocks = len(c_full.counts)
    assert blocks == len(info.blocks) and c_full.total == STEPS * blocks

    keys = host["core"].uniform_key_steps(STEPS, 5)
    refiners = refiner_calls(model)
    with BlockCounter(model) as c5, CallCount(refiners) as r5:
        fast = sample(apply(model, schedule(tuple(keys), STEPS)), key, steps=STEPS, cfg=cfg)
    assert set(c5.counts.values()) == {5} and c5.total == 5 * blocks, c5.counts
    assert r5.n == STEPS * len(refiners)  # the refiners run at every call: their outputs feed the layers
    assert bool(fast.isfinite().all())
    db = psnr(ref, fast)
    print(f"\n[host] {key} cfg={cfg}: K=8/8 bit-identical; K=5/8 keys {list(keys)}: block calls {c5.total} of "
          f"{c_full.total} ({blocks} blocks), refiner calls {r5.n}, PSNR {db:.2f} dB")
    assert db > MIN_PSNR
    assert (sample(model, key, steps=STEPS, cfg=cfg) - ref).abs().max().item() == 0.0  # object patches undone


@pytest.mark.parametrize("key", MODULE_KEYS)
def test_module_family_automatic_mode(host, key, pact_dir, caplog):
    """Run 1 at a new setting is the plain output (calibration); run 2 (another seed) is planned."""
    model = build_model(key)
    patched = apply(model)
    ref = sample(model, key, steps=STEPS, seed=1)
    with BlockCounter(model) as c1:
        first = sample(patched, key, steps=STEPS, seed=1)
    assert (first - ref).abs().max().item() == 0.0
    blocks = len(c1.counts)
    assert c1.total == STEPS * blocks
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpcache"), BlockCounter(model) as c2:
        second = sample(patched, key, steps=STEPS, seed=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DPCache (auto)")]
    assert 0 < c2.total < STEPS * blocks and len(set(c2.counts.values())) == 1, c2.counts
    assert any("planned from auto_" in line for line in lines), lines
    db = psnr(sample(model, key, steps=STEPS, seed=2), second)
    print(f"\n[host] {key} automatic mode: run 1 block calls {c1.total} (plain output), run 2 {c2.total} of "
          f"{STEPS * blocks}, PSNR {db:.2f} dB")
    assert bool(second.isfinite().all())


@pytest.mark.parametrize("key", MODULE_KEYS)
def test_weight_patches_reach_the_blocks_under_a_stand_in(host, key):
    """A LoRA-like weight patch on a block's weight (addressed by its name, diffusion_model.<blocks>.0...)
    applies under DPCache's stand-in: K = T equals the patched plain model bit for bit, and differs from
    the unpatched one."""
    import torch
    model = build_model(key).clone()
    info = host["block_patches"].model_info(model)
    prefix = info.spec.module_name(info.blocks[0]) + "."
    name, weight = next((n, p) for n, p in model.model.named_parameters(prefix="")
                        if n.startswith(prefix) and p.ndim == 2)
    model.add_patches({name: (torch.full_like(weight, 0.05),)}, 1.0)
    plain = sample(build_model(key), key, steps=STEPS)
    ref = sample(model, key, steps=STEPS)
    exact = sample(apply(model, host["core"].Schedule(tuple(range(STEPS)), STEPS)), key, steps=STEPS)
    assert (exact - ref).abs().max().item() == 0.0 and (ref - plain).abs().max().item() > 0


def block_attention(target: str) -> bool:
    """The blocks' attention projections: NextDiT's ``layers.*.attention``, Krea2's ``blocks.*.attn``."""
    return (".layers." in target or ".blocks." in target) and ("attention." in target or ".attn." in target)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("node,key", [("ModelSamplingAuraFlow", "z_image"), ("LoRA (add_patches)", "z_image"),
                                      ("LoRA (add_patches)", "lumina2"), ("LoRA (add_patches)", "krea2")])
def test_module_family_with_model_line_nodes(host, runs, node, key, order):
    """The rows of docs/compatibility.md for these families (test_host_compose.run_case prints them)."""
    from test_host_compose import lora, model_sampling, run_case
    other = model_sampling("aura") if node == "ModelSamplingAuraFlow" else functools.partial(lora, where=block_attention)
    run_case(host, runs, node, key, order, other)


def test_z_image_block_patches_force_full_compute(host):
    """ComfyUI 0.33's NextDiT calls non-replace patches["double_block"] after every layer (the Z-Image Fun
    ControlNet model patch adds its features there): every evaluation is computed, and the output is the
    patched model's."""
    model = build_model("z_image").clone()
    calls = []

    def residual(args):
        calls.append(args["block_index"])
        return {"img": args["img"] + 0.01}

    model.set_model_double_block_patch(residual)
    ref = sample(model, "z_image", steps=STEPS)
    assert calls, "this NextDiT did not call the double_block patch"
    keys = host["core"].uniform_key_steps(STEPS, 5)
    with BlockCounter(model) as c:
        out = sample(apply(model, host["core"].Schedule(tuple(keys), STEPS)), "z_image", steps=STEPS)
    assert set(c.counts.values()) == {STEPS} and (out - ref).abs().max().item() == 0.0
    print(f"\n[host] z_image with a double_block patch: block calls {c.total}/{STEPS * len(c.counts)} (all computed)")
