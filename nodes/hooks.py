"""The DPCache hooks inside ComfyUI's sampling (DESIGN §3), through the public patch API only.

Three pieces, registered on a clone of the MODEL:

- an OUTER_SAMPLE wrapper creates the per-run state before sampling and frees it in ``finally``
  (nothing survives a run, finished or interrupted);
- a PREDICT_NOISE wrapper advances the evaluation counter once per sampler evaluation, so cond and
  uncond (batched in one call or split into several) always agree on key-or-skip;
- a replacement for every transformer block (``patches_replace["dit"]``): at key evaluations it
  calls the original block (or the replacement another node put there before), at skipped ones it
  passes its input through, and the last block returns the predicted cache point.

No ComfyUI import at module level: the CPU tests drive these functions with small fakes.
"""
from __future__ import annotations

import logging
import os
import re
import textwrap
import time

import torch

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core.replay import replay_sample
    from ..dpcache_core import CacheRun, PactAccumulator, PactFileError, ScheduleMismatchError, TrajectoryRecorder, history_fits, load_pact, save_pact
    from ..dpcache_core import windows
    from ..dpcache_core.pact import default_max_gap
    from ..dpcache_core.replan import RunShape, joint_trajectory, plan_run
    from ..dpcache_core.runtime import DEFAULT_SAMPLE_SEED, DEFAULT_SAMPLE_SIZE, mismatch_message
    from ..dpcache_core.store import combine_sampling
    from ..dpcache_core.transfer import positions_from_sigmas, spread_ties
    from ..dpcache_core.settings import sample_record, sigmas_hash as settings_sigmas_hash, with_record
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core.replay import replay_sample
    from dpcache_core import CacheRun, PactAccumulator, PactFileError, ScheduleMismatchError, TrajectoryRecorder, history_fits, load_pact, save_pact
    from dpcache_core import windows
    from dpcache_core.pact import default_max_gap
    from dpcache_core.replan import RunShape, joint_trajectory, plan_run
    from dpcache_core.runtime import DEFAULT_SAMPLE_SEED, DEFAULT_SAMPLE_SIZE, mismatch_message
    from dpcache_core.store import combine_sampling
    from dpcache_core.transfer import positions_from_sigmas, spread_ties
    from dpcache_core.settings import sample_record, sigmas_hash as settings_sigmas_hash, with_record

from . import families
from .sampler_counts import expected_evaluations, is_rectified_flow, sampler_name
from .families import UnsupportedModelError  # noqa: F401  (re-exported: the nodes' error for an unknown model)

log = logging.getLogger("dpcache")

RUN_KEY = "dpcache_run"  # transformer_options key of the per-run state (set only during a run)
CALL_KEY = "dpcache_call"  # transformer_options key of the state of one model call (set only for that call)
PATCH_KEY = "dpcache"  # transformer_options marker of a patched model, and our wrapper key



# --------------------------------------------------------------------------------------------
# Which model is this (the families table is nodes/families.py)


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


# --------------------------------------------------------------------------------------------
# Block replacements


@families.not_compiled
def call_block(prev, args, extra):
    """Run the block: through the replacement another node registered before us, if any."""
    if prev is not None:
        return prev(args, extra)
    return extra["original_block"](args)


def make_block_patch(key: tuple[str, int], first: bool, last: bool, prev=None):
    """The replacement for one block. Kept tiny: it runs for every block at every evaluation.

    It only reads the call's decision (made before the model runs, by the APPLY_MODEL wrapper)
    and touches no run state; torch.compile leaves it out (``families.not_compiled``) and compiles
    the block it calls.
    """

    @families.not_compiled
    def dpcache_block(args, extra):
        call = args["transformer_options"].get(CALL_KEY)
        if call is None or call.inside:  # not a call of a DPCache run, or inside another node's replacement
            return call_block(prev, args, extra)
        if first:
            call.start(args)
        if last:
            return call.last_block(args, extra, prev)
        if call.compute:
            return call_block(prev, args, extra)
        return call.spec.passthrough(args)

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
        self.installed: dict = {}
        self.composed: dict = {}  # (key, id(other)) -> (other, our patch around it): the same function every call

    def install(self, model) -> None:
        """Patch every block of ``model`` (a clone), wrapping what was already there."""
        existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for n, key in enumerate(self.keys):
            prev = existing.get(key)
            if prev is not None:
                log.info("DPCache: wrapping an existing replacement of %s %d", *key)
            patch = make_block_patch(key, n == 0, n == len(self.keys) - 1, prev)
            self.installed[key] = patch
            model.set_model_patch_replace(patch, "dit", *key)

    def around(self, key, other):
        entry = self.composed.get((key, id(other)))
        if entry is None or entry[0] is not other:
            if len(self.composed) > 256:
                self.composed.clear()
            entry = (other, make_block_patch(key, key == self.first, key == self.last, around_other(other)))
            self.composed[(key, id(other))] = entry
        return entry[1]

    def for_call(self, to: dict) -> tuple[dict, tuple]:
        """The block replacements a call should run with, and its variant: ((key, other node's
        replacement), ...) for our blocks another node replaced; () when every block is ours."""
        dit = to.get("patches_replace", {}).get("dit", {})
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


# --------------------------------------------------------------------------------------------
# Per-run state


