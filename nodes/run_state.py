"""The state of one sampling run (``ApplyRun``, ``CalibrateRun``) and of one model call inside it (``Call``).

The run decides, once per model call and before any block runs, whether the call's blocks compute
or its last block returns the prediction, and which caches (or recorded streams) the call feeds.
"""
from __future__ import annotations

import logging
import time

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core import CacheRun, ScheduleMismatchError, TrajectoryRecorder
    from ..dpcache_core.runtime import DEFAULT_SAMPLE_SEED, DEFAULT_SAMPLE_SIZE
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core import CacheRun, ScheduleMismatchError, TrajectoryRecorder
    from dpcache_core.runtime import DEFAULT_SAMPLE_SEED, DEFAULT_SAMPLE_SIZE

from . import families
from .block_patches import call_block, describe_variant

log = logging.getLogger("dpcache")


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

    def __init__(self, spec, position: int, variant=(), streams=(), chunk=0, last=(None, None), order=None):
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
        self.txt_out = None  # the text the last block before a joined stream returned
        self.order = order  # the token order of a joined stream (families.token_order), once known in the run
        self.where = None  # where the image tokens sit in the last block's stream (families.Family.locate)
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
    def join(self, args) -> None:
        """At the first block after the text and image streams join: where the image tokens sit, from the
        text the block before returned (the order found once per run; the slice per call)."""
        joined = args[self.spec.stream_key]
        if self.order is None:
            self.order = families.token_order(joined, self.txt_out)
        txt_len = self.txt_out.shape[1] if self.txt_out is not None else self.txt_len
        self.where = self.spec.locate(self.order, txt_len, joined.shape[1])
        self.txt_out = None

    @families.not_compiled
    def last_block(self, args, extra, prev):
        self.finished = True
        if self.compute:
            out = call_block(prev, args, extra)
            if self.record:
                self.feature = self.spec.cache_point(out[self.spec.stream_key], self.where)
            return out
        out, image = self.spec.prediction_output(args, self.where)  # new per call, in the blocks' dtype and device
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
        self.order = None  # the token order of a joined stream, found at the run's first call (families.token_order)

    def new_evaluation(self) -> None:
        self.calls_in_evaluation = 0
        self.fed = set()

    def open_call(self, to: dict, x, variant=(), block_patches=(), control=False, last=(None, None)) -> Call:
        """The state of a model call about to run (input ``x``, options ``to``), with the run's decision."""
        streams, chunk = split_streams(to, x, variant)
        call = Call(self.spec, self.calls_in_evaluation, variant, streams, chunk, last, self.order)
        self.calls_in_evaluation += 1
        if variant and variant not in self.variants:
            self.variants[variant] = describe_variant(variant)
        self.decide(call, block_patches, control)
        self.fed.update(call.update)
        return call

    def decide(self, call: Call, block_patches, control) -> None:
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
        if self.order is None and call.order is not None:
            self.order = call.order
            log.debug("DPCache: the joined stream holds its tokens %s", call.order)
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

    def __init__(self, family: str, schedule, force_all: bool = False, sampler: str | None = None, plan_text: str = "",
                 memory=None):
        super().__init__(family)
        self.memory = memory  # the forecaster's memory fit (``nodes.memory.MemoryFit``), None when not checked
        self.cache = CacheRun(schedule, memory.history if memory is not None else None)
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

    def decide(self, call: Call, block_patches, control) -> None:
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

    def decide(self, call: Call, block_patches, control) -> None:
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
