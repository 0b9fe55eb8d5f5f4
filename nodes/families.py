"""The model families DPCache hooks, in one table (DESIGN §5): adding a family is adding an entry.

Each entry says how to recognise the family (the diffusion model's class, and where one class
serves several models, the ComfyUI model class around it), its block keys in execution order, where
the image tokens sit in the last block's output (the cache point), and what a skipped block returns.
What each family's ``patches_replace["dit"]`` hook receives and returns (ComfyUI 0.3.64 and 0.33):

| family | blocks (hook keys) | last block's stream | the model reads back |
| --- | --- | --- | --- |
| flux, flux2, chroma | double_blocks (double_block), single_blocks (single_block) | img = cat(txt, img) | double {img, txt}; single {img} |
| hunyuan_video, hunyuan_video15 | as FLUX | img = cat(img, txt) in 0.3.64, cat(txt, img) in 0.33 | as FLUX |
| qwen_image | transformer_blocks (double_block) | img | {img, txt} |
| wan, wan22_5b | blocks (double_block) | img | {img} |
| ltx2 | transformer_blocks (double_block) | img = (video, audio) | {img}: the tuple |
| kandinsky5 | visual_transformer_blocks (double_block) | x | {x} |

Where a joined stream (JOINED) puts its text tokens is not assumed: the first single block compares its
input with the text the last double block returned (``token_order``), once per run.

No ComfyUI import: the CPU tests drive this table with fakes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

ALL_TOKENS = "all"  # the last block's output is the image tokens alone
JOINED = "joined"  # text and image tokens in one stream; their order is found at run time
STREAMS = "streams"  # the blocks carry a tuple of streams (LTX-2: video, audio); all of them are the cache point
TXT_FIRST, IMG_FIRST = "txt_first", "img_first"  # the orders of a joined stream


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


def token_order(joined, txt) -> str:
    """Where the text tokens ``txt`` (what the last block before the streams join returned) sit in the
    joined stream's first input: TXT_FIRST, IMG_FIRST, or ALL_TOKENS when neither end holds them
    (the whole joined stream is then the cache point: always right, only larger)."""
    n, t = joined.shape[1], 0 if txt is None else txt.shape[1]
    if 0 < t < n and txt.shape == joined[:, :t].shape:
        if torch.equal(joined[:, :t], txt):
            return TXT_FIRST
        if torch.equal(joined[:, n - t:], txt):
            return IMG_FIRST
    return ALL_TOKENS


def direct_block(module, key: str):
    """An ``original_block`` that calls the block ``module`` itself, with the argument names its class's
    forward takes (read from the host's class): the args the model passes under the same names go by
    name, the others fill the remaining parameters in order (Kandinsky 5: x -> visual_embed,
    context -> text_embed). Returns ``{key: output}``, what the model reads back."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in list(inspect.signature(type(module).forward).parameters.values())[1:] if p.kind in kinds]

    @not_compiled
    def original_block(args):
        given = {n: args[n] for n in names if n in args}
        rest = [k for k in args if k not in given]
        given.update(zip([n for n in names if n not in given], (args[k] for k in rest)))
        return {key: module(**given)}

    return original_block


@dataclass(frozen=True)
class Family:
    """One entry of the table. ``name`` is the PACT's model_family: schedules are never shared across names."""

    name: str
    title: str  # what the user calls it, for messages and the README
    model_class: str  # class name of the diffusion model ...
    module_suffix: str  # ... and the end of its module name
    block_lists: tuple  # ((attribute, hook kind), ...) in execution order
    image_tokens: str = ALL_TOKENS  # what the last block's output holds besides the image tokens
    reads_txt: bool = False  # the model reads "txt" back from (double) blocks
    base_classes: tuple | None = None  # ComfyUI model classes (ModelPatcher.model) served; None: any
    stream_key: str = "img"  # the args / return key of the stream the blocks change
    direct_blocks: bool = False  # call the block modules directly: the host's block_wrap passes names they do not take

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

    def join_keys(self, keys) -> tuple:
        """(the last block before the streams join, the first block after) among the block ``keys`` of a
        joined family; () otherwise."""
        if self.image_tokens != JOINED:
            return ()
        (_, first_kind), (_, second_kind) = self.block_lists[:2]
        return [k for k in keys if k[0] == first_kind][-1], (second_kind, 0)

    def original_blocks(self, dm) -> dict:
        """{block key: original_block calling the module directly} where the host's own cannot be used; {} otherwise."""
        if not self.direct_blocks:
            return {}
        return {(kind, i): direct_block(m, self.stream_key) for attr, kind in self.block_lists for i, m in enumerate(getattr(dm, attr))}

    # ---- the cache point and the prediction; ``where`` is the (start, stop) of the image tokens in
    # ---- a joined stream (``locate``), None where the whole output is the cache point

    @staticmethod
    def locate(order: str, txt_len: int, length: int):
        """``where`` for a joined stream of ``length`` tokens, ``txt_len`` of them text, in ``order``."""
        if order == TXT_FIRST:
            return (txt_len, length)
        if order == IMG_FIRST:
            return (0, length - txt_len)
        return None

    @not_compiled
    def cache_point(self, img, where=None):
        """The image tokens of the last block's output ``img`` (what reaches the final layer); for a
        tuple of streams, every stream flattened per batch row and joined ([B, N])."""
        if self.image_tokens == STREAMS:
            return torch.cat([s.reshape(s.shape[0], -1) for s in img], 1)
        return img if where is None else img[:, where[0]:where[1]]

    @not_compiled
    def prediction_output(self, args, where=None):
        """(out, image): a new output shaped like the last block's input stream, in its dtype and on its
        device, with the text tokens copied from it, and the view of ``out`` where the image tokens
        (the prediction) go. New at every call: the model may modify what the block returns in place."""
        x = args[self.stream_key]
        if self.image_tokens == STREAMS:
            flat = torch.empty(x[0].shape[0], sum(s[0].numel() for s in x), dtype=x[0].dtype, device=x[0].device)
            out, at = [], 0
            for s in x:
                out.append(flat[:, at:at + s[0].numel()].view(s.shape))
                at += s[0].numel()
            return tuple(out), flat
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if where is None:
            return out, out
        start, stop = where
        out[:, :start] = x[:, :start]
        out[:, stop:] = x[:, stop:]
        return out, out[:, start:stop]

    @not_compiled
    def passthrough(self, args, img=None) -> dict:
        """A skipped block's return value: its inputs unchanged (``img`` replaced when given)."""
        if img is not None and self.image_tokens == STREAMS:  # each stream whole, in its own dtype
            img = tuple(v.to(dtype=s.dtype).contiguous() for v, s in zip(img, args[self.stream_key]))
        out = {self.stream_key: args[self.stream_key] if img is None else img}
        if self.reads_txt and "txt" in args:
            out["txt"] = args["txt"]
        return out


FLUX_BLOCKS = (("double_blocks", "double_block"), ("single_blocks", "single_block"))
WAN_BLOCKS = (("blocks", "double_block"),)

FAMILIES = (  # the first entry that recognises a model serves it
    # FLUX.2 dev and Klein: FLUX's class with global modulation, in ComfyUI's Flux2 model (before FLUX.1)
    Family("flux2", "FLUX.2", "Flux", "ldm.flux.model", FLUX_BLOCKS, JOINED, reads_txt=True, base_classes=("Flux2",)),
    Family("flux", "FLUX.1", "Flux", "ldm.flux.model", FLUX_BLOCKS, JOINED, reads_txt=True),
    Family("chroma", "Chroma", "Chroma", "ldm.chroma.model", FLUX_BLOCKS, JOINED, reads_txt=True),
    Family("hunyuan_video", "HunyuanVideo (T2V)", "HunyuanVideo", "ldm.hunyuan_video.model", FLUX_BLOCKS, JOINED,
           reads_txt=True, base_classes=("HunyuanVideo",)),
    Family("hunyuan_video15", "HunyuanVideo 1.5", "HunyuanVideo", "ldm.hunyuan_video.model", FLUX_BLOCKS, JOINED,
           reads_txt=True, base_classes=("HunyuanVideo15",)),
    Family("qwen_image", "Qwen-Image", "QwenImageTransformer2DModel", "ldm.qwen_image.model",
           (("transformer_blocks", "double_block"),), reads_txt=True),
    # Wan2.1 T2V/I2V and the Wan2.2 A14B experts (Wan2.1 architecture, ComfyUI class WAN21)
    Family("wan", "Wan2.1 / Wan2.2 A14B", "WanModel", "ldm.wan.model", WAN_BLOCKS, base_classes=("WAN21",)),
    Family("wan22_5b", "Wan2.2 TI2V 5B", "WanModel", "ldm.wan.model", WAN_BLOCKS, base_classes=("WAN22",)),
    # LTX-2 (audio + video): each block takes and returns img = (video, audio)
    Family("ltx2", "LTX-2", "LTXAVModel", "ldm.lightricks.av_model", (("transformer_blocks", "double_block"),), STREAMS),
    # Kandinsky 5: the stream is "x"; ComfyUI 0.33's block_wrap passes names its blocks do not take
    Family("kandinsky5", "Kandinsky 5", "Kandinsky5", "ldm.kandinsky5.model", (("visual_transformer_blocks", "double_block"),),
           stream_key="x", direct_blocks=True),
)
BY_NAME = {f.name: f for f in FAMILIES}

SUPPORTED = (
    "FLUX.1 (dev, schnell), FLUX.2 (dev, Klein), Chroma, HunyuanVideo (T2V), HunyuanVideo 1.5, Qwen-Image, "
    "Wan2.1 (T2V, I2V), Wan2.2 A14B (T2V, I2V: both experts), Wan2.2 TI2V 5B, LTX-2 and Kandinsky 5"
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