def split_streams(to: dict, x, variant=()) -> tuple[list, int]:
    """One stream per batch chunk (cond / uncond / extra conds) of a model call with input ``x``:
    (stream keys, rows per chunk).

    A stream is (uuid, input shape of one chunk), plus the call's variant (the blocks another
    node replaced for it) when there is one, so a cache is only ever used for the same
    conditioning, at the same resolution and batch size, through the same blocks.
    """
    uuids = list(to.get("uuids") or [None])
    rows = x.shape[0]
    if rows % len(uuids):
        uuids, chunk = [tuple(uuids)], rows
    else:
        chunk = rows // len(uuids)
    shape = (chunk, *x.shape[1:])
    tail = (variant,) if variant else ()
    return [(u, shape, *tail) for u in uuids], chunk


class Call:
    """One model call inside a sampler evaluation. The APPLY_MODEL wrapper makes it before the
    model runs, with the run's decision for the call (compute or predict, the prediction, which
    caches it feeds); the blocks read it from ``transformer_options`` and only write back what
    they saw (the text length, that the first and last blocks ran, the cache-point feature).
    Its fields are plain values and tensors: torch.compile guards on ``compute`` alone."""

    def __init__(self, spec, position: int, variant=(), streams=(), chunk=0, last=(None, None)):
        self.spec = spec
        self.position = position  # the call's place in its evaluation
        self.variant = variant  # ((block key, other node's replacement), ...), () when every block is ours
        self.streams, self.chunk = list(streams), chunk
        self.last_key, self.last_patch = last  # our last block, and what it must be when the first runs
        self.compute = True  # whether the blocks run (False: skip them, the last returns ``prediction``)
        self.record = False  # keep the last block's cache point in ``feature``
        self.update: tuple = ()  # streams whose cache ``feature`` feeds
        self.predict = None  # a skipped call's predictor: predict(stream, out=...) writes its cache point
        self.inside = False  # another node's replacement of one of our blocks is running
        self.begun = False  # our first block ran
        self.finished = False  # our last block ran
        self.replaced_under_us = False  # our last block was not in this call's patches when the first ran
        self.txt_len = 0
        self.feature = None

    @families.not_compiled
    def start(self, args) -> None:
        """At the first block: the text length, and a check that our last block will run."""
        self.begun = True
        txt = args.get("txt")
        self.txt_len = txt.shape[1] if txt is not None else 0  # text tokens beside the image in single blocks
        dit = args["transformer_options"].get("patches_replace", {}).get("dit", {})
        if dit.get(self.last_key) is not self.last_patch:  # replaced inside the call: compute it all, keep nothing
            self.replaced_under_us = True
            self.compute, self.record = True, False

    @families.not_compiled
    def last_block(self, args, extra, prev):
        self.finished = True
        if self.compute:
            out = call_block(prev, args, extra)
            if self.record:
                self.feature = self.spec.cache_point(out["img"], self.txt_len)
            return out
        out, image = self.spec.prediction_output(args, self.txt_len)  # new per call, in the blocks' dtype and device
        self.predict_into(image)
        return self.spec.passthrough(args, out)

    @families.never_compiled
    def predict_into(self, image) -> None:
        """Each stream's prediction straight into its slice of ``image`` (no extra copy)."""
        for stream, part in self.chunks(image):
            self.predict(stream, out=part)

    def chunks(self, feature):
        for n, stream in enumerate(self.streams):
            yield stream, feature[n * self.chunk:(n + 1) * self.chunk]


class RunState:
    """What every run shares: the family entry, the evaluation's calls, and the calls' report."""

    def __init__(self, family: str):
        self.family = family
        self.spec = families.family(family)
        self.calls_in_evaluation = 0
        self.fed: set = set()  # streams whose cache took this evaluation's feature already
        self.full_calls: dict[str, int] = {}  # why calls were computed in full where the plan would predict them
        self.variants: dict = {}  # call variants seen: variant -> description
        self.computed_calls = 0  # model calls whose blocks ran
        self.predicted_calls = 0  # model calls whose last block returned a prediction

    def new_evaluation(self) -> None:
        self.calls_in_evaluation = 0
        self.fed = set()

    def open_call(self, to: dict, x, variant=(), block_patches=(), control=False, last=(None, None), dtype=None) -> Call:
        """The state of a model call about to run (input ``x``, options ``to``), with the run's decision."""
        streams, chunk = split_streams(to, x, variant)
        call = Call(self.spec, self.calls_in_evaluation, variant, streams, chunk, last)
        self.calls_in_evaluation += 1
        if variant and variant not in self.variants:
            self.variants[variant] = describe_variant(variant)
        self.decide(call, block_patches, control, x.device, dtype or x.dtype)
        self.fed.update(call.update)
        return call

    def decide(self, call: Call, block_patches, control, device, dtype) -> None:
        raise NotImplementedError

    def close_call(self, call: Call) -> None:
        """After the model call: check what its blocks saw, and feed the caches."""
        if not call.compute and not call.finished:
            raise RuntimeError("DPCache skipped the blocks of a model call whose last block did not run; another "
                               "node replaced the model's blocks inside the call. Remove that node or Apply DPCache")
        if call.replaced_under_us:
            self.note_full("its last block was replaced by another node inside the model call")
        elif not call.begun or not call.finished:
            self.note_full("our first or last block did not run (another node replaced it inside the model call)")
        if call.compute:
            self.computed_calls += 1
        else:
            self.predicted_calls += 1
        if call.feature is not None:
            for stream, feature in call.chunks(call.feature):
                if stream in call.update:
                    self.feed(stream, feature)
            call.feature = None

    def feed(self, stream, feature) -> None:
        raise NotImplementedError

    def note_full(self, reason: str) -> None:
        if reason not in self.full_calls:
            log.info("DPCache: computing a model call in full: %s", reason)
        self.full_calls[reason] = self.full_calls.get(reason, 0) + 1

    def calls_expected(self) -> int:
        """Model calls one per evaluation would make (more: split cond/uncond, or extra calls of other nodes)."""
        return self.evaluations

    def report(self) -> str:
        """What the calls did besides the plan, for the run's one-line report ("" when nothing)."""
        parts = []
        if self.computed_calls + self.predicted_calls > self.calls_expected():
            parts.append(f"{self.computed_calls + self.predicted_calls} model calls: {self.computed_calls} computed, "
                         f"{self.predicted_calls} predicted")
        if self.variants:
            parts.append("separate caches for calls whose blocks another node replaced ("
                         + "; ".join(sorted(set(self.variants.values()))) + ")")
        if self.full_calls:
            parts.append(f"{sum(self.full_calls.values())} model calls computed in full, not predicted ("
                         + "; ".join(f"{n}: {why}" for why, n in self.full_calls.items()) + ")")
        return "; ".join(parts)


