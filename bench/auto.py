"""Apply DPCache's automatic mode in a real ComfyUI, on the trained FLUX bench model of bench/comfy_bench.py.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.auto                 # N = 8 prompts, ~2 min on 2 CPU cores
    COMFYUI_PATH=<ComfyUI> <its python> -m bench.auto setting         # does resolution / a LoRA move the plan?

``run`` (default): one Apply DPCache with nothing connected samples N held-out prompts in a row
(euler 50 steps, scheduler simple, cfg 1, as comfy_compare). Run 1 finds no PACT for this setting:
it computes every evaluation and calibrates; runs 2..N are planned from that one-sample PACT at the
default budget (K = 13 of 50). Side by side, on the same prompts 2..N: DPCache Schedule on a PACT
calibrated by DPCache Calibrate on 4 other prompts (order 1, K = 13), and (uniform) K = 13 at Taylor
order 1 and 2. Reported: share of block work skipped (block calls counted), PSNR of the decoded
image against the plain run (mean and worst), mean wall time per run and its ratio to plain.

``setting``: calibrates through the automatic mode at 128x128 and 256x256 pixels (latent 16 and
32), and with a synthetic LoRA (a low-rank change of every attention projection); prints each
setting's key steps at K = 13 and the PSNR of each plan on the other setting's runs. That decides
whether the resolution and a LoRA set deserve their own PACT (dpcache_core/settings.py).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch

from bench import comfy_env
from bench.comfy_bench import (BlockCounter, calibrate, conditioning, decode, flux_detect_fix_dir, load_model,
                               machine_name, prompt_list, psnr)
from bench.comfy_compare import dpcache
from bench.train_comfy_flux import LATENT_SIZE, WEIGHTS, load_prompts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEPS, K = 50, 13


def sample(model, prompts: dict, cls: int, seed: int, size: int = LATENT_SIZE) -> torch.Tensor:
    """comfy_bench.sample at any latent size (KSampler's path, euler 50 steps, cfg 1)."""
    import comfy.sample
    latent = torch.zeros(1, 16, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = conditioning(prompts, cls)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", cond, cond, latent, seed=seed,
                                   disable_pbar=True)


def apply_auto(model):
    (patched,) = comfy_env.boot()["nodes"]["DPCacheApply"]().apply(model)
    return patched


def timed(model, base, prompts, cls, seed, size=LATENT_SIZE):
    with BlockCounter(base) as counter:
        t0 = time.perf_counter()
        out = sample(model, prompts, cls, seed, size)
        dt = time.perf_counter() - t0
    return out, dt, counter.calls


# ----------------------------------------------------------------------------------- run

def run(args) -> str:
    comfy_env.boot(cpu=True, extra_nodes=(flux_detect_fix_dir(),))
    torch.set_num_threads(args.threads)
    import folder_paths
    prompts = load_prompts(args.weights)
    model = load_model(args.weights)
    held_out = prompt_list(args.prompts, 9000, offset=0)
    calib = prompt_list(4, 1000, offset=2)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        folder_paths.add_model_folder_path("dpcache", folder, is_default=True)
        auto = apply_auto(model)
        pact = calibrate(model, prompts, calib, 1, folder)
        methods = {
            "DPCache calibrated (4 prompts, DPCache Calibrate), K=13 o1": dpcache(pact, K, 1)(model),
            "DPCache (uniform) K=13 o1": dpcache("(uniform)", K, 1)(model),
            "DPCache (uniform) K=13 o2": dpcache("(uniform)", K, 2)(model),
        }
        names = ["plain", "auto run 1 (calibrates)", "auto runs 2..N (planned)"] + list(methods)
        for name in names:
            rows[name] = {"psnr": [], "seconds": [], "calls": []}
        full_calls = None
        for p, (cls, seed) in enumerate(held_out):
            ref, dt, calls = timed(model, model, prompts, cls, seed)
            full_calls = calls
            ref_img = decode(model, ref, prompts)
            rows["plain"]["seconds"].append(dt)
            rows["plain"]["calls"].append(calls)
            rows["plain"]["psnr"].append(math.inf)
            out, dt, calls = timed(auto, model, prompts, cls, seed)
            name = "auto run 1 (calibrates)" if p == 0 else "auto runs 2..N (planned)"
            for key, value in (("psnr", psnr(decode(model, out, prompts), ref_img)), ("seconds", dt), ("calls", calls)):
                rows[name][key].append(value)
            if p == 0:
                files = [f for f in os.listdir(folder) if f.startswith("auto_")]
                print(f"run 1 wrote {files}", flush=True)
                continue
            for mname, patched in methods.items():
                out, dt, calls = timed(patched, model, prompts, cls, seed)
                for key, value in (("psnr", psnr(decode(model, out, prompts), ref_img)), ("seconds", dt), ("calls", calls)):
                    rows[mname][key].append(value)
            print(f"prompt {p + 1}/{len(held_out)} done", flush=True)
    plain_s = statistics.fmean(rows["plain"]["seconds"][1:]) if len(held_out) > 1 else rows["plain"]["seconds"][0]
    lines = [
        f"Model: bench/comfy_bench.py's trained FLUX-architecture model (hidden 128, 2 double + 3 single blocks), latent "
        f"16x16, euler {STEPS} steps, scheduler simple, cfg 1; {len(held_out)} held-out prompts (comfy_compare's), one "
        f"Apply DPCache with nothing connected sampling them in a row. PSNR: decoded 16x16 RGB image against the plain "
        f"run of the same prompt (as comfy_compare). Wall time: mean seconds per run, ratio to plain's mean over prompts "
        f"2..N (a shared 2-core machine: timings are noisy). Full run: {full_calls} block calls.",
        "",
        "| method | runs | block work skipped | PSNR mean (dB) | PSNR worst | wall per run (s) | plain / method |",
        "|---|---|---|---|---|---|---|",
    ]

    def db(v):
        return "inf" if not math.isfinite(v) else f"{v:.1f}"
    for name in names:
        r = rows[name]
        if not r["seconds"]:
            continue
        sec = statistics.fmean(r["seconds"])
        skipped = 1 - statistics.fmean(r["calls"]) / full_calls
        which = "1" if name.startswith("auto run 1") else ("2..N" if name != "plain" else "1..N")
        lines.append(f"| {name} | {which} ({len(r['seconds'])}) | {skipped:.0%} | {db(statistics.fmean(r['psnr']))} | "
                     f"{db(min(r['psnr']))} | {sec:.3f} | {plain_s / sec:.2f}x |")
    lines += ["", f"Machine: {machine_name()}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- setting

def synthetic_lora(model, rank: int = 4, scale: float = 0.3, seed: int = 0):
    """A clone of ``model`` with a low-rank "diff" patch on every attention projection (like a LoRA's effect)."""
    lora = model.clone()
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for key, w in model.model.state_dict().items():
        if key.endswith(("qkv.weight", "linear1.weight")) and w.ndim == 2:
            up = torch.randn(w.shape[0], rank, generator=g) / math.sqrt(rank)
            down = torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
            patches[key] = (scale * (up @ down) * w.std(),)
    lora.add_patches(patches, 1.0)
    return lora


def keys_of(folder: str, num_keys: int = K) -> list[int]:
    core = comfy_env.boot()["core"]
    (name,) = [f for f in os.listdir(folder) if f.startswith("auto_")]
    acc, meta = core.load_pact(os.path.join(folder, name))
    return core.solve_schedule(acc.mean(), num_keys, 3, 0, convention=meta.get("convention", "reference"))


def setting(args) -> str:
    """Each setting calibrated by the automatic mode (one run, its own folder) on two different
    calibration prompts (A, B: the spread of a one-sample PACT), then every plan applied to the
    held-out runs of every setting."""
    comfy_env.boot(cpu=True, extra_nodes=(flux_detect_fix_dir(),))
    torch.set_num_threads(args.threads)
    import folder_paths
    core, nodes = comfy_env.boot()["core"], comfy_env.boot()["nodes"]
    prompts = load_prompts(args.weights)
    model = load_model(args.weights)
    lora = synthetic_lora(model)
    calib = dict(zip("AB", prompt_list(2, 1000, offset=2)))
    runs = prompt_list(args.prompts, 9000, offset=0)
    variants = {"128 px": (model, 16), "256 px": (model, 32), "128 px + LoRA": (lora, 16)}
    plans = {}
    with tempfile.TemporaryDirectory() as root:
        for name, (m, size) in variants.items():
            for c in ("AB" if "LoRA" not in name else "A"):
                folder = os.path.join(root, f"{len(plans)}")
                os.makedirs(folder)
                folder_paths.add_model_folder_path("dpcache", folder, is_default=True)
                sample(apply_auto(m), prompts, *calib[c], size)  # run 1 at this setting: the automatic calibration
                plans[f"{name}, prompt {c}"] = keys_of(folder)
                print(f"{name} calibrated on prompt {c}: keys {plans[f'{name}, prompt {c}']}", flush=True)
        base_lora = sample(lora, prompts, *runs[0]) - sample(model, prompts, *runs[0])
        lora_effect = 10 * math.log10(1.0 / max(torch.mean(base_lora.double() ** 2).item(), 1e-30))
        table = {}
        for target, (m, size) in variants.items():
            refs = [decode(model, sample(m, prompts, cls, seed, size), prompts) for cls, seed in runs]
            for plan, keys in plans.items():
                sched = core.Schedule(tuple(keys), STEPS, order=1, source="manual", convention="skip")
                patched = nodes["DPCacheApply"]().apply(m, sched)["result"][0]
                vals = [psnr(decode(model, sample(patched, prompts, cls, seed, size), prompts), ref)
                        for (cls, seed), ref in zip(runs, refs)]
                table[target, plan] = statistics.fmean(vals)
            print(target, {p: round(table[target, p], 2) for p in plans}, flush=True)
    lines = [
        f"Each setting calibrated by the automatic mode (its run 1: one prompt, order 1, sampled) on two different "
        f"calibration prompts A and B (the spread of a one-sample PACT), K = {K} of {STEPS} planned from each; every "
        f"plan applied to {len(runs)} held-out prompts of every setting. Cell: mean PSNR (dB) of the decoded image "
        f"against that setting's plain run. Synthetic LoRA: rank-4 diff patches on every qkv / linear1 weight (the "
        f"output latent moves to {lora_effect:.1f} dB of the base model's).",
        "",
        "| plan from | keys (K=13 of 50) | " + " | ".join(f"runs at {t}" for t in variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for plan, keys in plans.items():
        lines.append(f"| {plan} | {keys} | " + " | ".join(f"{table[t, plan]:.1f}" for t in variants) + " |")
    lines += ["", f"Machine: {machine_name()}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="run", choices=("run", "setting"))
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (run: N, the first calibrates)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--out", default=None, help="write the table here (default bench/results/auto[_setting].md)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    text = run(args) if args.what == "run" else setting(args)
    text += f" Wall time of the whole bench: {time.perf_counter() - t0:.0f} s."
    out = args.out or os.path.join(RESULTS, "auto.md" if args.what == "run" else "auto_setting.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
