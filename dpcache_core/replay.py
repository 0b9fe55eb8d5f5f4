"""Recorded trajectories a PACT file keeps so that planning can replay a forecaster on them (``choose``).

At every calibration run of a whole trajectory, each complete stream (cond, uncond) contributes one
trajectory: ``REPLAY_ELEMENTS`` cache-point elements (a fixed seeded random pick of the elements the
recorder kept) at every evaluation, float32. A file keeps at most ``REPLAY_BYTE_CAP`` bytes of them
(the first ones recorded; later ones are not kept once the file is full): at T = 50, 4,096 elements
x 50 x 4 bytes = 800 KiB per trajectory, 10 trajectories. A trajectory longer than the cap alone
keeps fewer elements. Stored as the optional tensor ``trajectories`` (n, T, elements): files
without it plan as before.
"""
from __future__ import annotations

import numpy as np
import torch

REPLAY_ELEMENTS = 4096  # cache-point elements kept per stream and sample for the replay
REPLAY_BYTE_CAP = 8 << 20  # at most 8 MiB of trajectories in one file
REPLAY_SEED = 4242  # the elements' pick: the same positions of the recorder's sample in every run


def replay_columns(width: int, elements: int = REPLAY_ELEMENTS, seed: int = REPLAY_SEED) -> torch.Tensor:
    """``elements`` of ``range(width)`` in a seeded random order (all of them when width is smaller):
    any leading part of it is itself a uniform random pick, so files of different widths combine."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(width), generator=generator)[: int(elements)]


def replay_sample(recorder, elements: int = REPLAY_ELEMENTS) -> np.ndarray | None:
    """(streams, T, elements) float32: the replay trajectories of one recorded run
    (``runtime.TrajectoryRecorder``), one per complete stream; None when no stream is complete."""
    rows = []
    for stream in recorder.complete_streams():
        trajectory = recorder.trajectory(stream)
        columns = replay_columns(trajectory.shape[1], elements).to(trajectory.device)
        rows.append(trajectory.index_select(1, columns).float().cpu().numpy())
    if not rows:
        return None
    width = min(r.shape[1] for r in rows)
    return np.stack([r[:, :width] for r in rows]).astype(np.float32)


def capacity(num_evals: int, width: int, cap: int = REPLAY_BYTE_CAP) -> int:
    """How many (T, width) float32 trajectories fit in ``cap`` bytes."""
    return int(cap // (4 * max(num_evals, 1) * max(width, 1)))


def check_trajectories(trajectories, num_evals: int) -> np.ndarray:
    """The trajectories as a finite (n, T, elements) float32 array; ValueError otherwise."""
    arr = np.asarray(trajectories, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1] != num_evals or arr.shape[2] < 1:
        raise ValueError(f"replay trajectories must have shape (n, T={num_evals}, elements), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("replay trajectories hold non-finite values")
    return arr


def combine(old, new, num_evals: int, cap: int = REPLAY_BYTE_CAP) -> np.ndarray | None:
    """``old`` then ``new`` trajectories (either may be None), cut to the narrower width and to the
    first that fit in ``cap`` bytes (at least one, narrowed to fit when one alone is too large)."""
    parts = [check_trajectories(a, num_evals) for a in (old, new) if a is not None and len(a)]
    if not parts:
        return None
    width = min(p.shape[2] for p in parts)
    if capacity(num_evals, width, cap) < 1:
        width = max(1, cap // (4 * num_evals))
    joined = np.concatenate([p[:, :, :width] for p in parts])
    return np.ascontiguousarray(joined[: max(1, capacity(num_evals, width, cap))])