class ApplyRun(RunState):
    """Apply DPCache during one sampling run: key evaluations compute, the others predict."""

    def __init__(self, family: str, schedule, force_all: bool = False, sampler: str | None = None, plan_text: str = ""):
        super().__init__(family)
        self.cache = CacheRun(schedule)
        self.force_all = force_all
        self.sampler = sampler
        self.plan_text = plan_text
        self.marks: list[tuple[float, bool]] = []  # (start time, key?) of every evaluation: the measured speed-up

    def start_evaluation(self, sigma=None) -> None:
        try:
            key = self.cache.start_evaluation()
        except ScheduleMismatchError:
            num_evals = self.cache.schedule.num_evals
            raise ScheduleMismatchError(
                f"this sampling run ({self.sampler or 'a sampler'} whose evaluation count is only known while it "
                f"samples) makes at least {num_evals + 1} model evaluations but the DPCache schedule was made for "
                f"T={num_evals}: use a sampler whose count follows from its steps (listed in docs/errors-and-samplers.md; its count "
                f"is checked before sampling), or calibrate a PACT with this sampler and raise total_evaluations"
            ) from None
        if not key and self.force_all:
            self.cache.force_key()
        self.marks.append((time.perf_counter(), bool(self.cache.is_key)))
        self.new_evaluation()

    def measured_speedup(self) -> float | None:
        """T x (mean time of a computed evaluation) / the run's time: the speed-up over computing all,
        estimated from this run alone (its first evaluation left out: it carries warm-up)."""
        if len(self.marks) < 3:
            return None
        ends = [t for t, _ in self.marks[1:]] + [time.perf_counter()]
        spans = [(e - s, key) for (s, key), e in zip(self.marks, ends)][1:]
        keyed = [d for d, key in spans if key]
        total = sum(d for d, _ in spans)
        if not keyed or total <= 0:
            return None
        return len(spans) * (sum(keyed) / len(keyed)) / total

    def decide(self, call: Call, block_patches, control, device, dtype) -> None:
        """Whether the call's blocks compute and which caches it feeds (once per call, before it runs).

        A repeated call for a stream already fed at this evaluation computes without feeding it
        again (key evaluations) or gets the same prediction (skipped ones)."""
        new = tuple(s for s in call.streams if s not in self.fed)
        predict = False
        if block_patches:  # residuals added between blocks: never predicted, never cached
            self.note_full(f"per-block patches of {', '.join(block_patches)}")
        elif self.cache.is_key:
            call.update = new
        elif control:
            self.note_full("ControlNet residuals")
        elif all(self.cache.has_stream(s) for s in call.streams):
            predict = True
        else:
            call.update = new
            self.note_full("a conditioning or call variant not seen at a key evaluation yet")
        call.record = bool(call.update)
        if predict:
            call.compute = False
            call.predict = self.cache.predict  # at the last block, into the output it returns (no extra copy)

    def feed(self, stream, feature) -> None:
        self.cache.update(stream, feature)

    @property
    def evaluations(self) -> int:
        return self.cache.index + 1

    def summary(self) -> str:
        line = self.cache.summary()
        if self.plan_text:
            line = f"{self.plan_text}. {line}"
        extra = self.report()
        return f"{line}; {extra}" if extra else line

    def close(self) -> None:
        self.cache.close()


