"""Block hooks for models that route no ``patches_replace["dit"]`` (families with ``hook=MODULE``:
Z-Image and Lumina 2's ``NextDiT``, Krea2's ``SingleStreamDiT``).

Each block is stood in for by a ``BlockStandIn`` registered with ``ModelPatcher.add_object_patch``
(ComfyUI's public patch API: applied when the patched model loads, undone when another model or
clone takes its place). The stand-in shares the block's parameters, buffers and submodules, so the
weights keep their names (LoRAs, partial loading and device moves see the same tensors) and it
calls the block itself; it hands our block patch the same ``(args, extra)`` a ``dit`` replacement
gets, with ``args = {"img": the block's input, "transformer_options": ...}``. No model's forward is
replaced. No ComfyUI import: the CPU tests drive it with fakes.
"""
from __future__ import annotations

import torch


class BlockStandIn(torch.nn.Module):
    """Stands in for one transformer block: ``patch(args, extra)`` decides whether the block runs."""

    def __init__(self, block: torch.nn.Module, patch):
        super().__init__()
        block = original_block(block)
        object.__setattr__(self, "dpcache_block", block)  # not a child module: its weights keep their names
        object.__setattr__(self, "dpcache_patch", patch)
        self._parameters, self._buffers, self._modules = block._parameters, block._buffers, block._modules
        self._non_persistent_buffers_set = block._non_persistent_buffers_set

    def forward(self, x, *args, **kwargs):
        block = self.dpcache_block

        def run_block(a):
            return {"img": block(a["img"], *args, **kwargs)}

        hook_args = {"img": x, "transformer_options": kwargs.get("transformer_options") or {}}
        return self.dpcache_patch(hook_args, {"original_block": run_block})["img"]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("dpcache_block")
            if block is None:
                raise
            return getattr(block, name)  # the block's plain attributes (layer_id, modulation, ...)

    def extra_repr(self) -> str:
        return f"DPCache stand-in for {type(self.dpcache_block).__name__}"


def original_block(module):
    """The block itself under any DPCache stand-ins (a model still loaded with another patch's stand-ins)."""
    while isinstance(module, BlockStandIn):
        module = module.dpcache_block
    return module


def install(model, spec, keys, make_patch) -> dict:
    """Object-patch every block of ``keys`` on ``model`` (a clone) with a stand-in around
    ``make_patch(n, key)``; returns {key: patch}. What another node object-patched there before is
    what the stand-in calls."""
    installed = {}
    for n, key in enumerate(keys):
        name = spec.module_name(key)
        patch = make_patch(n, key)
        installed[key] = patch
        model.add_object_patch(name, BlockStandIn(model.get_model_object(name), patch))
    return installed
