"""Per-sampling-run state: ``CacheRun`` (accelerated sampling) and ``TrajectoryRecorder`` (calibration)."""
from __future__ import annotations

import time
from typing import Callable, Hashable

import numpy as np
import torch

from .pact import PactAccumulator, build_pact
from .schedule import Schedule
from .taylor import TaylorPredictor


class ScheduleMismatchError(ValueError):
    """The run makes a different number of model evaluations than the schedule was made for."""


def mismatch_message(run_evals: int, schedule_evals: int) -> str:
    return (
        f"this sampling run makes {run_evals} model evaluations but the DPCache schedule was made for "
        f"T={schedule_evals}: set total_evaluations={run_evals} on DPCache Schedule (or calibrate a PACT "
        f"with this sampler and step count), or sample with {schedule_evals} evaluations"
    )


class CacheRun:
    """Which evaluation a run is at, whether it is a key one, and a Taylor predictor per stream.

    Call ``start_evaluation()`` once per sampler evaluation (cond and uncond share it), then per
    stream either ``update(stream, feature)`` (key) or ``predict(stream)`` (skipped).
    """

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.index = -1
        self.is_key = False
        self.computed = 0
        self.skipped = 0
        self.forced = 0
        self.predictors: dict[Hashable, TaylorPredictor] = {}
        self.derivatives_after = schedule.first_full_steps - 2 if schedule.scheme == "reference" else None
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

    def has_stream(self, stream: Hashable) -> bool:
        return stream in self.predictors

    def update(self, stream: Hashable, feature: torch.Tensor) -> None:
        """Feed the fully computed cache-point ``feature`` of ``stream`` at this (key) evaluation."""
        predictor = self.predictors.get(stream)
        if predictor is None:
            predictor = self.predictors[stream] = TaylorPredictor(
                self.schedule.order, self.schedule.scheme, self.derivatives_after
            )
        predictor.update(self.index, feature)

    def predict(self, stream: Hashable) -> torch.Tensor:
        """The predicted cache-point feature of ``stream`` at this (skipped) evaluation, float32."""
        predictor = self.predictors.get(stream)
        if predictor is None:
            raise RuntimeError(f"DPCache has no key evaluation for stream {stream!r} to predict from")
        return predictor.predict(self.index)

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


class TrajectoryRecorder:
    """Collects each stream's cache-point feature at every evaluation of a full-compute run.

    ``storage_device`` (e.g. "cpu") moves the recorded copies off the GPU.
    """

    def __init__(self, storage_device: str | torch.device | None = None):
        self.storage_device = storage_device
        self.index = -1
        self.trajectories: dict[Hashable, list[torch.Tensor]] = {}
        self.incomplete: set[Hashable] = set()
        self.source_device: torch.device | None = None

    @property
    def num_evals(self) -> int:
        return self.index + 1

    def start_evaluation(self) -> None:
        self.index += 1

    def record(self, stream: Hashable, feature: torch.Tensor) -> None:
        """Keep a float32 copy of ``stream``'s feature at the current evaluation."""
        trajectory = self.trajectories.setdefault(stream, [])
        if len(trajectory) != self.index:  # the stream missed an evaluation or came twice: unusable
            self.incomplete.add(stream)
            return
        self.source_device = feature.device
        device = self.storage_device or feature.device
        trajectory.append(feature.detach().to(device=device, dtype=torch.float32, copy=True))

    def complete_streams(self) -> list[Hashable]:
        """Streams recorded at every evaluation."""
        return [s for s, t in self.trajectories.items() if len(t) == self.num_evals and s not in self.incomplete]

    def build_sample(
        self,
        order: int = 2,
        scheme: str = "reference",
        progress: Callable[[int, int], None] | None = None,
        device: str | torch.device | None = None,
        max_anchor_gap: int | None = None,
    ) -> np.ndarray:
        """One PACT sample: the mean of the complete streams' PACTs (``max_anchor_gap``: see ``build_pact``).

        Built on ``device``, by default the device the features came from (the GPU in ComfyUI:
        the build reads every feature about T x 0.3 T times, far too slow on a CPU at FLUX size).
        """
        device = device or self.source_device
        streams = self.complete_streams()
        if not streams:
            raise ValueError("no stream was recorded at every evaluation: nothing to calibrate from")
        acc = PactAccumulator(self.num_evals)
        steps_per_stream = max(self.num_evals - order, 1)
        for n, stream in enumerate(streams):
            features = (f.to(device) if device is not None else f for f in self.trajectories[stream])
            report = None
            if progress is not None:
                report = lambda done, total, n=n: progress(n * steps_per_stream + done, len(streams) * steps_per_stream)  # noqa: E731
            acc.add(build_pact(features, order=order, scheme=scheme, max_anchor_gap=max_anchor_gap, progress=report))
        return acc.mean()

    def close(self) -> None:
        self.trajectories.clear()
        self.incomplete.clear()
