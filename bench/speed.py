"""Wall-clock speed of DPCache against the full run, measured side by side in one process.

    python -m bench.speed            # ~3 min on 2 CPU cores
    python -m bench.speed --forecasters   # Taylor 1, Taylor 2 and spectral at the same K (13 of 50)

Model: the "bench" configuration of the FLUX-like toy DiT (``BENCH_FLUX``: 256 image tokens,
hidden 384, 4 double + 8 single blocks, seeded random weights: speed does not depend on the
weights), where the transformer blocks dominate the run time. T = 50 Euler evaluations.
Each repeat runs the full sampler, then the cached one at every K (K = T first: nothing skipped,
which measures the cache's own overhead), so machine drift hits all alike; the table reports
medians over the repeats of the per-repeat ratios. Key steps are uniform: which evaluations are
skipped does not change the time, only how many.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dpcache_core import CacheRun, Schedule, uniform_key_steps
from dpcache_demo import toy_model
from dpcache_demo.demo import accelerated_sample

from .common import RESULTS, SHIFT, cached_sample, machine, md_table, pyplot, setup, write_result

T = 50


def block_share(model, noise, cond) -> float:
    """Fraction of a full run's time spent in ``run_blocks`` (the part DPCache can skip)."""
    spent = [0.0]

    def timed(i, state):
        t0 = time.perf_counter()
        out = model.run_blocks(state)
        spent[0] += time.perf_counter() - t0
        return out

    t0 = time.perf_counter()
    toy_model.sample(model, noise, cond, T, SHIFT, feature_fn=timed)
    return spent[0] / (time.perf_counter() - t0)


def bookkeeping_share(model, noise, cond) -> float:
    """With nothing skipped (K = T): the share of the run spent in the cache's own calls
    (``CacheRun.start_evaluation`` and ``update``), timed directly."""
    run = CacheRun(Schedule(tuple(range(T)), T, "flux", 2, "reference", "uniform"))
    spent = [0.0]

    def feature_fn(index, state):
        t0 = time.perf_counter()
        run.start_evaluation()
        spent[0] += time.perf_counter() - t0
        feature = model.run_blocks(state)
        t0 = time.perf_counter()
        run.update("cond", feature)
        spent[0] += time.perf_counter() - t0
        return feature

    t0 = time.perf_counter()
    toy_model.sample(model, noise, cond, T, SHIFT, feature_fn=feature_fn)
    total = time.perf_counter() - t0
    run.close()
    return spent[0] / total


FORECASTERS = (("Taylor 1", "taylor", 1), ("Taylor 2", "taylor", 2), ("spectral", "spectral", 1))


def own_time(schedule, feature: torch.Tensor, repeats: int = 5) -> float:
    """Seconds of the cache's own calls over one run of ``schedule`` (update at the keys, predict
    elsewhere) on a fixed ``feature``, median of ``repeats``: the forecaster's cost alone."""
    times = []
    for _ in range(repeats):
        run = CacheRun(schedule)
        t0 = time.perf_counter()
        for _ in range(schedule.num_evals):
            if run.start_evaluation():
                run.update("cond", feature)
            else:
                run.predict("cond", dtype=feature.dtype)
        times.append(time.perf_counter() - t0)
        run.close()
    return statistics.median(times)


