"""DPCache's replacement of every transformer block (``patches_replace["dit"]``), through the public patch API.

At key evaluations a block patch calls the original block (or the replacement another node put there
before), at skipped ones it passes its input through, and the last block returns the predicted cache
point. The patches only read the decision of the model call (``run_state.Call``) from
``transformer_options``; the sampling wrappers (``sampling_hooks``) make it. No ComfyUI import.
"""
from __future__ import annotations

import logging

from . import families, module_hooks

log = logging.getLogger("dpcache")

RUN_KEY = "dpcache_run"  # transformer_options key of the per-run state (set only during a run)
CALL_KEY = "dpcache_call"  # transformer_options key of the state of one model call (set only for that call)
PATCH_KEY = "dpcache"  # transformer_options marker of a patched model, and our wrapper key


class ModelInfo:
    """The family entry of a MODEL and the block keys to patch, in execution order."""

    def __init__(self, spec: families.Family, blocks: list[tuple[str, int]], detail: str):
        self.spec = spec
        self.family = spec.name
        self.blocks = blocks
        self.detail = detail


def model_info(model) -> ModelInfo:
    """The MODEL's entry in the families table; UnsupportedModelError saying what is supported otherwise."""
    return ModelInfo(*families.recognise(model))


def check_unpatched(model) -> None:
    """Refuse a MODEL that already went through a DPCache node (the hooks would fight)."""
    marker = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    if marker is not None:
        raise ValueError(
            f"this MODEL already went through '{marker}'; use one DPCache node per model "
            "(DPCache Calibrate and Apply DPCache cannot be chained)"
        )


@families.not_compiled
def call_block(prev, args, extra):
    """Run the block: through the replacement another node registered before us, if any."""
    if prev is not None:
        return prev(args, extra)
    return extra["original_block"](args)


def make_block_patch(key: tuple[str, int], first: bool, last: bool, prev=None, join=None, original=None):
    """The replacement for one block. Kept tiny: it runs for every block at every evaluation.

    It only reads the call's decision (made before the model runs, by the APPLY_MODEL wrapper)
    and touches no run state; torch.compile leaves it out (``families.not_compiled``) and compiles
    the block it calls. ``join``: "before" for the last block before a joined stream (it keeps the
    text it returns), "at" for the first block of it (it finds where the image tokens sit).
    ``original``: the ``original_block`` to give in place of the host's (``Family.original_blocks``).
    """

    @families.not_compiled
    def dpcache_block(args, extra):
        if original is not None:
            extra = dict(extra, original_block=original)
        call = args["transformer_options"].get(CALL_KEY)
        if call is None or call.inside:  # not a call of a DPCache run, or inside another node's replacement
            return call_block(prev, args, extra)
        if first:
            call.start(args)
        if join == "at":
            call.join(args)
        if last:
            return call.last_block(args, extra, prev)
        out = call_block(prev, args, extra) if call.compute else call.spec.passthrough(args)
        if join == "before":
            call.txt_out = out.get("txt")
        return out

    dpcache_block.dpcache_key = key
    return dpcache_block


def around_other(fn):
    """Another node's block replacement, called by ours: while it runs, a DPCache block patch it
    calls in turn (one it wrapped when it was added after Apply) only runs the block."""
    if fn is None:
        return None

    @families.not_compiled
    def other_block(args, extra):
        call = args["transformer_options"][CALL_KEY]
        call.inside = True
        try:
            return fn(args, extra)
        finally:
            call.inside = False

    return other_block


def patch_owner(fn) -> str:
    """Who made a patch, for messages: the node class of a closure (SkipLayerGuidanceDiT), or the patch's class."""
    name = getattr(fn, "__qualname__", None)
    if name is None:
        return type(fn).__name__
    return name.split(".<locals>")[0].rsplit(".", 1)[0] if ".<locals>" in name else name