class CalibrateRun(RunState):
    """DPCache Calibrate during one sampling run: compute everything, record the cache point."""

    def __init__(self, family: str, storage_device="cpu", sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = DEFAULT_SAMPLE_SEED,
                 expected_evals: int | None = None):
        super().__init__(family)
        self.recorder = TrajectoryRecorder(storage_device=storage_device, sample_size=sample_size, seed=seed,
                                           expected_evals=expected_evals)
        self.sigmas: list[float] = []
        self.announce = None  # called once with what the first evaluation kept (``sample_description``)
        self.names: dict = {}  # recorder key -> stream
        self.seen: dict = {}  # recorder key -> evaluations it came at

    def start_evaluation(self, sigma=None) -> None:
        if self.announce is not None and self.recorder.num_evals == 1:  # the first evaluation is recorded
            self.announce(self.recorder.sample_description())
            self.announce = None
        self.recorder.start_evaluation()
        self.sigmas.append(float(sigma.reshape(-1)[0]) if sigma is not None else float("nan"))
        self.new_evaluation()

    def decide(self, call: Call, block_patches, control, device, dtype) -> None:
        """Every block computes; the call records the streams it is the first to bring this evaluation."""
        call.update = tuple(s for s in call.streams if s not in self.fed)
        call.record = bool(call.update)

    @staticmethod
    def recorder_key(stream):
        """The recorder's stream name: the conditioning's uuid, with the call's variant if any."""
        return stream[0] if len(stream) == 2 else (stream[0], stream[2])

    def feed(self, stream, feature) -> None:
        key = self.recorder_key(stream)
        self.recorder.record(key, feature)
        self.names.setdefault(key, stream)
        self.seen[key] = self.seen.get(key, 0) + 1

    def dropped(self) -> list[str]:
        """The streams left out of the PACT (not seen at every evaluation, or changing shape), described."""
        complete = set(self.recorder.complete_streams())
        out = []
        for key, n in self.seen.items():
            if key in complete:
                continue
            stream = self.names[key]
            what = f"a call variant ({self.variants.get(stream[2], 'blocks replaced')})" if len(stream) > 2 else "a conditioning"
            out.append(f"{what}, seen at {n} of {self.recorder.num_evals} evaluations")
        return out

    def report(self) -> str:
        return "; ".join(f"{n} model calls not recorded: {why}" for why, n in self.full_calls.items())

    def streams_text(self) -> str:
        """How many streams the PACT sample averages, naming the call variants among them."""
        complete = self.recorder.complete_streams()
        variants = sorted({self.variants[k[1]] for k in complete if isinstance(k, tuple) and k[1] in self.variants})
        text = f"{len(complete)} streams averaged"
        return text + (f" (with calls whose {'; '.join(variants)})" if variants else "")

    @property
    def evaluations(self) -> int:
        return self.recorder.num_evals

    def close(self) -> None:
        self.recorder.close()


# --------------------------------------------------------------------------------------------
# Sampling wrappers


def evaluation_sigmas(sampler, sigmas, rectified_flow: bool = True) -> list[float] | None:
    """The sigma of every model evaluation of the run, when known before sampling, else None."""
    count = expected_evaluations(sampler, sigmas, rectified_flow)
    if count is None:
        return None
    s = [float(x) for x in sigmas.reshape(-1)]
    steps = len(s) - 1
    if count == steps:
        return s[:-1]
    name = sampler_name(sampler)
    if name == "heun":  # the corrector evaluates at the next sigma (none on the last step to 0)
        return [x for i in range(steps) for x in ([s[i], s[i + 1]] if s[i + 1] != 0 else [s[i]])]
    if name == "dpm_2":  # the midpoint evaluates at the geometric mean of the two sigmas
        return [x for i in range(steps) for x in ([s[i], (s[i] * s[i + 1]) ** 0.5] if s[i + 1] != 0 else [s[i]])]
    return None


def sigma_table(guider):
    """The model's ascending sigma table (``model_sampling.sigmas``), or None."""
    try:
        table = guider.model_patcher.get_model_object("model_sampling").sigmas
        return table.detach().float().cpu().numpy()
    except Exception:
        return None


def run_shape(guider, sampler, sigmas) -> RunShape | None:
    """Evaluation count and normalised positions of the run (None when the count is not known up front).

    Positions come from each evaluation's sigma through the model's sigma table; a run whose
    first sigma is below sigma_max or whose last is above 0 samples a window of the trajectory.
    Without a sigma table, or a sampler whose evaluation sigmas are unknown, the positions are
    evenly spaced over the window.
    """
    rectified_flow = is_rectified_flow(guider.model_patcher)
    count = expected_evaluations(sampler, sigmas, rectified_flow)
    if count is None:
        return None
    table = sigma_table(guider)
    if table is None:
        return RunShape(count)
    ends = positions_from_sigmas([float(sigmas.reshape(-1)[0]), float(sigmas.reshape(-1)[-1])], table)
    evals = evaluation_sigmas(sampler, sigmas, rectified_flow)
    if evals is None:
        start, end = float(ends[0]), float(ends[1])
        positions = [start + (end - start) * k / count for k in range(count)]
    else:
        positions = spread_ties(positions_from_sigmas(evals, table))
    return RunShape(count, tuple(float(p) for p in positions), float(ends[1]))


def uses_controlnet(guider) -> bool:
    conds = getattr(guider, "conds", None) or {}
    return any(isinstance(c, dict) and c.get("control") is not None for cs in conds.values() for c in (cs or []))


NODE_TEXT_WIDTH = 30  # characters per line that fit a node of default width in ComfyUI's text widget


def wrap_for_node(text: str, width: int = NODE_TEXT_WIDTH) -> str:
    """``text`` broken into lines at spaces: ComfyUI's node text widget breaks lines anywhere
    (CSS break-all), even inside a number, unless each line fits."""
    return "\n".join(textwrap.fill(part, width, break_long_words=False, break_on_hyphens=False)
                     for part in text.split("\n"))


