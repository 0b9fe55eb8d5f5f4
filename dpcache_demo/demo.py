"""The whole DPCache pipeline on the built-in model: calibrate -> PACT -> schedule -> accelerated run.

    python -m dpcache_demo.demo            # T=50, K=13, 4 calibration prompts, 4 held-out ones
    python -m dpcache_demo.demo --steps 20 # K follows T: round(T / 3.85), 5 here

Prints evaluations computed, the wall-clock speed-up against the full run measured side by side
in this process, and fidelity (PSNR, relative L1) of the final output; writes the PACT, a picture
of it with the chosen path, and the images to ``--out``, each as soon as it is made (an interrupted
run keeps what finished).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import toy_model
from dpcache_core.pact import PactAccumulator, default_max_gap
from dpcache_core.runtime import CacheRun, TrajectoryRecorder
from dpcache_core.schedule import PLANNING, Schedule, cost_for, hop_costs_history, path_cost, solve_schedule, solve_schedule_history
from dpcache_core.store import save_pact


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB for images in [-1, 1]."""
    mse = torch.mean((output.double() - reference.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.sum(torch.abs(output - reference)) / torch.sum(torch.abs(reference))).item()


def calibrate(model, prompts, num_steps, order, shift) -> PactAccumulator:
    """Full-compute runs of ``prompts`` ((class, seed) pairs), one PACT sample each."""
    acc = PactAccumulator(num_steps)
    for cls, seed in tqdm(prompts, desc="calibrating", unit="prompt"):
        recorder = TrajectoryRecorder()

        def record(index, feature, velocity):
            recorder.start_evaluation()
            recorder.record("cond", feature)

        noise = toy_model.make_noise(model.config, seed)
        toy_model.sample(model, noise, cls, num_steps, shift, on_evaluation=record)
        history = recorder.build_history_sample(order=order) if order >= 2 else None  # history-exact cost
        acc.add(recorder.build_sample(order=order), history=history)
        recorder.close()
    return acc


def accelerated_sample(model, noise, cls, schedule: Schedule, shift):
    """Sampling that runs the blocks only at the schedule's key evaluations; returns (output, run)."""
    run = CacheRun(schedule)

    def feature_fn(index, state):
        if run.start_evaluation():
            feature = model.run_blocks(state)
            run.update("cond", feature)
            return feature
        return run.predict("cond", dtype=state_dtype(state))

    try:
        return toy_model.sample(model, noise, cls, schedule.num_evals, shift, feature_fn=feature_fn), run
    finally:
        run.close()


def state_dtype(state) -> torch.dtype:
    return next(v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


MAX_STEPS = 200  # the PACT holds (T, T+1, T+1) sums and counts: 130 MB at T = 200, 16 GB at T = 1000


def smallest_feasible_keys(num_evals: int, first_full_steps: int, order: int) -> int:
    """The least K for which the demo's PACT has a finite schedule.

    The first max(first_full_steps, order + 1) evaluations are keys (from a key below ``order``
    a PACT only allows a hop of one step) and every later hop is at most the hop cap
    max(int(0.3 T), 1).
    """
    start = min(max(first_full_steps, order + 1), num_evals)
    return start + math.ceil((num_evals - start + 1) / default_max_gap(num_evals)) - 1


IDEAL_SPEEDUP = 3.85  # the default K is about T / 3.85: 13 of 50, the paper's FLUX setting


def default_keys(num_evals: int, first_full_steps: int, order: int) -> int:
    """K when --keys is not given: round(T / 3.85), at least first_full_steps + 1 and the smallest K
    the hop cap allows, at most T."""
    wanted = max(round(num_evals / IDEAL_SPEEDUP), first_full_steps + 1,
                 smallest_feasible_keys(num_evals, first_full_steps, order))
    return min(wanted, num_evals)


def argument_problem(args) -> str | None:
    """The first argument out of its valid range, as one line that gives the range; None if all are fine.
    Fills in the default --keys for --steps once the step count is known to be valid."""
    if not 1 <= args.order <= 3:
        return f"--order must be 1, 2 or 3, got {args.order}"
    if not args.order + 1 <= args.steps <= MAX_STEPS:
        return f"--steps must be between {args.order + 1} (order {args.order} + 1) and {MAX_STEPS}, got {args.steps}"
    if not 1 <= args.first_full_steps <= args.steps:
        return f"--first-full-steps must be between 1 and --steps ({args.steps}), got {args.first_full_steps}"
    low = smallest_feasible_keys(args.steps, args.first_full_steps, args.order)
    if args.keys is None:
        args.keys = default_keys(args.steps, args.first_full_steps, args.order)
    if not low <= args.keys <= args.steps:
        return (f"--keys must be between {low} and {args.steps} for --steps {args.steps} and --first-full-steps "
                f"{args.first_full_steps} (hop cap {default_max_gap(args.steps)}), got {args.keys}")
    for flag in ("calibration_prompts", "test_prompts", "repeats"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
    if not (math.isfinite(args.shift) and args.shift > 0):
        return f"--shift must be a positive number, got {args.shift}"
    return out_problem(args.out)


def out_problem(out: str) -> str | None:
    """Why the output folder cannot be used (created here if missing, then checked writable); None if it can."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file; give a folder"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        return f"--out {out} cannot be created ({exc.strerror or exc}); give a folder you can write to"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out} is not writable; give a folder you can write to"
    return None


def speedup_note(measured: float, ideal: float) -> str:
    """A caveat when the measured speed-up is above the ideal T/K, which only timing noise can explain."""
    if measured <= ideal:
        return ""
    return ("\n                 (above the ideal: timing on a shared CPU is noisy, each pair is a few seconds; "
            "python -m bench.speed repeats it for careful figures)")


def time_one_evaluation(model) -> float:
    """Seconds of one model evaluation on this machine: the median of 3 after a warm-up (a shared
    machine makes single timings noisy)."""
    noise = toy_model.make_noise(model.config, 0)
    toy_model.sample(model, noise, 0, 1)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        toy_model.sample(model, noise, 0, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def expected_seconds(args, per_evaluation: float) -> float:
    """Calibration runs and, per held-out prompt and repeat, one full run and one DPCache run (its
    predicted evaluations cost next to nothing where the blocks dominate)."""
    evaluations = args.calibration_prompts * args.steps + args.test_prompts * args.repeats * (args.steps + args.keys)
    return evaluations * per_evaluation


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def image_rows(render_image_rows, images, held_out, psnrs, keys):
    """The picture of the prompts done so far: rows full run and DPCache, a column per prompt."""
    return render_image_rows([
        ("full run", [toy_model.to_uint8(full)[0] for full, _ in images]),
        (f"DPCache K={keys}", [toy_model.to_uint8(fast)[0] for _, fast in images]),
    ], scale=8, font_px=16, columns=[f"prompt {n + 1}: {toy_model.CLASS_NAMES[cls]}" for n, (cls, _) in enumerate(held_out[:len(images)])],
        captions={1: [f"PSNR {p:.1f} dB vs full run" for p in psnrs]})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Hop cap: no two consecutive key evaluations may be more than max(int(0.3 T), 1) evaluations apart "
               "(15 at T = 50), which sets the smallest K for each T.")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps T, one evaluation each (Euler) (default: %(default)s)")
    parser.add_argument("--keys", type=int, default=None,
                        help="key evaluations K computed in full (default: round(T / 3.85), at least --first-full-steps + 1 "
                             "and the smallest K the hop cap allows: 13 at T = 50)")
    parser.add_argument("--first-full-steps", type=int, default=3, help="first evaluations always computed (default: %(default)s)")
    parser.add_argument("--calibration-prompts", type=int, default=4, help="prompts run in full to build the PACT (default: %(default)s)")
    parser.add_argument("--test-prompts", type=int, default=4, help="held-out prompts for speed and fidelity (default: %(default)s)")
    parser.add_argument("--order", type=int, default=1,
                        help="Taylor order; 1: the PACT models the run-time predictor exactly, see BENCHMARKS.md (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed full/DPCache pairs per held-out prompt (default: %(default)s)")
    parser.add_argument("--shift", type=float, default=3.0, help="sigma shift of the sampler (default: %(default)s)")
    parser.add_argument("--model", choices=["builtin", "bench"], default="builtin",
                        help="builtin: the trained small model (about 30 s); bench: a larger random-weight one where the "
                             "blocks dominate, as in a real model (about 20 min on 2 CPU cores) (default: %(default)s)")
    parser.add_argument("--out", default="out/demo", help="folder for the PACT, its picture and the images (default: %(default)s)")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = argument_problem(args)
    if problem:  # before any work: one line, exit code 2 (argparse's code for bad arguments)
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    model = toy_model.load_builtin_model() if args.model == "builtin" else toy_model.build_model(toy_model.BENCH_FLUX)
    classes = len(toy_model.CLASS_NAMES)
    calib = [(n % classes, 1000 + n) for n in range(args.calibration_prompts)]
    held_out = [((7 * n + 3) % classes, 5000 + n) for n in range(args.test_prompts)]
    per_evaluation = time_one_evaluation(model)
    print(f"expected time    about {duration(expected_seconds(args, per_evaluation))} here ({args.model} model, "
          f"{per_evaluation:.2f} s per evaluation; writes to {args.out} as it goes)", flush=True)

    kept = []  # what is written so far, said if the run is interrupted
    try:
        return run_demo(args, model, calib, held_out, kept)
    except KeyboardInterrupt:
        print(f"\ninterrupted; kept {', '.join(kept) if kept else 'nothing yet (calibration had not finished)'}", file=sys.stderr)
        raise SystemExit(130) from None


def run_demo(args, model, calib, held_out, kept: list) -> dict:
    """Calibrate, plan, and time full against DPCache runs; each file is written (and added to ``kept``) when made."""
    t0 = time.perf_counter()
    acc = calibrate(model, calib, args.steps, args.order, args.shift)
    cost = cost_for(acc.mean(), "skip")  # skip-only costs (BENCHMARKS.md, planning objective)
    calibration_s = time.perf_counter() - t0
    pact_path = os.path.join(args.out, "demo_pact.safetensors")
    save_pact(pact_path, acc, {"model_family": "flux", "order": args.order, "scheme": "reference", "convention": "skip",
                               "sampler": "euler", "resolution": [model.config["image_size"]] * 2})
    kept.append(pact_path)
    t0 = time.perf_counter()
    hops = None
    if args.order >= 2:  # history-exact: the costs of the keys the run's predictor really holds
        keys = solve_schedule_history(acc.history_mean(), args.keys, args.first_full_steps)
        hops = hop_costs_history(acc.history_mean(), keys, args.first_full_steps)
    else:
        keys = solve_schedule(cost, args.keys, args.first_full_steps)
    solve_ms = (time.perf_counter() - t0) * 1000
    schedule = Schedule(tuple(keys), args.steps, "flux", args.order, "reference", "pact:demo",
                        sum(hops) if hops else path_cost(cost, keys), args.first_full_steps,
                        convention="history" if hops else "skip")
    from dpcache_core.picture import render_image_rows, render_pact_path, write_png

    picture_path = os.path.join(args.out, "pact_schedule.png")
    images_path = os.path.join(args.out, "full_vs_dpcache.png")
    write_png(picture_path, render_pact_path(cost, keys, title=f"demo PACT, {len(calib)} prompts, {schedule.planned_by}", hop_costs=hops))
    kept.append(picture_path)

    ratios, psnrs, l1s, computed, images = [], [], [], [], []
    with tqdm(total=len(held_out) * args.repeats, desc="full vs DPCache", unit="pair") as progress:
        for cls, seed in held_out:
            noise = toy_model.make_noise(model.config, seed)
            for _ in range(args.repeats):  # interleaved, so machine drift hits both alike
                start = time.perf_counter()
                full = toy_model.sample(model, noise, cls, args.steps, args.shift)
                full_s = time.perf_counter() - start
                start = time.perf_counter()
                fast, run = accelerated_sample(model, noise, cls, schedule, args.shift)
                ratios.append(full_s / (time.perf_counter() - start))
                progress.update()
            psnrs.append(psnr(fast, full))
            l1s.append(relative_l1(fast, full))
            computed.append(run.computed)
            images.append((full, fast))
            write_png(images_path, image_rows(render_image_rows, images, held_out, psnrs, args.keys))
            if images_path not in kept:
                kept.append(images_path)

    result = {
        "evaluations": args.steps,
        "key_steps": keys,
        "computed": statistics.median(computed),
        "ideal_speedup": schedule.ideal_speedup,
        "speedup": statistics.median(ratios),
        "psnr_db": statistics.median(psnrs),
        "relative_l1": statistics.median(l1s),
    }
    print()
    print(f"model            {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")
    print(f"calibration      {len(calib)} prompts x {args.steps} evaluations in {calibration_s:.1f} s -> {pact_path}")
    print(f"schedule         K={args.keys} of T={args.steps} in {solve_ms:.1f} ms ({PLANNING[schedule.convention]}): {keys}")
    print(f"evaluations      {result['computed']:.0f} computed in full, {args.steps - result['computed']:.0f} predicted")
    print(f"speed-up         {result['speedup']:.2f}x measured (median of {len(ratios)} interleaved pairs; ideal T/K = {schedule.ideal_speedup:.2f}x)"
          + speedup_note(result["speedup"], schedule.ideal_speedup))
    print(f"fidelity         PSNR {result['psnr_db']:.1f} dB, relative L1 {result['relative_l1']:.4f} "
          f"(median over {len(held_out)} held-out prompts, final output vs the full run)")
    print(f"pictures         {picture_path}, {images_path} (rows: full run, DPCache; a column per prompt, PSNR under each DPCache image)")
    return result


if __name__ == "__main__":
    main()
