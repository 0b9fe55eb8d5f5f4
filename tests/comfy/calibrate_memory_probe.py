"""One sampling run of the full-width test FLUX in real ComfyUI, plain or through DPCache Calibrate,
in its own process: prints one JSON line with the peak resident memory added during sampling (the
kernel's peak mark is reset just before) and the times. Run by test_host_calibrate_memory.py:

    COMFYUI_PATH=... python calibrate_memory_probe.py MODEL {plain,calibrate} PACT_DIR
"""
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

STEPS, SIZE, TXT_TOKENS = 20, 512, 16


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def warm_up(core, folder: str) -> None:
    """Both modes touch the pack's calibration code once on a tiny trajectory before the peak mark is
    reset, so the pages of torch/numpy/safetensors code that calibration runs for the first time
    (shared library text, not data) count in neither peak: what is compared is the data calibration keeps."""
    import torch

    recorder = core.runtime.TrajectoryRecorder(sample_size=256, expected_evals=8)
    for _ in range(8):
        recorder.start_evaluation()
        recorder.record("warm", torch.randn(1, 64, 32))
    acc = core.PactAccumulator(8)
    acc.add(recorder.build_sample(2, "reference"), history=recorder.build_history_sample(2, "reference"))
    core.save_pact(os.path.join(folder, ".warm-up.safetensors"), acc, {"model_family": "warm-up"})
    os.unlink(os.path.join(folder, ".warm-up.safetensors"))
    recorder.close()


def main() -> None:
    model_path, mode, pact_dir = sys.argv[1:4]
    state = comfy_host.boot()
    import torch
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import folder_paths
    import nodes

    torch.set_num_threads(2)
    model = comfy.sd.load_diffusion_model(model_path)
    timers = {"record": 0.0, "build": 0.0}
    if mode == "calibrate":
        folder_paths.add_model_folder_path("dpcache", pact_dir, is_default=True)
        recorder = state["core"].runtime.TrajectoryRecorder
        for name in ("record", "build_sample", "build_history_sample"):  # time what calibration adds, from inside
            inner = getattr(recorder, name)

            def timed(*a, inner=inner, key=name.split("_")[0], **k):
                t0 = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    timers[key] += time.perf_counter() - t0

            setattr(recorder, name, timed)
        (model,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, "w3072", 2, True)
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, TXT_TOKENS, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, 1)
    comfy.model_management.load_models_gpu([model])  # weights in place before the peak mark is reset
    warm_up(state["core"], pact_dir)
    gc.collect()
    start = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", pos, pos, latent, seed=1, disable_pbar=True)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "peak_above_start": status("VmHWM") - start, "start": start,
                      "seconds": seconds, "record_s": timers["record"], "build_s": timers["build"],
                      "steps": STEPS, "cache_point_elements": (SIZE // 16) ** 2 * 3072}))


if __name__ == "__main__":
    main()
