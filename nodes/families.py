"""The model families DPCache hooks, in one table (DESIGN §5): adding a family is adding an entry.

Each entry says how to recognise the family (the diffusion model's class, and where one class
serves several models, the ComfyUI model class around it), its block keys in execution order, where
the image tokens sit in the last block's output (the cache point), and what a skipped block returns.
What each family's ``patches_replace["dit"]`` hook receives and returns (ComfyUI 0.3.64):

| family | blocks (hook keys) | last block's ``img`` | the model reads back |
| --- | --- | --- | --- |
| flux, chroma | double_blocks (double_block), single_blocks (single_block) | cat(txt, img) | double {img, txt}; single {img} |
| hunyuan_video | double_blocks (double_block), single_blocks (single_block) | cat(img, txt) | double {img, txt}; single {img} |
| qwen_image | transformer_blocks (double_block) | img | {img, txt} |
| wan, wan22_5b | blocks (double_block) | img | {img} |

No ComfyUI import: the CPU tests drive this table with fakes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALL_TOKENS, TXT_FIRST, IMG_FIRST = "all", "txt_first", "img_first"


def not_compiled(fn):
    """Leave ``fn``'s own frame out of torch.compile (TorchCompileModel); what it calls (a block) is
    still compiled. The hooks read per-call state that would otherwise become guards of compiled
    graphs; leaving them out keeps the compiled graphs those of the model alone, so nothing
    recompiles per step or per run."""
    try:
        return torch.compiler.disable(fn, recursive=False)
    except Exception:  # pragma: no cover - a torch without torch.compiler
        return fn


def never_compiled(fn):
    """Leave ``fn`` and everything it calls out of torch.compile: for the cache's own tensor work,
    which reads the run's evaluation index (a guard that would change at every step)."""
    try:
        return torch.compiler.disable(fn, recursive=True)
    except Exception:  # pragma: no cover - a torch without torch.compiler
        return fn


class UnsupportedModelError(ValueError):
    """The MODEL is not one DPCache knows how to hook."""

    __module__ = "dpcache"  # a stable name in ComfyUI's error dialog (not the pack's folder path)


@dataclass(frozen=True)
class Family:
    """One entry of the table. ``name`` is the PACT's model_family: schedules are never shared across names."""

    name: str
    title: str  # what the user calls it, for messages and the README
    model_class: str  # class name of the diffusion model ...
    module_suffix: str  # ... and the end of its module name
    block_lists: tuple  # ((attribute, hook kind), ...) in execution order
    image_tokens: str = ALL_TOKENS  # where the image tokens sit in the last block's img
    reads_txt: bool = False  # the model reads "txt" back from (double) blocks
    base_classes: tuple | None = None  # ComfyUI model classes (ModelPatcher.model) served; None: any

    def recognises(self, dm, base) -> bool:
        cls = type(dm)
        if cls.__name__ != self.model_class or not cls.__module__.endswith(self.module_suffix):
            return False
        return self.base_classes is None or base is None or type(base).__name__ in self.base_classes

    def blocks(self, dm) -> list[tuple[str, int]]:
        keys = []
        for attr, kind in self.block_lists:
            keys += [(kind, i) for i in range(len(getattr(dm, attr, None) or ()))]
        return keys

    def describe(self, dm) -> str:
        counts = " + ".join(f"{len(getattr(dm, attr, None) or ())} {attr.replace('_', ' ')}" for attr, _ in self.block_lists)
        return f"{self.title} ({counts})"

    # ---- the cache point and the prediction, given the text length seen at the first block

    @not_compiled
    def cache_point(self, img, txt_len: int):
        """The image tokens of the last block's output ``img`` (what reaches the final layer)."""
        if self.image_tokens == TXT_FIRST:
            return img[:, txt_len:]
        if self.image_tokens == IMG_FIRST:
            return img[:, : img.shape[1] - txt_len]
        return img

    @not_compiled
    def prediction_output(self, args, txt_len: int):
        """(out, image): a new tensor shaped like the last block's ``img`` input, in its dtype and on its
        device, with the text tokens copied from it, and the view of ``out`` where the image tokens
        (the prediction) go. New at every call: the model may modify what the block returns in place."""
        x = args["img"]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if self.image_tokens == TXT_FIRST:
            out[:, :txt_len] = x[:, :txt_len]
        elif self.image_tokens == IMG_FIRST:
            out[:, x.shape[1] - txt_len:] = x[:, x.shape[1] - txt_len:]
        return out, self.cache_point(out, txt_len)

    @not_compiled
    def passthrough(self, args, img=None) -> dict:
        """A skipped block's return value: its inputs unchanged (``img`` replaced when given)."""
        out = {"img": args["img"] if img is None else img}
        if self.reads_txt and "txt" in args:
            out["txt"] = args["txt"]
        return out


