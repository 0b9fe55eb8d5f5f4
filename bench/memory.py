"""Peak memory of the DPCache cache per stream, transients included (issue 19).

    python -m bench.memory                  # CPU, ~2 min on 2 cores
    python -m bench.memory --device cuda    # on a GPU: torch.cuda.max_memory_allocated

Drives a ``CacheRun`` (T = 50, K = 13 uniform keys, one stream) with synthetic cache-point features
of FLUX.1-dev's size at 1024x1024 (4096 image tokens x 3072 = 12.6 M elements), in bf16 (as FLUX
and Wan run on a GPU) and float32, at Taylor orders 1-3. Around every ``update`` (key evaluation)
and every ``predict`` (skipped evaluation, written into the model's output tensor as Apply does)
it measures the peak of what is allocated above the start of the call (``peak_during``):

- on a GPU, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- on a CPU, the allocator's own allocation and free events, recorded by the PyTorch profiler
  (``profile_memory=True``): the running total of every allocation and free inside the call,
  including the temporaries PyTorch makes inside an operation.

The cache's peak at a call is what it held before plus that peak; the table gives its maximum over
the run, per element of the feature. "Before" rows run the pre-issue-19 code (whole-tensor update,
float32 prediction, then the cat and the cast Apply did) under the same meter.
"""
from __future__ import annotations

import argparse
import math
import platform

import torch

from dpcache_core import Schedule, uniform_key_steps
from dpcache_core.runtime import CacheRun
from dpcache_core.taylor import peak_bytes

from .common import machine, md_table, write_result

T, K = 50, 13
TOKENS, HIDDEN = 4096, 3072  # FLUX.1-dev at 1024x1024: the last block's image tokens
REAL = [("FLUX.1-dev, 1024x1024", 4096 * 3072, 1),
        ("Wan2.1-1.3B, 832x480x81", 32760 * 1536, 2),
        ("Wan2.1-14B, 832x480x81", 32760 * 5120, 2)]
TARGET = {1: 8.0, 2: 12.0}  # bytes per element, peak, bf16 features (issue 19)


def peak_during(fn, device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    total = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        total += size  # frees are negative; frees of memory allocated before fn() are not reported
        peak = max(peak, total)
    return peak


class BeforePredictor:
    """The pre-issue-19 predictor: whole-tensor float32 differences into new tensors."""

    def __init__(self, order: int):
        self.order, self.factors, self.steps = order, [], []

    def update(self, step: float, feature: torch.Tensor) -> None:
        keep = feature.dtype if feature.dtype in (torch.float16, torch.bfloat16) else torch.float32
        new = [feature.detach().to(keep, copy=True)]
        for n in range(min(self.order, len(self.factors))):
            new.append((new[n].float() - self.factors[n].float()) / (step - self.steps[n]))
        self.factors = new
        self.steps = ([step] + self.steps)[: self.order + 1]

    def predict(self, step: float, out: torch.Tensor) -> None:
        weights, w = [], 1.0
        for n in range(len(self.factors)):
            weights.append(w)
            w *= step - self.steps[n]
        pred = self.factors[0].to(torch.float32, copy=True)
        for w, factor in zip(weights[1:], self.factors[1:]):
            pred.add_(factor, alpha=w)
        out.copy_(pred.to(out.dtype))  # Apply's cast (one stream: no cat of the streams; with two or more
        # the cat added another float32 copy), then with_prediction's cat with the text tokens (not counted)

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)


