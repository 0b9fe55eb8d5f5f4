"""Per-sampling-run state: ``CacheRun`` (accelerated sampling) and ``TrajectoryRecorder`` (calibration)."""
from __future__ import annotations

import time
from typing import Callable, Hashable

import numpy as np
import torch

from .history import build_history
from .pact import PactAccumulator, build_pact
from .schedule import Schedule
from .spectral import SpectralPredictor
from .taylor import TaylorPredictor, derivatives_after_for


class ScheduleMismatchError(ValueError):
    """The run makes a different number of model evaluations than the schedule was made for."""

    __module__ = "dpcache"  # a stable name in ComfyUI's error dialog (not the pack's folder path)


def mismatch_message(run_evals: int, schedule_evals: int, sampler: str | None = None) -> str:
    run = f"this sampling run ({sampler})" if sampler else "this sampling run"
    return (
        f"{run} makes {run_evals} model evaluations but the DPCache schedule was made for "
        f"T={schedule_evals}: set total_evaluations={run_evals} on DPCache Schedule (or calibrate a PACT "
        f"with this sampler and step count), or sample with {schedule_evals} evaluations"
    )


class CacheRun:
    """Which evaluation a run is at, whether it is a key one, and a forecaster per stream (Taylor or spectral).

    Call ``start_evaluation()`` once per sampler evaluation (cond and uncond share it), then per
    stream either ``update(stream, feature)`` (key) or ``predict(stream)`` (skipped).
    """

    def __init__(self, schedule: Schedule, spectral_history: int | None = None):
        self.schedule = schedule
        self.spectral_history = spectral_history  # the spectral ring's length (None: its default of 8)
        self.index = -1
        self.is_key = False
        self.computed = 0
        self.skipped = 0
        self.forced = 0
        self.predictors: dict[Hashable, TaylorPredictor] = {}
        self.derivatives_after = derivatives_after_for(schedule.scheme, schedule.first_full_steps)
        self.started = time.perf_counter()

    def start_evaluation(self) -> bool:
        """Advance to the next evaluation; True when it is a key one (compute every block)."""
        if self.index + 1 >= self.schedule.num_evals:
            raise ScheduleMismatchError(mismatch_message(self.index + 2, self.schedule.num_evals))
        self.index += 1
        self.is_key = self.schedule.is_key(self.index) or not self.predictors
        if self.is_key:
            self.computed += 1
        else:
            self.skipped += 1
        return self.is_key

    def force_key(self) -> None:
        """Compute the current evaluation in full although the schedule skips it."""
        if not self.is_key:
            self.is_key = True
            self.skipped -= 1
            self.computed += 1
            self.forced += 1

    def new_predictor(self):
        """The schedule's forecaster for a new stream: Taylor of its order, or spectral."""
        if self.schedule.predictor == "spectral":
            return SpectralPredictor() if self.spectral_history is None else SpectralPredictor(max_history=self.spectral_history)
        return TaylorPredictor(self.schedule.order, self.schedule.scheme, self.derivatives_after)

    def time(self) -> float:
        """The predictor's time coordinate of this evaluation: the index for Taylor, the position
        index / T in [0, 1) for the spectral forecaster (dpcache_core.spectral)."""
        if self.schedule.predictor == "spectral":
            return self.index / self.schedule.num_evals
        return self.index

    def has_stream(self, stream: Hashable) -> bool:
        return stream in self.predictors

    def update(self, stream: Hashable, feature: torch.Tensor) -> None:
        """Feed the fully computed cache-point ``feature`` of ``stream`` at this (key) evaluation."""
        predictor = self.predictors.get(stream)
        if predictor is None:
            predictor = self.predictors[stream] = self.new_predictor()
        predictor.update(self.time(), feature)

    def predict(self, stream: Hashable, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The predicted cache-point feature of ``stream`` at this (skipped) evaluation, summed in float32
        and written into ``out`` (e.g. the stream's slice of the model's tensor, in the model's dtype) or a
        new tensor of ``dtype`` (default float32); see ``TaylorPredictor.predict``."""
        predictor = self.predictors.get(stream)
        if predictor is None:
            raise RuntimeError(f"DPCache has no key evaluation for stream {stream!r} to predict from")
        return predictor.predict(self.time(), out=out, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes the cache holds now, over all streams."""
        return sum(p.nbytes() for p in self.predictors.values())

    def summary(self) -> str:
        done = self.index + 1
        forced = f" ({self.forced} forced by injected residuals)" if self.forced else ""
        return (
            f"DPCache: {self.computed} key evaluations computed{forced}, {self.skipped} skipped "
            f"of {done}; wall {time.perf_counter() - self.started:.2f} s"
        )

    def close(self) -> None:
        """Drop every cached tensor."""
        self.predictors.clear()


DEFAULT_SAMPLE_SIZE = 65536  # cache-point elements kept per stream and evaluation (see bench/sampled_pact.py)
DEFAULT_SAMPLE_SEED = 0


def sample_positions(numel: int, sample_size: int | None, seed: int) -> torch.Tensor | None:
    """``sample_size`` distinct flat positions in ``range(numel)``, sorted, a uniformly random subset
    drawn with a CPU generator seeded with ``seed``; None (keep every element) when ``sample_size``
    is 0/None or >= numel.

    For S much smaller than N it draws S positions and redraws the few duplicates, so it costs
    O(S) whatever N is (a permutation of all N would not). Every PACT entry is a mean over the
    elements, which the mean over such a sample estimates without bias.
    """
    if not sample_size or sample_size >= numel:
        return None
    generator = torch.Generator().manual_seed(int(seed))
    if 2 * sample_size >= numel:
        return torch.randperm(numel, generator=generator)[:sample_size].sort().values
    picked = torch.randint(0, numel, (int(sample_size),), generator=generator).unique()
    while picked.numel() < sample_size:  # the first S distinct draws: a uniform S-subset
        extra = torch.randint(0, numel, (int(sample_size) - picked.numel(),), generator=generator)
        picked = torch.cat([picked, extra]).unique()
    return picked


class TrajectoryRecorder:
    """Collects, per stream, the cache-point feature at every evaluation of a full-compute run,
    or a fixed random sample of its elements.

    ``sample_size`` S: per stream, S positions over all tokens x channels of the stream's feature
    are drawn once (``sample_positions``, seeded with ``seed`` + the stream's number in order of
    appearance) and gathered on the feature's own device at every evaluation, so only T x S
    float32 values are kept, whatever the resolution, frame count or batch. 0/None, or S >= N
    (the feature's element count), keeps all N elements in order: the exact PACT.
    ``storage_device`` (e.g. "cpu") is where the kept values go (default: the feature's device).
    Sampled values go into one preallocated (``expected_evals`` or 64, S) buffer per stream (doubled
    if a run makes more evaluations), filled row by row: no allocation per evaluation that could
    pin the memory allocator's heap between the model's activations.
    """

    def __init__(
        self,
        storage_device: str | torch.device | None = None,
        sample_size: int | None = DEFAULT_SAMPLE_SIZE,
        seed: int = DEFAULT_SAMPLE_SEED,
        expected_evals: int | None = None,
    ):
        if sample_size is not None and sample_size < 0:
            raise ValueError(f"sample_size must be >= 0 (0 keeps every element), got {sample_size}")
        self.storage_device = storage_device
        self.sample_size = int(sample_size or 0)
        self.seed = int(seed)
        self.capacity = max(int(expected_evals or 64), 1)
        self.index = -1
        self.lengths: dict[Hashable, int] = {}  # evaluations recorded per stream
        self.buffers: dict[Hashable, torch.Tensor] = {}  # sampled streams: (capacity, S) float32
        self.full_rows: dict[Hashable, list[torch.Tensor]] = {}  # streams kept whole: one copy per evaluation
        self.shapes: dict[Hashable, tuple[int, ...]] = {}
        self.positions: dict[tuple, tuple[torch.Tensor, int] | None] = {}  # key: (stream, device, strides)
        self.incomplete: set[Hashable] = set()
        self.source_device: torch.device | None = None

    @property
    def num_evals(self) -> int:
        return self.index + 1

    def start_evaluation(self) -> None:
        self.index += 1

    def stream_positions(self, stream: Hashable, feature: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """The stream's sample as (storage offsets on the feature's device, span), whatever the
        feature's strides; None: keep every element."""
        key = (stream, feature.device, feature.stride())
        if key not in self.positions:
            number = list(self.shapes).index(stream)
            flat = sample_positions(feature.numel(), self.sample_size, self.seed + number)
            if flat is not None:
                offsets = torch.zeros_like(flat)
                for size, stride in zip(reversed(feature.shape), reversed(feature.stride())):
                    offsets += (flat % size) * stride
                    flat = flat // size
                flat = (offsets.to(feature.device), int(offsets.max()) + 1)
            self.positions[key] = flat
        return self.positions[key]

    def row(self, stream: Hashable, n: int, width: int, device) -> torch.Tensor:
        """Row ``n`` of the stream's buffer (allocated, or doubled, when needed)."""
        buffer = self.buffers.get(stream)
        if buffer is None or n >= buffer.shape[0]:
            rows = self.capacity if buffer is None else 2 * buffer.shape[0]
            grown = torch.empty((max(rows, n + 1), width), dtype=torch.float32, device=device)
            if buffer is not None:
                grown[:n] = buffer[:n]
            buffer = self.buffers[stream] = grown
        return buffer[n]

    def record(self, stream: Hashable, feature: torch.Tensor) -> None:
        """Keep the sampled values (float32) of ``stream``'s feature at the current evaluation."""
        n = self.lengths.get(stream, 0)
        shape = self.shapes.setdefault(stream, tuple(feature.shape))
        if n != self.index or shape != tuple(feature.shape):
            self.incomplete.add(stream)  # missed an evaluation, came twice or changed shape: unusable
            return
        self.source_device = feature.device
        device = self.storage_device or feature.device
        feature = feature.detach()
        positions = self.stream_positions(stream, feature)
        if positions is None:
            self.full_rows.setdefault(stream, []).append(feature.reshape(-1).to(device=device, dtype=torch.float32, copy=True))
        else:  # gather straight from the feature's storage into the buffer: no copy of the feature, O(S)
            offsets, span = positions
            storage = feature.as_strided((span,), (1,), feature.storage_offset())
            out = self.row(stream, n, offsets.numel(), device)
            if storage.dtype == torch.float32 and storage.device == out.device:
                torch.index_select(storage, 0, offsets, out=out)
            else:
                out.copy_(storage.index_select(0, offsets))
        self.lengths[stream] = n + 1

    def complete_streams(self) -> list[Hashable]:
        """Streams recorded at every evaluation."""
        return [s for s, n in self.lengths.items() if n == self.num_evals and s not in self.incomplete]

    def trajectory(self, stream: Hashable) -> torch.Tensor:
        """(T, S) float32: row t holds ``stream``'s kept values at evaluation t (the same S positions
        in every row; all N elements, flattened, when nothing is sampled)."""
        n = self.lengths.get(stream, 0)
        if not n:
            raise KeyError(f"stream {stream!r} was not recorded")
        if stream in self.buffers:
            return self.buffers[stream][:n]
        return torch.stack(self.full_rows[stream])

    def sample_description(self) -> int | str:
        """What the complete streams kept: S, or "all" when every stream kept all its elements."""
        complete = set(self.complete_streams())
        sampled = any(p is not None for (stream, *_), p in self.positions.items() if stream in complete)
        return self.sample_size if sampled else "all"

    def nbytes(self) -> int:
        """Bytes of the kept values, over all streams."""
        kept = list(self.buffers.values()) + [v for rows in self.full_rows.values() for v in rows]
        return sum(v.numel() * v.element_size() for v in kept)

    def build_sample(
        self,
        order: int = 2,
        scheme: str = "reference",
        progress: Callable[[int, int], None] | None = None,
        device: str | torch.device | None = None,
        max_anchor_gap: int | None = None,
    ) -> np.ndarray:
        """One PACT sample: the mean of the complete streams' PACTs (``max_anchor_gap``: see ``build_pact``).

        Built on ``device``, by default the device the features came from (a GPU in ComfyUI).
        """
        device = device or self.source_device
        streams = self.complete_streams()
        if not streams:
            raise ValueError("no stream was recorded at every evaluation: nothing to calibrate from")
        acc = PactAccumulator(self.num_evals)
        steps_per_stream = max(self.num_evals - order, 1)
        for n, stream in enumerate(streams):
            trajectory = self.trajectory(stream)
            if device is not None:
                trajectory = trajectory.to(device)
            report = None
            if progress is not None:
                report = lambda done, total, n=n: progress(n * steps_per_stream + done, len(streams) * steps_per_stream)  # noqa: E731
            acc.add(build_pact(trajectory, order=order, scheme=scheme, max_anchor_gap=max_anchor_gap, progress=report))
            del trajectory
        return acc.mean()

    def build_history_sample(
        self,
        order: int = 2,
        scheme: str = "reference",
        progress: Callable[[int, int], None] | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """One history cost tensor sample (``dpcache_core.history``): the mean over the complete streams."""
        device = device or self.source_device
        streams = self.complete_streams()
        if not streams:
            raise ValueError("no stream was recorded at every evaluation: nothing to calibrate from")
        total = None
        for n, stream in enumerate(streams):
            report = None
            if progress is not None:
                report = lambda done, count, n=n: progress(n * count + done, len(streams) * count)  # noqa: E731
            trajectory = self.trajectory(stream)
            history = build_history(trajectory.to(device) if device is not None else trajectory, order, scheme, progress=report)
            total = history if total is None else total + history
        return total / len(streams)

    def close(self) -> None:
        self.buffers.clear()
        self.full_rows.clear()
        self.lengths.clear()
        self.positions.clear()
        self.incomplete.clear()