class BlockPatches:
    """The block patches one DPCache node installed, and what each model call of a run gets.

    Another node may put its own replacement on one of our blocks after Apply, for every call
    (a node on the model line) or for one call only (Skip Layer Guidance edits the options of its
    extra call). ``for_call`` puts ours back around it, for that call only: at computed calls
    the other node's replacement runs in place of the block, at skipped ones nothing runs. The
    call then belongs to a *variant* of its stream with its own cache, so a positive call with
    layers skipped is never given the plain positive call's prediction.
    """

    def __init__(self, info: ModelInfo):
        self.keys = list(info.blocks)
        self.first, self.last = self.keys[0], self.keys[-1]
        self.spec = info.spec
        self.joins = dict(zip(info.spec.join_keys(self.keys), ("before", "at")))  # around a joined stream
        self.originals: dict = {}  # block key -> original_block given in place of the host's
        self.installed: dict = {}
        self.composed: dict = {}  # (key, id(other)) -> (other, our patch around it): the same function every call

    def install(self, model) -> None:
        """Patch every block of ``model`` (a clone), wrapping what was already there."""
        if self.spec.hook == families.MODULE:  # no dit routing: a stand-in module per block
            last = len(self.keys) - 1
            self.installed = module_hooks.install(model, self.spec, self.keys,
                                                  lambda n, key: make_block_patch(key, n == 0, n == last))
            return
        existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        self.originals = self.spec.original_blocks(model.get_model_object("diffusion_model"))
        for n, key in enumerate(self.keys):
            prev = existing.get(key)
            if prev is not None:
                log.info("DPCache: wrapping an existing replacement of %s %d", *key)
            patch = make_block_patch(key, n == 0, n == len(self.keys) - 1, prev, self.joins.get(key), self.originals.get(key))
            self.installed[key] = patch
            model.set_model_patch_replace(patch, "dit", *key)

    def around(self, key, other):
        entry = self.composed.get((key, id(other)))
        if entry is None or entry[0] is not other:
            if len(self.composed) > 256:
                self.composed.clear()
            entry = (other, make_block_patch(key, key == self.first, key == self.last, around_other(other),
                                             self.joins.get(key), self.originals.get(key)))
            self.composed[(key, id(other))] = entry
        return entry[1]

    def for_call(self, to: dict) -> tuple[dict, tuple]:
        """The block replacements a call should run with, and its variant: ((key, other node's
        replacement), ...) for our blocks another node replaced; () when every block is ours."""
        dit = to.get("patches_replace", {}).get("dit", {})
        if self.spec.hook == families.MODULE:  # the model reads no dit replacement: none to compose with
            return dit, ()
        variant = tuple((key, dit.get(key)) for key, mine in self.installed.items() if dit.get(key) is not mine)
        if not variant:
            return dit, ()
        dit = dict(dit)
        for key, other in variant:
            dit[key] = self.around(key, other)
        return dit, variant

    def __deepcopy__(self, memo):  # shared by the clones of a patched model, like the hooks
        return self


def describe_variant(variant) -> str:
    """"double_block 1, single_block 2 replaced by SkipLayerGuidanceDiT" for messages."""
    by_owner: dict[str, list] = {}
    for (kind, i), other in variant:
        by_owner.setdefault("the original block" if other is None else patch_owner(other), []).append(f"{kind} {i}")
    return "; ".join(f"{', '.join(keys)} replaced by {owner}" for owner, keys in by_owner.items())


BLOCK_PATCH_NAMES = ("double_block", "single_block")  # per-block patches: residuals added between blocks


def block_patch_owners(to: dict) -> tuple[str, ...]:
    """Who added per-block ``patches`` entries (e.g. the Qwen-Image DiffSynth ControlNet patch); () if none."""
    patches = to.get("patches") or {}
    return tuple(dict.fromkeys(patch_owner(p) for name in BLOCK_PATCH_NAMES for p in patches.get(name) or ()))
