"""Shared helpers for the benchmarks: prompts, calibration runs, cached sampling, metrics, reports."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import torch

from dpcache_core import PactAccumulator, Schedule, TrajectoryRecorder
from dpcache_demo import toy_model
from dpcache_demo.demo import accelerated_sample

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHIFT = 3.0
NUM_CLASSES = len(toy_model.CLASS_NAMES)


def calibration_prompts(n: int) -> list[tuple[int, int]]:
    """(class, seed) pairs used for calibration: seeds 1000+."""
    return [(k % NUM_CLASSES, 1000 + k) for k in range(n)]


def held_out_prompts(n: int = 16) -> list[tuple[int, int]]:
    """(class, seed) pairs never used for calibration: every class once, seeds 9000+."""
    return [(k % NUM_CLASSES, 9000 + k) for k in range(n)]


def setup(threads: int = 2) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)


def machine() -> str:
    """CPU model name (from lscpu / /proc/cpuinfo), cores used, torch version."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # noqa: BLE001 - lscpu missing: keep the fallback
        pass
    return (f"{name}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {sys.version.split()[0]}, no GPU")


def batch_inputs(model, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise [N, ...] (each row seeded by its prompt's seed) and class ids [N]."""
    noise = torch.cat([toy_model.make_noise(model.config, seed) for _, seed in prompts])
    return noise, torch.tensor([c for c, _ in prompts])


def recorded_run(model, cls: int, seed: int, num_steps: int, shift: float = SHIFT):
    """One full-compute run of the prompt (cls, seed): (its output, the ``TrajectoryRecorder`` of its
    cache point; the caller closes it)."""
    rec = TrajectoryRecorder()

    def record(i, feature, velocity):
        rec.start_evaluation()
        rec.record("cond", feature)

    out = toy_model.sample(model, toy_model.make_noise(model.config, seed), cls, num_steps, shift, on_evaluation=record)
    return out, rec


def full_runs(model, prompts, num_steps: int, shift: float = SHIFT, orders=(2,)):
    """Full-compute runs of ``prompts`` one by one: (outputs [N,...], {order: [PACT sample per prompt]})."""
    outs, samples = [], {o: [] for o in orders}
    for cls, seed in prompts:
        out, rec = recorded_run(model, cls, seed, num_steps, shift)
        outs.append(out)
        for o in orders:
            samples[o].append(rec.build_sample(order=o))
        rec.close()
    return torch.cat(outs), samples


def mean_pact(samples) -> np.ndarray:
    """The PACT averaged over a list of per-prompt samples (through ``PactAccumulator``)."""
    acc = PactAccumulator(samples[0].shape[0])
    for s in samples:
        acc.add(s)
    return acc.mean()


def cached_sample(model, noise, cond, keys, num_steps: int, order: int = 2, shift: float = SHIFT,
                  first_full_steps: int = 3):
    """Sampling that runs the blocks only at ``keys`` and predicts the feature with the core's
    ``CacheRun`` elsewhere (the demo's loop). Works on a batch: one schedule for every row.
    Returns (output, run)."""
    schedule = Schedule(tuple(keys), num_steps, "flux", order, "reference", "manual", None, first_full_steps)
    return accelerated_sample(model, noise, cond, schedule, shift)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per-row PSNR in dB for images in [-1, 1] (data range 2)."""
    mse = ((out.double() - ref.double()) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        return 10 * np.log10(4.0 / mse)


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per-row relative L1: sum|out - ref| / sum|ref|."""
    d = (out.double() - ref.double()).abs().flatten(1).sum(1)
    return (d / ref.double().abs().flatten(1).sum(1)).numpy()


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> str:
    """Write a markdown fragment to bench/results/<name>.md and print it."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name + ".md")
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    print(text)
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend; installs matplotlib into this Python if missing
    (a benchmark-only dependency, not one of the pack's)."""
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