FLUX_BLOCKS = (("double_blocks", "double_block"), ("single_blocks", "single_block"))
WAN_BLOCKS = (("blocks", "double_block"),)

FAMILIES = (
    Family("flux", "FLUX.1", "Flux", "ldm.flux.model", FLUX_BLOCKS, TXT_FIRST, reads_txt=True),
    Family("chroma", "Chroma", "Chroma", "ldm.chroma.model", FLUX_BLOCKS, TXT_FIRST, reads_txt=True),
    Family("hunyuan_video", "HunyuanVideo (T2V)", "HunyuanVideo", "ldm.hunyuan_video.model", FLUX_BLOCKS, IMG_FIRST,
           reads_txt=True, base_classes=("HunyuanVideo",)),
    Family("qwen_image", "Qwen-Image", "QwenImageTransformer2DModel", "ldm.qwen_image.model",
           (("transformer_blocks", "double_block"),), reads_txt=True),
    # Wan2.1 T2V/I2V and the Wan2.2 A14B experts (Wan2.1 architecture, ComfyUI class WAN21)
    Family("wan", "Wan2.1 / Wan2.2 A14B", "WanModel", "ldm.wan.model", WAN_BLOCKS, base_classes=("WAN21",)),
    Family("wan22_5b", "Wan2.2 TI2V 5B", "WanModel", "ldm.wan.model", WAN_BLOCKS, base_classes=("WAN22",)),
)
BY_NAME = {f.name: f for f in FAMILIES}

SUPPORTED = (
    "FLUX.1 (dev, schnell), Chroma, HunyuanVideo (T2V), Qwen-Image, Wan2.1 (T2V, I2V), "
    "Wan2.2 A14B (T2V, I2V: both experts) and Wan2.2 TI2V 5B"
)
RESIDUAL_VARIANTS = (
    "Variants that add residuals or extra streams between blocks (Wan VACE, camera, S2V, HuMo, Animate) "
    "are not supported, since their injected features cannot be predicted"
)


def family(name: str) -> Family:
    """The entry for a PACT's model_family name."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown model family {name!r}; DPCache knows {', '.join(BY_NAME)}") from None


def recognise(model) -> tuple[Family, list[tuple[str, int]], str]:
    """(family entry, block keys in execution order, description) of a MODEL; a clear error otherwise."""
    dm = model.get_model_object("diffusion_model")
    base = getattr(model, "model", None)
    cls = type(dm)
    where = f"{cls.__module__}.{cls.__name__}"
    if base is not None:
        where += f" in a {type(base).__name__} model"
    for fam in FAMILIES:
        if fam.recognises(dm, base):
            blocks = fam.blocks(dm)
            if not blocks or any(len(getattr(dm, a, None) or ()) == 0 for a, _ in fam.block_lists):
                raise UnsupportedModelError(f"this {fam.title} model is missing transformer blocks: {fam.describe(dm)}")
            return fam, blocks, fam.describe(dm)
    raise UnsupportedModelError(
        f"DPCache supports {SUPPORTED}; this MODEL is {where}. {RESIDUAL_VARIANTS}. "
        "Remove the DPCache node for this model (it samples normally without it)."
    )