def forecasters(a, model, cfg, noise, cond) -> None:
    """Taylor 1, Taylor 2 and spectral at one K on the same keys, each against the full run side by side."""
    k = a.keys[0] if a.keys and a.keys[0] != T else 13
    keys = uniform_key_steps(T, k, 3)
    full_t, ratio, secs = [], {f[0]: [] for f in FORECASTERS}, {f[0]: [] for f in FORECASTERS}
    for r in range(a.repeats):
        t0 = time.perf_counter()
        toy_model.sample(model, noise, cond, T, SHIFT)
        full_t.append(time.perf_counter() - t0)
        for label, predictor, order in FORECASTERS:
            schedule = Schedule(tuple(keys), T, "flux", order, "reference", "manual", first_full_steps=3, predictor=predictor)
            t0 = time.perf_counter()
            accelerated_sample(model, noise, cond, schedule, SHIFT)
            secs[label].append(time.perf_counter() - t0)
            ratio[label].append(full_t[-1] / secs[label][-1])
        print(f"repeat {r + 1}/{a.repeats}: full {full_t[-1]:.2f} s, "
              + ", ".join(f"{f[0]} {secs[f[0]][-1]:.2f} s" for f in FORECASTERS), flush=True)
    big = torch.randn(1, 4096, 3072, dtype=torch.bfloat16)  # FLUX.1's cache point at 1024x1024
    rows = []
    for label, predictor, order in FORECASTERS:
        schedule = Schedule(tuple(keys), T, "flux", order, "reference", "manual", first_full_steps=3, predictor=predictor)
        own = own_time(schedule, big)
        rows.append([label, f"{statistics.median(secs[label]):.2f}", f"{statistics.median(ratio[label]):.3f}x",
                     f"{T / k:.2f}x", f"{own:.2f}"])
    fastest = sorted(rows, key=lambda r: float(r[4]))
    text = "\n\n".join([
        f"Command: `python -m bench.speed --forecasters --keys {k} --repeats {a.repeats} --threads {a.threads}`. Model: "
        f"FLUX-like DiT, config `{a.config}`, batch 1, T={T} Euler evaluations, K={k} uniform key steps, the same for "
        f"every forecaster. Full run: median {statistics.median(full_t):.2f} s over {a.repeats} repeats, each "
        f"forecaster run right after the full one. The cache's own time: the forecaster's calls alone (update at "
        f"the {k} keys, predict at the {T - k} others) over one run on FLUX.1's cache point at 1024x1024 "
        f"(4096 x 3072, bf16), median of 5. Machine: {machine()}.",
        md_table(["forecaster", "seconds (median)", "speed-up vs full (median of ratios)", "ideal T/K",
                  "cache's own time per run, FLUX.1 1024x1024 (s)"], rows),
        "Fastest first by the cache's own time: " + ", ".join(r[0] for r in fastest)
        + " (dpcache_core.choose.SPEED_ORDER).",
    ])
    write_result("speed_forecasters", text)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[50, 13, 10, 9, 7])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", choices=["bench", "toy"], default="bench")
    ap.add_argument("--forecasters", action="store_true",
                    help="Taylor 1, Taylor 2 and spectral at one K (the first of --keys below T, default 13)")
    a = ap.parse_args(argv)
    setup(a.threads)
    cfg = toy_model.BENCH_FLUX if a.config == "bench" else toy_model.TOY_FLUX
    model = toy_model.build_model(cfg) if a.config == "bench" else toy_model.load_builtin_model()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    noise, cond = toy_model.make_noise(cfg, 0), torch.tensor([3])
    toy_model.sample(model, noise, cond, 3, SHIFT)            # warm-up
    if a.forecasters:
        return forecasters(a, model, cfg, noise, cond)
    share = block_share(model, noise, cond)
    full_t, acc_t, ratio = [], {k: [] for k in a.keys}, {k: [] for k in a.keys}
    blocks = {}
    for r in range(a.repeats):
        t0 = time.perf_counter()
        ref = toy_model.sample(model, noise, cond, T, SHIFT)
        full_t.append(time.perf_counter() - t0)
        for k in a.keys:
            keys = uniform_key_steps(T, k, 3)
            model.block_calls = 0
            t0 = time.perf_counter()
            out, run = cached_sample(model, noise, cond, keys, T)
            dt = time.perf_counter() - t0
            acc_t[k].append(dt)
            ratio[k].append(full_t[-1] / dt)
            blocks[k] = (run.computed, model.block_calls)
            if k == T:
                assert torch.equal(out, ref), "K = T must reproduce the full run exactly"
        print(f"repeat {r + 1}/{a.repeats}: full {full_t[-1]:.2f} s, "
              + ", ".join(f"K={k} {acc_t[k][-1]:.2f} s" for k in a.keys), flush=True)
    rows, res = [], {}
    nblocks = cfg["depth_double"] + cfg["depth_single"]
    for k in a.keys:
        sp = statistics.median(ratio[k])
        ideal = T / k
        res[k] = dict(speedup=sp, efficiency=sp / ideal, seconds=statistics.median(acc_t[k]))
        label = f"K={k}" + (" (nothing skipped)" if k == T else "")
        rows.append([label, f"{statistics.median(acc_t[k]):.2f}", f"{sp:.3f}x", f"{ideal:.2f}x",
                     f"{sp / ideal:.1%}", f"{blocks[k][0]} ({blocks[k][1]} block calls)"])
    overhead = 1 / res[T]["speedup"] - 1 if T in res else float("nan")
    book = statistics.median(bookkeeping_share(model, noise, cond) for _ in range(3))
    text = "\n\n".join([
        f"Model: FLUX-like DiT, config `{a.config}` ({params:.1f} M parameters, "
        f"{(cfg['image_size'] // cfg['patch_size']) ** 2} image tokens, hidden {cfg['hidden']}, "
        f"{nblocks} blocks), batch 1, T={T} Euler evaluations, Taylor order 2. The blocks take "
        f"{share:.1%} of a full run. Full run: median {statistics.median(full_t):.2f} s over "
        f"{a.repeats} repeats. Machine: {machine()}.",
        md_table(["run", "seconds (median)", "speed-up vs full (median of ratios)", "ideal T/K",
                  "efficiency", "evaluations computed"], rows),
        f"Overhead with nothing skipped (K = T): {overhead:+.2%} (goal <= 2%; the output equals "
        f"the full run's bit for bit). Per-repeat ratios full/cached at K=T: "
        + ", ".join(f"{x:.3f}" for x in ratio.get(T, [])) + ". Timed directly, the cache's own "
        f"calls (`start_evaluation`, `update`: copying the feature and forming the Taylor factors) "
        f"take {book:.2%} of a K = T run (median of 3 runs).",
    ])
    write_result(f"speed_{a.config}", text)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(a.keys)
    ax.plot([T / k for k in ks], [res[k]["speedup"] for k in ks], "o-", label="measured")
    ax.plot([T / k for k in ks], [T / k for k in ks], "--", color="grey", label="ideal T/K")
    for k in ks:
        ax.annotate(f"K={k}", (T / k, res[k]["speedup"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set(xlabel="ideal speed-up T/K", ylabel="measured speed-up",
           title=f"CPU speed-up, {a.config} model, T={T}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(RESULTS, f"speed_{a.config}.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {os.path.relpath(path)}")
    return res


if __name__ == "__main__":
    main()
