"""CPU tier: families whose model routes no ``patches_replace["dit"]`` (Z-Image / Lumina 2's NextDiT,
Krea2), hooked by an object patch per block (nodes/module_hooks.py), on a fake NextDiT."""
from __future__ import annotations

import contextlib

import pytest
import torch

import nodes_fakes as F
from dpcache_core import Schedule
from nodes import block_patches, families, module_hooks
from nodes.dpcache_nodes import DPCacheApply


class Layer(F.Block):
    """A NextDiT layer: called as ``layer(x, mask, freqs, adaln, transformer_options=...)``."""

    def __init__(self, seed):
        super().__init__(seed)
        self.norm = torch.nn.LayerNorm(F.HIDDEN)  # a submodule with weights, like attention_norm1
        self.layer_id = seed

    def forward(self, x, mask, freqs, sigma, transformer_options=None):
        return super().forward(x.clone(), sigma) + 0 * self.norm.weight.sum()


class FakeNextDiT(torch.nn.Module):
    """The refiners on the image tokens, then cat(txt, img) through ``layers``; 0.5 x its image tokens out.
    Routes no dit replacement, like comfy/ldm/lumina/model.py."""

    def __init__(self, depth=3):
        super().__init__()
        self.noise_refiner = torch.nn.ModuleList([Layer(400)])
        self.layers = torch.nn.ModuleList(Layer(410 + i) for i in range(depth))

    def forward(self, x, txt, sigma, to, control=None):
        for layer in self.noise_refiner:
            x = layer(x, None, None, sigma, transformer_options=to)
        img = torch.cat((txt, x), 1)
        for layer in self.layers:
            img = layer(img, None, None, sigma, transformer_options=to)
        return img[:, txt.shape[1]:] * 0.5


NextDiT = type("NextDiT", (FakeNextDiT,), {"__module__": "comfy.ldm.lumina.model"})


class ObjectPatcher(F.FakePatcher):
    """FakePatcher with ComfyUI's object patches: ``add_object_patch`` and, while ``loaded()``, the
    patched objects set on the model (ModelPatcher.patch_model / unpatch_model)."""

    def __init__(self, dm, config="ZImage"):
        super().__init__(dm, base="Lumina2")
        self.model.model_config = type(config, (), {})()
        self.object_patches = {}

    def clone(self):
        n = super().clone()
        n.__class__ = ObjectPatcher
        n.model = self.model
        n.object_patches = dict(self.object_patches)
        return n

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name.startswith("diffusion_model."):
            obj = self.dm
            for part in name.split(".")[1:]:
                obj = getattr(obj, part)
            return obj
        return super().get_model_object(name)

    @contextlib.contextmanager
    def loaded(self):
        backup = {}
        for name, obj in self.object_patches.items():
            parent, attr = name.split(".")[1:-1], name.rsplit(".", 1)[1]
            holder = self.dm
            for part in parent:
                holder = getattr(holder, part)
            backup[(holder, attr)] = getattr(holder, attr)
            setattr(holder, attr, obj)
        try:
            yield self
        finally:
            for (holder, attr), obj in backup.items():
                setattr(holder, attr, obj)


def run(model, **kw):
    with model.loaded():
        return F.sample(model, **kw)


def apply(model, sched):
    return DPCacheApply().apply(model, sched)["result"][0]


def test_z_image_and_lumina2_are_told_apart_by_their_comfyui_config():
    assert block_patches.model_info(ObjectPatcher(NextDiT(), "ZImage")).family == "z_image"
    info = block_patches.model_info(ObjectPatcher(NextDiT(), "Lumina2"))
    assert info.family == "lumina2" and info.blocks == [("layer", i) for i in range(3)]
    assert info.spec.hook == families.MODULE and info.spec.module_name(("layer", 2)) == "diffusion_model.layers.2"
    with pytest.raises(families.UnsupportedModelError, match="NextDiT in a Lumina2 model"):
        block_patches.model_info(ObjectPatcher(NextDiT(), "SomeOtherLumina"))


def test_blocks_are_object_patched_and_no_dit_replacement_is_registered():
    model = ObjectPatcher(NextDiT())
    patched = apply(model, Schedule((0, 2), 4))
    assert sorted(patched.object_patches) == [f"diffusion_model.layers.{i}" for i in range(3)]
    assert not model.object_patches  # the input MODEL is untouched
    assert not patched.model_options["transformer_options"].get("patches_replace", {}).get("dit")
    for i, stand_in in enumerate(patched.object_patches[f"diffusion_model.layers.{i}"] for i in range(3)):
        assert isinstance(stand_in, module_hooks.BlockStandIn) and stand_in.dpcache_block is model.dm.layers[i]


def test_stand_in_shares_the_blocks_weights_under_their_names():
    """LoRAs and ComfyUI's loading address weights by name (diffusion_model.layers.0.norm.weight): the
    stand-in must show the same names and tensors, follow device/dtype moves, and call the block."""
    block = Layer(1)
    outer = torch.nn.ModuleList([block])
    stand_in = module_hooks.BlockStandIn(block, lambda args, extra: extra["original_block"](args))
    outer[0] = stand_in
    assert [n for n, _ in outer.named_parameters()] == ["0.norm.weight", "0.norm.bias"]
    assert outer[0].norm.weight is block.norm.weight and outer[0].layer_id == 1
    x, sigma = torch.randn(1, 4, F.HIDDEN), torch.tensor([0.5])
    before = block.calls
    assert torch.equal(stand_in(x, None, None, sigma, transformer_options={}), block(x, None, None, sigma))
    assert block.calls == before + 2
    outer.to(torch.float64)
    assert block.norm.weight.dtype == torch.float64
    # a stand-in is never wrapped in another: a model still loaded with an old one gives the block
    assert module_hooks.BlockStandIn(stand_in, None).dpcache_block is block


@pytest.mark.parametrize("cfg,split", [(1.0, False), (2.0, False), (2.0, True)])
def test_prediction_at_skips_refiners_every_call(cfg, split):
    """The layers run at key evaluations only, the refiner at every call; a skipped evaluation's output is
    the order-1 extrapolation of the key outputs (the last layer returns the prediction); K = T is exact."""
    model = ObjectPatcher(NextDiT())
    ref = run(model, steps=4, cfg=cfg, split=split)
    exact = run(apply(model, Schedule(tuple(range(4)), 4)), steps=4, cfg=cfg, split=split)
    assert all(torch.equal(a, b) for a, b in zip(ref, exact))
    F.reset_calls(model)
    out = run(apply(model, Schedule((0, 2), 4, order=1, first_full_steps=1)), steps=4, cfg=cfg, split=split)
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(out[3], 1.5 * out[2] - 0.5 * out[0])
    calls = 2 if split else 1
    assert [b.calls for b in model.dm.layers] == [2 * calls] * 3
    assert model.dm.noise_refiner[0].calls == 4 * calls
    assert all(not isinstance(m, module_hooks.BlockStandIn) for m in model.dm.layers)  # undone after the run
