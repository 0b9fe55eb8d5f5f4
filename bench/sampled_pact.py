"""Sampled calibration (issue 9): accuracy of a PACT estimated from S cache-point elements, and its
cost at real model sizes.

    python -m bench.sampled_pact accuracy   # ~15-25 min on 2 busy CPU cores
    python -m bench.sampled_pact cost       # ~10 min; needs git (for the "before" code) and ~4 GB

accuracy: the trained built-in FLUX-like model run at 184x184 (46x46 tokens x 128 channels =
270,848 cache-point elements, so S = 262,144 is still a sample), T = 50 Euler steps. Calibration
prompts are recorded once with every element and, at the same time, with S in {4k, 16k, 64k, 256k}
sampled elements (the recorder of the nodes, seed 0). For each S: the entry-wise relative error of
the mean sampled PACT against the mean full one (median, 99th percentile, over the entries the DP
can use), the exact-DP schedules at K in {7, 9, 10, 13} (first 3 steps full), whether they equal
the full PACT's, their path cost on the full PACT (% above the full PACT's own optimum), and the
PSNR of the schedules' outputs against full-compute runs of held-out prompts.

cost: synthetic smooth trajectories of real cache-point shapes (FLUX.1-dev 1024x1024: 4096 x 3072;
Wan2.1-14B 832x480x81: 32760 x 5120; 1280x720x81: 75600 x 5120), bf16 like on a GPU, 2 streams
(cond + uncond), T = 50. Each evaluation's feature is updated in place (the "model" holds one), so
only the recorder's and the build's memory is extra: the peak resident memory above the start
(kernel peak mark reset through /proc/self/clear_refs), the recording time per evaluation and the
build time of one sample (both streams), each case in a fresh process. "Before": the code of commit
fbfa3d0 (full float32 copies of every feature, then the full build), measured at N = 262,144 and
extrapolated linearly in N (the full recording of the real sizes does not fit in 24 GiB or in a
reasonable time); "after": the default S = 65,536, measured at every real size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

T = 50
SIZES = (4096, 16384, 65536, 262144)
KEYS = (7, 9, 10, 13)
FIRST_FULL = 3
SHAPES = [("FLUX.1-dev 1024x1024", (4096, 3072)), ("Wan2.1-14B 832x480x81", (32760, 5120)),
          ("Wan2.1-14B 1280x720x81", (75600, 5120))]
BEFORE_COMMIT = "fbfa3d0"
SMALL = (64, 4096)  # N = 262,144: where the old code is measured
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# accuracy


def accuracy(args) -> None:
    import numpy as np
    import torch

    from dpcache_core import PactAccumulator, TrajectoryRecorder, path_cost, solve_schedule
    from dpcache_demo import toy_model

    from .common import (SHIFT, cached_sample, calibration_prompts, held_out_prompts, machine, md_table, psnr,
                         write_result)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    trained = toy_model.load_builtin_model()
    cfg = dict(trained.config, image_size=args.image_size)
    model = toy_model.build_model(cfg)
    model.load_state_dict(trained.state_dict())  # positions are recomputed for the new size
    model.eval()
    started = time.time()
    sizes = [s for s in SIZES]
    accs = {s: PactAccumulator(T) for s in ["all"] + sizes}
    numel = None
    for cls, seed in calibration_prompts(args.calibration):
        recorders = {s: TrajectoryRecorder(sample_size=0 if s == "all" else s) for s in accs}

        def record(i, feature, velocity):
            for rec in recorders.values():
                rec.start_evaluation()
                rec.record("cond", feature)

        with torch.inference_mode():
            toy_model.sample(model, toy_model.make_noise(cfg, seed), cls, T, SHIFT, on_evaluation=record)
        numel = recorders["all"].trajectory("cond").shape[1]
        for s, rec in recorders.items():
            t0 = time.process_time()
            accs[s].add(rec.build_sample(order=2))
            print(f"prompt {seed}: S={s} built in {time.process_time() - t0:.2f} s CPU", flush=True)
            rec.close()
    full = accs["all"].mean()
    usable = np.isfinite(full) & (full > 0)
    schedules = {s: {k: solve_schedule(accs[s].mean(), k, FIRST_FULL) for k in KEYS} for s in accs}

    test = held_out_prompts(args.held_out)
    noise = torch.cat([toy_model.make_noise(cfg, s) for _, s in test])
    cond = torch.tensor([c for c, _ in test])
    with torch.inference_mode():
        reference = toy_model.sample(model, noise, cond, T, SHIFT)
    outputs = {}
    for per_k in schedules.values():
        for k, keys in per_k.items():
            if tuple(keys) not in outputs:
                with torch.inference_mode():
                    out, _ = cached_sample(model, noise, cond, keys, T)
                outputs[tuple(keys)] = float(psnr(out, reference).mean())

    rows = []
    for s in accs:
        est = accs[s].mean()
        rel = np.abs(est[usable] - full[usable]) / full[usable]
        cells = [f"{s:,}" if s != "all" else f"all ({numel:,})",
                 "-" if s == "all" else f"{100 * np.median(rel):.2f}%",
                 "-" if s == "all" else f"{100 * np.percentile(rel, 99):.2f}%"]
        for k in KEYS:
            keys = schedules[s][k]
            best = path_cost(full, schedules["all"][k])
            excess = 100 * (path_cost(full, keys) / best - 1)
            same = keys == schedules["all"][k]
            cells.append(f"{'same' if same else f'differs, +{excess:.2f}%'}; {outputs[tuple(keys)]:.2f} dB")
        rows.append(cells)
    header = ["S (elements per stream)", "rel. error median", "rel. error p99"] + [f"K={k}: schedule vs full; PSNR" for k in KEYS]
    keys_text = "\n".join(f"- K={k}: full PACT keys {schedules['all'][k]}" for k in KEYS)
    text = (
        f"Sampled PACT accuracy: trained built-in model at {args.image_size}x{args.image_size} "
        f"(N = {numel:,} cache-point elements), T = {T}, order 2, mean over {args.calibration} calibration prompts; "
        f"PSNR over {args.held_out} held-out prompts against their full-compute runs. Relative error over the "
        f"{int(usable.sum()):,} entries the DP can use. \"differs, +x%\": the sampled schedule's path cost on the "
        f"full PACT, above the full PACT's optimum.\n\n"
        + md_table(header, rows) + "\n\n" + keys_text + "\n\n"
        f"Command: `python -m bench.sampled_pact accuracy` ({time.time() - started:.0f} s). Machine: {machine()}."
    )
    write_result("sampled_pact_accuracy", text)


# --------------------------------------------------------------------------------------------
# cost


def proc_status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def case(args) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, args.root)
    import torch

    from dpcache_core import runtime

    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(shape, generator=g).to(torch.bfloat16)
    channel = torch.randn(shape[-1], generator=g).to(torch.bfloat16) * 0.02
    token = torch.randn(shape[0], 1, generator=g).to(torch.bfloat16) * 0.01
    old = not hasattr(runtime, "DEFAULT_SAMPLE_SIZE")
    kw = {} if old else {"sample_size": args.sample_size}
    recorder = runtime.TrajectoryRecorder(storage_device="cpu", **kw)
    start = proc_status("VmRSS")
    reset_peak()
    record_s = record_cpu = 0.0
    for t in range(T):
        feature.add_(channel).add_(token, alpha=(2 * t + 1) / T)  # smooth: linear + quadratic in t
        t0, c0 = time.perf_counter(), time.process_time()
        recorder.start_evaluation()
        for stream in ("cond", "uncond"):
            recorder.record(stream, feature)
        record_s += time.perf_counter() - t0
        record_cpu += time.process_time() - c0
    recorded = proc_status("VmHWM") - start
    wall, cpu = time.perf_counter(), time.process_time()
    recorder.build_sample(order=2)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = proc_status("VmHWM") - start
    print(json.dumps(dict(numel=feature.numel(), record_peak=recorded, peak=peak, record_per_eval=record_s / T, record_cpu_per_eval=record_cpu / T,
                          build_wall=wall, build_cpu=cpu, old=old)))


def run_case(root: str, shape, sample_size: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.sampled_pact", "case", "--root", root, "--shape", *map(str, shape),
           "--sample-size", str(sample_size), "--threads", str(threads)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(shape, sample_size, result, flush=True)
    return result


def cost(args) -> None:
    import torch

    from .common import machine, md_table, write_result

    torch.set_num_threads(args.threads)  # what the cases use (and what machine() reports)

    started = time.time()
    mib = 2**20
    with tempfile.TemporaryDirectory() as old_root:
        archive = subprocess.run(["git", "archive", BEFORE_COMMIT, "dpcache_core"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", old_root], input=archive.stdout, check=True)
        before = run_case(old_root, SMALL, 0, args.threads)
    exact_small = run_case(REPO, SMALL, 0, args.threads)
    sampled_small = run_case(REPO, SMALL, args.sample_size, args.threads)
    n_small = before["numel"]

    def build(r):
        return f"{r['build_cpu']:.2f} ({r['build_wall']:.1f})"

    def ms(r):
        return f"{1000 * r['record_cpu_per_eval']:.2f} ({1000 * r['record_per_eval']:.1f})"

    rows = [[f"N = {n_small:,} (measured)", "before (full, old build)", f"{before['peak'] / mib:.0f}",
             build(before), ms(before)],
            [f"N = {n_small:,} (measured)", "all elements, new build", f"{exact_small['peak'] / mib:.0f}",
             build(exact_small), ms(exact_small)],
            [f"N = {n_small:,} (measured)", f"S = {args.sample_size:,}", f"{sampled_small['peak'] / mib:.0f}",
             build(sampled_small), ms(sampled_small)]]
    for name, shape in SHAPES:
        numel = shape[0] * shape[1]
        scale = numel / n_small
        rows.append([f"{name}, N = {numel:,}", "before (extrapolated x N)", f"{before['peak'] * scale / mib:,.0f}",
                     f"{before['build_cpu'] * scale:,.0f} ({before['build_wall'] * scale:,.0f})", "-"])
        after = run_case(REPO, shape, args.sample_size, args.threads)
        rows.append([f"{name}, N = {numel:,}", f"S = {args.sample_size:,} (measured)", f"{after['peak'] / mib:.0f}",
                     build(after), ms(after)])
    header = ["cache point, 2 streams (cfg)", "calibration", "peak extra memory, MiB (both streams)",
              "build of one sample, s CPU (wall)", "recording, ms CPU (wall) per evaluation"]
    text = (
        f"Calibration cost per sample at real sizes: synthetic smooth bf16 trajectories, T = {T}, 2 streams, "
        f"{args.threads} thread(s). CPU time is the process's own (the machine is shared: wall time runs several times "
        f"longer under load). Peak extra memory: resident peak (VmHWM after a reset) above the start, over "
        f"recording and build. \"Before\": dpcache_core of commit {BEFORE_COMMIT}, measured at N = {n_small:,} and "
        f"scaled linearly in N (its memory is 2 x T x N x 4 bytes per stream, its build time linear in N).\n\n"
        + md_table(header, rows) + "\n\n"
        f"Command: `python -m bench.sampled_pact cost` ({time.time() - started:.0f} s). Machine: {machine()}."
    )
    write_result("sampled_pact_cost", text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--image-size", type=int, default=184)
    acc.add_argument("--calibration", type=int, default=3)
    acc.add_argument("--held-out", type=int, default=4)
    acc.add_argument("--threads", type=int, default=1)
    cst = sub.add_parser("cost")
    cst.add_argument("--sample-size", type=int, default=65536)
    cst.add_argument("--threads", type=int, default=1)
    one = sub.add_parser("case")
    one.add_argument("--root", required=True)
    one.add_argument("--shape", type=int, nargs=2, required=True)
    one.add_argument("--sample-size", type=int, default=0)
    one.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    {"accuracy": accuracy, "cost": cost, "case": case}[args.command](args)


if __name__ == "__main__":
    main()
