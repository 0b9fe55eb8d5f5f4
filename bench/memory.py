"""Bytes the DPCache cache holds per stream: measured, then extrapolated to real models.

    python -m bench.memory           # ~20 s

Runs cached sampling (T = 50, K = 13, uniform keys) on the toy and bench configurations, reads
``CacheRun.nbytes()`` after every evaluation and keeps the maximum; with one stream that is the
per-stream cache. The measured bytes per feature element (the feature in its own dtype plus Taylor-order
float32 derivative factors) are then applied to the cache-point feature of real models: FLUX.1-dev at 1024x1024 (4096
image tokens x 3072) and Wan2.1 at 832x480, 81 frames (21 x 30 x 52 = 32760 tokens; 1536 for 1.3B,
5120 for 14B). ComfyUI runs cond and uncond as two streams when CFG is on (FLUX-dev: off).
"""
from __future__ import annotations

import argparse

import torch

from dpcache_core import Schedule, uniform_key_steps
from dpcache_demo import toy_model
from dpcache_core.runtime import CacheRun

from .common import SHIFT, machine, md_table, setup, write_result

T, K = 50, 13
REAL = [("FLUX.1-dev, 1024x1024", 4096 * 3072, 1, 0.36),
        ("Wan2.1-1.3B, 832x480x81", 32760 * 1536, 2, None),
        ("Wan2.1-14B, 832x480x81", 32760 * 5120, 2, None)]


def measure(model, order: int, dtype=torch.float32) -> tuple[int, int]:
    """(max bytes held by the cache during a run, elements of one cache-point feature).

    ``dtype``: the dtype the cache point reaches the cache in (bf16 for FLUX / Wan on a GPU)."""
    schedule = Schedule(tuple(uniform_key_steps(T, K, 3)), T, "flux", order, "reference", "uniform")
    run, peak, numel = CacheRun(schedule), [0], [0]

    def feature_fn(index, state):
        if run.start_evaluation():
            f = model.run_blocks(state)
            run.update("cond", f.to(dtype))
            numel[0] = f.numel()
        else:
            f = run.predict("cond")
        peak[0] = max(peak[0], run.nbytes())
        return f

    toy_model.sample(model, toy_model.make_noise(model.config, 0), 1, T, SHIFT, feature_fn=feature_fn)
    run.close()
    assert run.nbytes() == 0, "close() must drop every cached tensor"
    return peak[0], numel[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    setup()
    rows, per_elem = [], {}
    for name, model in (("toy", toy_model.load_builtin_model()), ("bench", toy_model.build_model(toy_model.BENCH_FLUX))):
        for dtype in (torch.float32, torch.bfloat16):
            for order in (1, 2):
                peak, numel = measure(model, order, dtype)
                per_elem[order, dtype] = peak / numel
                rows.append([f"{name} ({numel} elements)", str(dtype).replace("torch.", ""), str(order),
                             f"{peak:,}", f"{peak / numel:.1f}"])
    ext = []
    for label, numel, streams, paper in REAL:
        for order in (1, 2):
            gb = per_elem[order, torch.bfloat16] * numel / 1e9
            ext.append([label, str(order), f"{numel / 1e6:.1f} M", f"{gb:.3f} GB",
                        f"{gb * streams:.3f} GB ({streams} stream{'s' if streams > 1 else ''})",
                        f"{paper} GB" if paper and order == 2 else ""])
    text = "\n\n".join([
        f"Measured with `CacheRun.nbytes()` during cached sampling (T={T}, K={K}, one stream). "
        f"Machine: {machine()}.",
        md_table(["model (cache-point feature)", "feature dtype", "Taylor order", "bytes held (max over the run)",
                  "bytes per feature element"], rows),
        "**Extrapolated** (measured bytes per element with bf16 features, as FLUX and Wan run on a GPU, "
        "x the real cache-point feature size):\n\n"
        + md_table(["model", "order", "feature elements", "per stream", "per run", "paper"], ext),
    ])
    write_result("memory", text)


if __name__ == "__main__":
    main()