def send_text(text: str, node_id) -> None:
    """Text on the node in the browser, in lines that fit (guarded: no server in headless use)."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(wrap_for_node(text), node_id)
    except Exception:  # pragma: no cover - UI feedback is best effort
        pass


def send_event(event: str, data: dict) -> None:
    """A websocket event for the frontend extension (guarded like ``send_text``)."""
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_sync(event, data)
    except Exception:  # pragma: no cover - UI feedback is best effort
        pass


def report_event(node_ids, key_steps, num_evals: int, computed: int, skipped: int, summary: str, source: str,
                 measured: float | None = None) -> None:
    """The plan that ran: ``summary`` on each node that fed the run (Apply DPCache, and the DPCache
    Schedule behind it), and the websocket event the frontend redraws that plan from."""
    nodes = [str(n) for n in node_ids if n is not None]
    for n in nodes:
        send_text(summary, n)
    if nodes:
        keys = list(key_steps)
        send_event("dpcache.run", {
            "node": nodes[0], "nodes": nodes, "computed": computed, "skipped": skipped, "num_evals": num_evals,
            "key_steps": keys, "ideal_speedup": round(num_evals / max(len(keys), 1), 4), "source": source,
            "measured_speedup": None if measured is None else round(measured, 3), "summary": summary})


def options_with_run(options: dict, run) -> dict:
    """A copy of the guider's model_options carrying ``run`` (the original is restored afterwards)."""
    new = dict(options)
    new["transformer_options"] = dict(options.get("transformer_options", {}))
    new["transformer_options"][RUN_KEY] = run
    return new


def run_from(executor, args) -> RunState | None:
    options = args[2] if len(args) > 2 and isinstance(args[2], dict) else executor.class_obj.model_options
    return options.get("transformer_options", {}).get(RUN_KEY)


def compute_dtype(base, x):
    """The dtype the diffusion model computes in (what BaseModel._apply_model casts its input to)."""
    try:
        return base.manual_cast_dtype or base.get_dtype()
    except AttributeError:  # CPU fakes
        return x.dtype


def make_apply_model_wrapper(patches: BlockPatches):
    """The APPLY_MODEL wrapper: once per model call, before any block, make the call's state (the
    ``Call`` its blocks read from ``transformer_options``) with the run's decision, and put our
    blocks back around any replacement another node made for this call; after it, feed the caches."""

    def dpcache_apply_model(executor, *args, **kwargs):
        named = "transformer_options" in kwargs
        to = kwargs["transformer_options"] if named else (args[5] if len(args) > 5 else None)
        run = to.get(RUN_KEY) if isinstance(to, dict) else None
        if run is None:
            return executor(*args, **kwargs)
        dit, variant = patches.for_call(to)
        to = dict(to)
        if variant:
            to["patches_replace"] = dict(to.get("patches_replace", {}), dit=dit)
        control = kwargs.get("control", args[4] if len(args) > 4 else None)
        x = args[0]
        call = run.open_call(to, x, variant, block_patch_owners(to), control is not None,
                             (patches.last, dit.get(patches.last)), compute_dtype(executor.class_obj, x))
        to[CALL_KEY] = call
        if named:
            kwargs["transformer_options"] = to
        else:
            args = (*args[:5], to, *args[6:])
        out = executor(*args, **kwargs)
        run.close_call(call)
        return out

    return dpcache_apply_model


def predict_noise_wrapper(executor, *args, **kwargs):
    """Once per sampler evaluation: advance the run's counter (key or skip for every stream)."""
    run = run_from(executor, args)
    if run is not None:
        sigma = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        run.start_evaluation(sigma)
    return executor(*args, **kwargs)


def sample_with_run(executor, args, kwargs, start, finish):
    """Run the sampler with a fresh run state from ``start(guider, args)``; ``finish(run, ok)`` always."""
    guider = executor.class_obj
    original = guider.model_options
    run = start(guider, args)
    ok = False
    try:
        guider.model_options = options_with_run(original, run)
        out = executor(*args, **kwargs)
        ok = True
        return out
    finally:
        guider.model_options = original
        try:
            finish(run, ok)
        finally:
            run.close()


class ApplyHook:
    """Immutable per-node config of Apply DPCache; builds a fresh ApplyRun for every sampling run."""

    def __init__(self, schedule, family: str, node_id=None):
        self.schedule = schedule
        self.family = family
        self.node_id = node_id

    def start(self, guider, args) -> ApplyRun:
        sampler, sigmas = args[2], args[3]
        if guider.model_options.get("context_handler") is not None:
            raise ValueError(
                "Apply DPCache does not work with context windows (each window is a separate model call "
                "on another part of the latent); remove the context-window node or Apply DPCache"
            )
        shape = run_shape(guider, sampler, sigmas)
        schedule, plan_text = self.schedule, ""
        if shape is not None:  # count known up front: plan for it (a manual schedule of another T is refused)
            try:
                plan = plan_run(self.schedule, shape)
            except ScheduleMismatchError:  # before the first evaluation, with both numbers and the sampler
                raise ScheduleMismatchError(
                    mismatch_message(shape.num_evals, self.schedule.num_evals, sampler_name(sampler))) from None
            schedule, plan_text = plan.schedule, plan.text
            if plan_text:
                log.info("DPCache: %s", plan_text)
        force_all = uses_controlnet(guider)
        if force_all:
            msg = "DPCache: ControlNet detected; it adds residuals between blocks, so every evaluation is computed in full"
            log.warning(msg)
            send_text(msg, self.node_id)
        return ApplyRun(self.family, schedule, force_all, sampler_name(sampler), plan_text)

    def finish(self, run: ApplyRun, ok: bool) -> None:
        if not ok:
            log.info("DPCache: run stopped after %d evaluations; its cache is freed", run.evaluations)
            return
        line = run.summary()
        log.info(line)
        sched = run.cache.schedule
        measured = run.measured_speedup()
        line_plan = (f"{line}; keys {list(sched.key_steps)}, T={sched.num_evals}, ideal {sched.ideal_speedup:.2f}x"
                     + (f", measured {measured:.2f}x" if measured else ""))
        if sched.num_keys >= sched.num_evals:
            line_plan += (f". {sched.num_evals} of {sched.num_evals} evaluations computed: the budget leaves no "
                          "speed-up at this evaluation count")
        schedule_node = getattr(self.schedule, "ui_node", None)  # the DPCache Schedule that fed it: shows the plan that ran
        report_event((self.node_id, schedule_node), sched.key_steps, sched.num_evals, run.cache.computed,
                     run.cache.skipped, line_plan, sched.source, measured)
        if run.evaluations != run.cache.schedule.num_evals:
            raise ScheduleMismatchError(mismatch_message(run.evaluations, run.cache.schedule.num_evals, run.sampler))

    def outer_sample(self, executor, *args, **kwargs):
        return sample_with_run(executor, args, kwargs, self.start, self.finish)

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone: share, it is immutable
        return self