def measure(order: int, dtype: torch.dtype, device: torch.device, before: bool = False,
            shape: tuple[int, ...] = (1, TOKENS, HIDDEN)) -> dict:
    """Peak bytes of one stream's cache over a cached run: {"update", "predict", "held", "numel"}."""
    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(shape, generator=g).to(device)
    slope = torch.randn(shape, generator=g).to(device)
    schedule = Schedule(tuple(uniform_key_steps(T, K, 3)), T, "flux", order, "exact", "uniform")
    run = CacheRun(schedule)
    predictor = BeforePredictor(order) if before else None
    held = lambda: predictor.nbytes() if before else run.nbytes()  # noqa: E731
    worst = {"update": 0, "predict": 0, "held": 0}
    for _ in range(T):
        key = run.start_evaluation()
        t = run.index
        key = key if not before else schedule.is_key(t)
        if key:
            feature = (base + slope * (t / T)).to(dtype)  # the model's block output (not the cache's)
            if before:
                call = lambda: predictor.update(t, feature)  # noqa: E731
            else:
                call = lambda: run.update("cond", feature)  # noqa: E731
        else:
            feature = torch.empty(shape, dtype=dtype, device=device)  # the output tensor Apply hands back
            if before:
                call = lambda: predictor.predict(t, feature)  # noqa: E731
            else:
                call = lambda: run.predict("cond", out=feature)  # noqa: E731
        had = held()
        extra = peak_during(call, device)
        kind = "update" if key else "predict"
        worst[kind] = max(worst[kind], had + extra)
        worst["held"] = max(worst["held"], held())
        del feature, call
    run.close()
    worst["numel"] = math.prod(shape)
    return worst


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                f"Python {platform.python_version()}")
    return machine()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit", default="", help="the commit measured, for the result's header")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, per_elem = [], {}
    configs = [(dtype, order, False) for dtype in (torch.bfloat16, torch.float32) for order in (1, 2, 3)]
    configs += [(torch.bfloat16, order, True) for order in (1, 2)]
    for dtype, order, before in configs:
        m = measure(order, dtype, device, before)
        n = m["numel"]
        peak = max(m["update"], m["predict"])
        if not before:
            per_elem[order, dtype] = peak / n
        target = TARGET.get(order) if dtype == torch.bfloat16 else None
        rows.append([
            "before (pre-issue-19 code)" if before else "now",
            str(dtype).replace("torch.", ""), str(order), f"{m['held'] / n:.2f}", f"{m['update'] / n:.2f}",
            f"{m['predict'] / n:.2f}", f"{peak / 2**20:.1f} MiB",
            f"{peak_bytes(n, order, dtype) / n:.2f}" if not before else "",
            (f"<= {target:g}: {'met' if peak / n <= target else 'NOT met'}" if target and not before else ""),
        ])
        print(rows[-1], flush=True)
    ext = []
    for label, numel, streams in REAL:
        for order in (1, 2):
            gb = per_elem[order, torch.bfloat16] * numel / 1e9
            ext.append([label, str(order), f"{numel / 1e6:.1f} M", f"{gb:.3f} GB",
                        f"{gb * streams:.3f} GB ({streams} stream{'s' if streams > 1 else ''})"])
    meter = ("`torch.cuda.max_memory_allocated`" if device.type == "cuda"
             else "the allocator's allocation/free events recorded by `torch.profiler` (`profile_memory=True`)")
    commit = f" Commit: {args.commit}." if args.commit else ""
    text = "\n\n".join([
        f"Peak bytes per cache-point element of one stream, transients included: what the cache held before "
        f"each call plus the peak allocated during it, measured with {meter}; the maximum over a cached run "
        f"(T={T}, K={K}, exact scheme) with a {TOKENS} x {HIDDEN} feature (FLUX.1-dev 1024x1024, "
        f"{TOKENS * HIDDEN / 1e6:.1f} M elements). `predict` writes into the model's output tensor, which is not "
        f"counted (at a skipped evaluation it stands for the block output the model would have made). "
        f"Machine: {device_description(device)}.{commit}",
        md_table(["code", "feature dtype", "order", "held (B/elem)", "peak at update (B/elem)",
                  "peak at predict (B/elem)", "peak per stream", "bound `peak_bytes` (B/elem)", "target"], rows),
        "**Extrapolated** (measured peak bytes per element, bf16 features, x the real cache-point feature "
        "size; an upper bound: the float32 blocks are at most 1 M elements, a smaller share of larger features):\n\n"
        + md_table(["model", "order", "feature elements", "peak per stream", "per run"], ext),
    ])
    write_result("memory" if device.type == "cpu" else f"memory_{device.type}", text)


if __name__ == "__main__":
    main()
