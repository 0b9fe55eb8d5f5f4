"""The spectral forecaster's settings (degree, ridge, blend, ring) on fixed key steps, trained FLUX model.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.forecaster_sweep --keys 9 10 13 17 --plan prior
    COMFYUI_PATH=<ComfyUI> <its python> -m bench.forecaster_sweep --keys 10 13 17 --plan calibrated

Same model, prompts and metric as bench/forecasters.py (mean and worst PSNR of the decoded image
against the plain run, 8 held-out prompts). Key steps: DPCache Schedule's (prior: no calibration),
or the DP on an order-1 PACT from DPCache Calibrate on 4 prompts, or Spectrum's. Each setting
changes one argument of ``SpectralPredictor`` from its default.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import tempfile

import torch

from bench import comfy_bench as cb
from bench import comfy_env
from bench import forecasters as fc
from bench.spectrum import spectrum_key_steps
from bench.train_comfy_flux import WEIGHTS, load_prompts

SETTINGS = ({}, {"blend": 0.25}, {"blend": 0.75}, {"blend": 1.0}, {"degree": 3}, {"degree": 6},
            {"ridge": 0.01}, {"ridge": 1.0}, {"max_history": 6}, {"max_history": 10}, {"max_history": 16},
            {"centred": False})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[10, 13, 17])
    ap.add_argument("--plan", choices=("prior", "calibrated", "spectrum"), default="prior")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args(argv)
    boot = comfy_env.boot(cpu=True, extra_nodes=(cb.flux_detect_fix_dir(),))
    core = boot["core"]
    torch.set_num_threads(1)
    prompts = load_prompts(WEIGHTS)
    model = cb.load_model(WEIGHTS)
    held = cb.prompt_list(args.prompts, 9000)
    ref = cb.decode(model, torch.cat([cb.sample(model, prompts, c, s) for c, s in held]), prompts)
    apply = boot["nodes"]["DPCacheApply"]()
    own = core.runtime.SpectralPredictor
    print(f"| K | key steps ({args.plan}) | setting | PSNR mean (worst) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        pact = cb.calibrate(model, prompts, cb.prompt_list(4, 1000, offset=2), 1, folder) if args.plan == "calibrated" else None
        for k in args.keys:
            if args.plan == "spectrum":
                sched = fc.keyed(spectrum_key_steps(cb.STEPS, k), predictor="spectral")
            else:
                entry = pact or next(p for p in boot["nodes"]["DPCacheSchedule"].INPUT_TYPES()["required"]["pact"][0]
                                     if p.startswith("(prior"))
                sched = fc.node_schedule(entry, k, forecaster="spectral")
            patched = apply.apply(model, sched)["result"][0]
            for setting in SETTINGS:
                core.runtime.SpectralPredictor = functools.partial(own, **setting)
                try:
                    db = [cb.psnr(cb.decode(model, cb.sample(patched, prompts, c, s), prompts)[0], ref[i])
                          for i, (c, s) in enumerate(held)]
                finally:
                    core.runtime.SpectralPredictor = own
                print(f"| {k} | {list(sched.key_steps)} | {setting or 'default'} | "
                      f"{statistics.fmean(db):.2f} ({min(db):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