def install(model, info: ModelInfo, hook, label: str) -> None:
    """Register ``hook`` (ApplyHook or CalibrateHook) on ``model``, a clone."""
    try:
        from comfy.patcher_extension import WrappersMP

        outer, predict, apply_model = WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.APPLY_MODEL
    except ImportError:  # CPU tests (the same names ComfyUI uses)
        outer, predict, apply_model = "outer_sample", "predict_noise", "apply_model"
    patches = BlockPatches(info)
    patches.install(model)
    model.model_options["transformer_options"][PATCH_KEY] = label
    model.add_wrapper_with_key(outer, PATCH_KEY, hook.outer_sample)
    model.add_wrapper_with_key(predict, PATCH_KEY, predict_noise_wrapper)
    model.add_wrapper_with_key(apply_model, PATCH_KEY, make_apply_model_wrapper(patches))


# --------------------------------------------------------------------------------------------
# Calibration

PACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def pact_file_name(name: str) -> str:
    """The file name for a PACT typed by the user; only a plain name, never a path."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not PACT_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"pact_name {name!r} is not a plain file name: use letters, digits, '.', '_' and '-' "
            "(for example flux_dev_euler_50); it is saved as models/dpcache/<name>.safetensors"
        )
    return name + ".safetensors"


def guess_scheduler(guider, sigmas) -> str | None:
    """The ComfyUI scheduler that makes exactly these sigmas, when one does (metadata only)."""
    try:
        import comfy.samplers

        ms = guider.model_patcher.get_model_object("model_sampling")
        steps = int(sigmas.shape[-1]) - 1
        want = sigmas.detach().float().cpu()
        for name in comfy.samplers.SCHEDULER_NAMES:
            got = comfy.samplers.calculate_sigmas(ms, name, steps).float().cpu()
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                return name
    except Exception:
        pass
    return None


def resolution_of(latent) -> str:
    """"WxH" in pixels (latent x 8), plus "xF" frames for video latents [B, C, T, H, W]."""
    shape = list(latent.shape)
    h, w = shape[-2] * 8, shape[-1] * 8
    if len(shape) == 5:
        return f"{w}x{h}x{(shape[2] - 1) * 4 + 1}"
    return f"{w}x{h}"


def progress_bar(total: int, node_id):
    """comfy.utils.ProgressBar when ComfyUI is there; a no-op otherwise. Also honours Cancel."""
    try:
        import comfy.model_management
        import comfy.utils

        bar = comfy.utils.ProgressBar(total, node_id=node_id)

        def update(done, total_now):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total_now)

        return update
    except ImportError:
        return None


def file_metadata(run_metadata: dict, existing, order: int, has_history: bool, whole_run: bool = True) -> dict:
    """The metadata to write: the run's, with the file's planning convention. A new file plans
    skip-only ("skip"; history-exact at order >= 2) when its costs support it; a file that already
    exists keeps the convention it was made with (none recorded: "reference", as planned before);
    a file of partial-run windows (planned jointly) keeps the reference convention."""
    meta = dict(run_metadata)
    if existing is not None:
        meta.pop("convention", None)
        if "convention" in existing[1]:
            meta["convention"] = existing[1]["convention"]
    else:
        meta["convention"] = "skip" if whole_run and (order == 1 or has_history) else "reference"
    return meta


def trajectory_metadata(run: CalibrateRun) -> dict:
    """Per-evaluation sigmas (and the final one), and their normalised positions when the model
    has a sigma table: what lets the PACT be transferred to other step counts and samplers."""
    sigmas = run.sigmas + [run.final_sigma]
    if any(s != s for s in sigmas):  # NaN: an evaluation's sigma was not seen
        return {}
    meta = {"eval_sigmas": [round(s, 8) for s in sigmas]}
    if run.sigma_table is not None:
        meta["positions"] = [round(float(p), 8) for p in spread_ties(positions_from_sigmas(sigmas, run.sigma_table))]
    return meta


def run_window(shape: RunShape | None):
    """(offset, total, num_evals) when a sampling run is a window of a longer trajectory (a
    KSamplerAdvanced slice, e.g. one Wan2.2 A14B expert), placed like the run-time planner places it
    (``replan.joint_trajectory``); None for a whole run or an evaluation count not known up front."""
    if shape is None or not shape.partial:
        return None
    joint = joint_trajectory(shape, 1)
    return joint.offset, joint.total, shape.num_evals


def recorded_window(run) -> tuple | None:
    """``run_window`` of a finished calibration run, from the sigma of each evaluation it recorded."""
    sigmas = run.sigmas + [run.final_sigma]
    if run.sigma_table is None or not run.sigmas or any(s != s for s in sigmas):
        return None
    positions = positions_from_sigmas(sigmas, run.sigma_table)
    return run_window(RunShape(len(run.sigmas), tuple(spread_ties(positions[:-1])), float(positions[-1])))


def kept_text(size) -> str:
    """What calibration keeps of the cache point (``TrajectoryRecorder.sample_description``): a sample
    of S elements, or all of them (sample_size 0, or S at least the cache point's size)."""
    return "every cache-point element" if size == "all" else f"{size} sampled cache-point elements per stream"


def automatic_pact_name(family: str, sampler: str | None, steps: int, scheduler: str | None = None,
                        sigmas_digest: str = "") -> str:
    """The PACT name when pact_name is left empty: model family, sampler, scheduler and step count
    (wan_uni_pc_simple_30); sigmas no named scheduler makes are named by their hash (flux_euler_sig1a2b3c_20)."""
    sched = scheduler or f"sig{sigmas_digest[:6]}"
    return f"{family}_{sampler or 'sampler'}_{sched}_{steps}"


def sigmas_mismatch(name: str, meta: dict, digest: str | None, scheduler: str | None, count: int | None = None) -> str | None:
    """Why a run must not add to a PACT of other sigmas (another scheduler, shift or denoise), or None.
    Files of partial-run windows and files written before sigmas were recorded are not checked."""
    if meta.get("windows") or digest is None:
        return None
    have = meta.get("sigmas_hash")
    if have is None and meta.get("eval_sigmas") and len(meta["eval_sigmas"]) == count:  # one evaluation per step
        have = settings_sigmas_hash(meta["eval_sigmas"])
    if have is None or have == digest:
        return None
    return (f"PACT '{name}' was calibrated on other sigmas (scheduler {meta.get('scheduler') or 'unknown'}) than this "
            f"run's (scheduler {scheduler or 'not a named one'}); adding this sample would mix the costs of two "
            "trajectories. Pick a new pact_name on DPCache Calibrate (or leave it empty: automatic names include the "
            "scheduler), or set reset to start the file afresh")


class CalibrateHook:
    """Per-node config of DPCache Calibrate; records every run and adds one sample to the PACT file.

    An empty ``name`` is decided at the start of each run from the model family, the sampler and
    the step count, so one node can calibrate several settings into separate files.
    """

    def __init__(self, family: str, folder: str, name: str, order: int, reset: bool, node_id=None,
                 sample_size: int = DEFAULT_SAMPLE_SIZE):
        if sample_size < 0:
            raise ValueError(f"sample_size must be >= 0 (0 keeps every element), got {sample_size}")
        self.sample_size = int(sample_size)
        self.family = family
        self.folder = folder
        self.name = (name or "").strip()
        self.path = os.path.join(folder, pact_file_name(self.name)) if self.name else None  # None: named per run
        self.order = int(order)
        self.node_id = node_id
        # Mutable on purpose, shared by every run of this node output: the first finished run
        # after the node executed with reset=True starts the file afresh, later ones accumulate.
        self.pending_reset = [bool(reset)]

    def __deepcopy__(self, memo):
        return self

    def describe_target(self) -> str:
        if self.path:
            return self.path
        return os.path.join(self.folder, f"{self.family}_<sampler>_<steps>.safetensors (named when sampling starts)")

    def mismatch(self, path: str, meta: dict, num_evals: int | None) -> str | None:
        have = (meta.get("model_family"), meta.get("order"), meta.get("num_evals"))
        want = (self.family, self.order, num_evals if num_evals is not None else meta.get("num_evals"))
        if have[0] in (None, want[0]) and have[1] == want[1] and have[2] == want[2]:
            return None
        return (
            f"PACT '{os.path.basename(path)}' holds {meta.get('samples', '?')} samples for model family "
            f"{have[0]}, T={have[2]} evaluations, order {have[1]}; this run is {want[0]}, T={want[2]}, order {want[1]}. "
            "Pick a new pact_name on DPCache Calibrate, or set reset to start the file afresh"
        )

    def load_existing(self, path: str, window=None):
        """The PACT file's (accumulator, metadata), or None to start afresh.

        With reset pending, a full run starts afresh; a window run (one expert of several) keeps the
        other windows and drops only its own, so two Calibrate nodes with reset can share one file."""
        if not os.path.exists(path) or (self.pending_reset[0] and window is None):
            return None
        try:
            acc, meta = load_pact(path)
        except PactFileError as exc:
            if self.pending_reset[0]:
                return None
            raise PactFileError(f"{exc} (or set reset on DPCache Calibrate to overwrite it)") from None
        if self.pending_reset[0]:
            if self.mismatch(path, meta, acc.num_evals if window is None else window[1]) or not meta.get("windows"):
                return None
            meta = dict(meta, windows=windows.drop_window(acc, meta.get("windows"), window[0], window[2]))
        return acc, meta

    def start(self, guider, args) -> CalibrateRun:
        sampler, sigmas = args[2], args[3]
        if guider.model_options.get("context_handler") is not None:
            raise ValueError("DPCache Calibrate does not work with context windows; remove the context-window node")
        window = run_window(run_shape(guider, sampler, sigmas))
        steps = int(sigmas.shape[-1]) - 1 if window is None else window[1]
        scheduler = guess_scheduler(guider, sigmas)
        digest = settings_sigmas_hash(sigmas.detach().float().cpu().reshape(-1).tolist())
        path = self.path or os.path.join(
            self.folder, pact_file_name(automatic_pact_name(self.family, sampler_name(sampler), steps, scheduler, digest)))
        existing = self.load_existing(path, window)
        if existing is not None:
            count = window[1] if window else expected_evaluations(sampler, sigmas, is_rectified_flow(guider.model_patcher))
            problem = self.mismatch(path, existing[1], count) or sigmas_mismatch(
                os.path.basename(path), existing[1], None if window else digest, scheduler, int(sigmas.numel()))
            if problem:
                raise PactFileError(problem)
        expected = window[2] if window else expected_evaluations(sampler, sigmas, is_rectified_flow(guider.model_patcher))
        run = CalibrateRun(self.family, sample_size=self.sample_size, expected_evals=expected)
        run.path = path
        run.window = window
        run.sigma_table = sigma_table(guider)
        run.final_sigma = float(sigmas.reshape(-1)[-1])
        run.metadata = {
            "model_family": self.family,
            "order": self.order,
            "scheme": "reference",
            "sampler": sampler_name(sampler),
            "scheduler": scheduler,
            "resolution": resolution_of(args[1]),
            "steps": steps,
        }
        if window is None:
            run.metadata["sigmas_hash"] = digest
        seed = args[7] if len(args) > 7 else None
        run.record = sample_record(run.metadata["resolution"], seed, run.metadata["sampler"], scheduler)
        where = "" if window is None else f" (evaluations {window[0]}..{window[0] + window[2] - 1} of a T={window[1]} trajectory)"
        log.info("DPCache Calibrate: recording the cache point at every evaluation for %s%s", os.path.basename(path), where)
        run.announce = lambda size: log.info("DPCache Calibrate: keeping %s", kept_text(size))
        return run

    def finish(self, run: CalibrateRun, ok: bool) -> None:
        name = os.path.basename(run.path)
        if not ok:
            log.info("DPCache Calibrate: run stopped; nothing added to %s", name)
            return
        num_evals = run.evaluations
        if num_evals < self.order + 1:
            raise ValueError(f"a PACT of order {self.order} needs at least {self.order + 1} evaluations; this run made {num_evals}")
        window = run.window
        if window is None or window[2] != num_evals:  # count not known up front: place it from the recorded sigmas
            window = recorded_window(run)
        total = num_evals if window is None else window[1]
        existing = self.load_existing(run.path, window)
        if existing is not None:
            problem = self.mismatch(run.path, existing[1], total) or sigmas_mismatch(
                name, existing[1], run.metadata.get("sigmas_hash"), run.metadata.get("scheduler"), len(run.sigmas) + 1)
            if problem:
                raise PactFileError(problem)
        log.info("DPCache Calibrate: building the PACT sample (%d evaluations)", num_evals)
        sample = run.recorder.build_sample(self.order, "reference", progress=progress_bar(num_evals, self.node_id),
                                           max_anchor_gap=default_max_gap(total))
        history = None
        if window is None and self.order >= 2 and history_fits(num_evals, self.order):  # the history-exact cost (issue 11)
            log.info("DPCache Calibrate: building the order-%d history cost tensor", self.order)
            history = run.recorder.build_history_sample(self.order, "reference", progress=progress_bar(num_evals, self.node_id))
        acc, old_meta = existing if existing is not None else (PactAccumulator(total), {})
        meta = dict(run.metadata, **trajectory_metadata(run))
        if window is not None:
            if existing is not None and not old_meta.get("windows"):
                raise PactFileError(
                    f"PACT '{name}' was calibrated on whole sampling runs; this run samples only evaluations "
                    f"{window[0]}..{window[0] + num_evals - 1} of T={total} (a KSamplerAdvanced window). "
                    "Pick a new pact_name on DPCache Calibrate, or set reset"
                )
            sample = windows.embed_window(sample, window[0], total)
            meta["windows"] = windows.add_window(old_meta.get("windows"), window[0], num_evals)
            meta.pop("eval_sigmas", None)  # this window's only; positions below cover the whole trajectory
            meta["positions"] = windows.window_positions(old_meta.get("positions"), meta.get("positions"), window)
        elif old_meta.get("windows"):
            raise PactFileError(
                f"PACT '{name}' holds windows of partial sampling runs (e.g. two Wan2.2 experts); this run samples the "
                "whole trajectory. Pick a new pact_name on DPCache Calibrate, or set reset"
            )
        acc.add(sample, history=history, trajectories=None if window is not None else replay_sample(run.recorder))
        if window is not None:
            acc.samples = sum(w[2] for w in meta["windows"])
        size = run.recorder.sample_description()
        this = {"samples": 1, "sample_size": size, "sample_seed": None if size == "all" else run.recorder.seed}
        meta.update(combine_sampling([old_meta, this]))
        meta.update(with_record(old_meta, run.record))  # per-sample metadata kept as a list, never overwritten
        meta = save_pact(run.path, acc, file_metadata(meta, existing, self.order, history is not None, window is None))
        self.pending_reset[0] = False
        kept = kept_text(size)
        if window is None:
            line = f"{name}: sample {meta['samples']} added ({num_evals} evaluations, {kept})"
        else:
            got = ", ".join(f"{w[0]}..{w[0] + w[1] - 1}: {w[2]}" for w in meta["windows"])
            line = (f"{name}: evaluations {window[0]}..{window[0] + num_evals - 1} of T={total} added "
                    f"(samples per window {got}; {kept})")
        line += f"; {run.streams_text()}"
        dropped = run.dropped()
        if dropped:
            line += f"; left out (not recorded at every evaluation): {'; '.join(dropped)}"
        if run.report():
            line += f"; {run.report()}"
        log.info("DPCache Calibrate: %s", line)
        send_text(line, self.node_id)

    def outer_sample(self, executor, *args, **kwargs):
        return sample_with_run(executor, args, kwargs, self.start, self.finish)
