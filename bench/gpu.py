"""DPCache at full model size on one GPU: wall time, speed-up, efficiency, extra memory, calibration cost.

    python -m bench.gpu                         # CUDA: FLUX.1-dev size and Wan2.1-14B size, ~5 min
    COMFYUI_PATH=<ComfyUI> python -m bench.gpu  # the same through ComfyUI's own Flux / Wan classes,
                                                # its sampler and the pack's Apply / Calibrate nodes
    python -m bench.gpu --tiny                  # tiny sizes on the CPU (what the test suite runs)

Models (seeded random weights, bf16 on CUDA):
  flux: 19 double + 38 single blocks, hidden 3072, 24 heads, MLP ratio 4, 4096 image tokens
        (1024x1024: latent 16x128x128, patch 2) + 512 text tokens (context 4096).
  wan:  40 blocks, dim 5120, 40 heads, FFN 13824, 480p (latent 60x104 per frame; the pack's own
        model is square: 80x80, 1600 tokens a frame instead of 1560), 9 frames (3 latent frames,
        reduced from 81 so the run fits the time), 512 text tokens.
Without COMFYUI_PATH they are the pack's own FLUX-like / Wan-like DiTs (dpcache_demo.toy_model) with
those sizes, sampled by its Euler loop with the core's CacheRun; with it, ComfyUI's classes and
sampler (euler, simple, cfg 1) with the DPCache nodes.

For each model: a full run, then K in {T, 13, 9} of T = 50 (uniform key steps after 3 full ones):
wall time, speed-up over the full run, efficiency = speed-up / (T / K), extra peak memory
(torch.cuda.max_memory_allocated of the cached run minus that of the full run), and a calibration
run (every evaluation computed and recorded, then one PACT sample built with the pack's
TrajectoryRecorder): its extra time over a full run, the build time alone and the extra peak memory.
Goals on a GPU: efficiency >= 0.97 at K = 13, extra memory <= 0.1 GB for FLUX.1-dev at 1024x1024.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time

import torch

T = 50
KS = (T, 13, 9)

FULL_SIZES = {
    "flux": dict(depth_double=19, depth_single=38, hidden=3072, heads=24, mlp_ratio=4.0, latent=128,
                 txt_tokens=512, txt_dim=4096, vec_dim=768),
    "wan": dict(depth=40, hidden=5120, heads=40, ffn=13824, latent_h=60, latent_w=104, toy_side=80,
                frames=9, txt_tokens=512, txt_dim=4096),
}
TINY_SIZES = {
    "flux": dict(depth_double=2, depth_single=3, hidden=64, heads=2, mlp_ratio=2.0, latent=8,
                 txt_tokens=4, txt_dim=32, vec_dim=16),
    "wan": dict(depth=3, hidden=64, heads=1, ffn=128, latent_h=8, latent_w=8, toy_side=8,
                frames=5, txt_tokens=4, txt_dim=32),
}


@dataclasses.dataclass
class Row:
    model: str
    label: str
    seconds: float
    speedup: float | None = None
    efficiency: float | None = None
    extra_gb: float | None = None
    note: str = ""


class Meter:
    """Wall time and peak device memory of one run (CUDA: synchronised, max_memory_allocated)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def measure(self, out: dict):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        out["peak"] = torch.cuda.max_memory_allocated() if self.cuda else 0


@contextlib.contextmanager
def timed_builds(core, times: list):
    """Time every TrajectoryRecorder.build_sample call (the PACT sample build) during the block."""
    cls = core.TrajectoryRecorder
    original = cls.build_sample

    def build_sample(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)

    cls.build_sample = build_sample
    try:
        yield
    finally:
        cls.build_sample = original


# ---------------------------------------------------------------------------- the pack's own models

class ToyRunner:
    """The pack's FLUX-like / Wan-like DiT at the given size, its Euler loop and the core's CacheRun."""

    def __init__(self, family: str, size: dict, device: torch.device, dtype: torch.dtype):
        from dpcache_demo import toy_model
        import dpcache_core as core
        self.core, self.toy, self.family, self.device = core, toy_model, family, device
        if family == "flux":
            cfg = dict(toy_model.TOY_FLUX, in_channels=16, image_size=size["latent"], patch_size=2, hidden=size["hidden"],
                       heads=size["heads"], mlp_ratio=size["mlp_ratio"], depth_double=size["depth_double"],
                       depth_single=size["depth_single"], txt_tokens=size["txt_tokens"], txt_dim=size["txt_dim"])
            cls = toy_model.ToyFlux
        else:
            cfg = dict(toy_model.TOY_WAN, in_channels=16, image_size=2 * size["toy_side"] // 2, patch_size=2,
                       frames=(size["frames"] - 1) // 4 + 1, hidden=size["hidden"], heads=size["heads"],
                       mlp_ratio=size["ffn"] / size["hidden"], depth=size["depth"], txt_tokens=size["txt_tokens"],
                       txt_dim=size["txt_dim"])
            cls = toy_model.ToyWan
        # allocate on the device with torch's default (seeded) init: the pack's own init draws every
        # weight on the CPU, far too slow for 12B parameters
        fast = type("Bench" + cls.__name__, (cls,), {"_init_weights": lambda self: None})
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = fast(cfg).to(dtype).eval()
        finally:
            torch.set_default_dtype(default)
        # the pack's models embed the timestep in float32: autocast runs them in ``dtype`` throughout
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.noise = toy_model.make_noise(cfg, 0).to(device=device, dtype=dtype)
        self.cond = 0
        self.shift = 3.0

    def full(self, steps: int = T):
        with self.autocast:
            return self.toy.sample(self.model, self.noise, self.cond, steps, self.shift)

    def cached(self, keys):
        from dpcache_demo.demo import accelerated_sample
        schedule = self.core.Schedule(tuple(keys), T, self.family, order=1)
        with self.autocast:
            return accelerated_sample(self.model, self.noise, self.cond, schedule, self.shift)[0]

    def calibrate(self):
        rec = self.core.TrajectoryRecorder(storage_device="cpu" if self.device.type == "cuda" else None)

        def record(index, feature, velocity):
            rec.start_evaluation()
            rec.record("cond", feature)

        with self.autocast:
            self.toy.sample(self.model, self.noise, self.cond, T, self.shift, on_evaluation=record)
        rec.build_sample(order=1, device=self.device)
        rec.close()

    def close(self):
        del self.model


# ---------------------------------------------------------------------------- ComfyUI's own models

class ComfyRunner:
    """ComfyUI's Flux / Wan2.1 classes, comfy.sample.sample (euler, simple, cfg 1), the DPCache nodes."""

    def __init__(self, family: str, size: dict, device: torch.device, dtype: torch.dtype):
        from bench import comfy_env
        state = comfy_env.boot(cpu=device.type != "cuda")
        import comfy.model_patcher
        import comfy.supported_models as sm
        self.nodes, self.core, self.device = state["nodes"], state["core"], device
        if family == "flux":
            mc = sm.Flux(comfy_env.with_host_fields(dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=size["vec_dim"],
                              context_in_dim=size["txt_dim"], hidden_size=size["hidden"], mlp_ratio=size["mlp_ratio"],
                              num_heads=size["heads"], depth=size["depth_double"], depth_single_blocks=size["depth_single"],
                              axes_dim=axes(size["hidden"] // size["heads"]), theta=10000, patch_size=2,
                              qkv_bias=True, guidance_embed=True)))
            self.latent = torch.zeros(1, 16, size["latent"], size["latent"])
            extra = {"pooled_output": torch.randn(1, size["vec_dim"], generator=gen()), "guidance": 3.5}
        else:
            mc = sm.WAN21_T2V(dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), dim=size["hidden"],
                                   ffn_dim=size["ffn"], freq_dim=256, text_dim=size["txt_dim"], in_dim=16, out_dim=16,
                                   num_heads=size["heads"], num_layers=size["depth"], window_size=(-1, -1),
                                   qk_norm=True, cross_attn_norm=True, eps=1e-6))
            self.latent = torch.zeros(1, 16, (size["frames"] - 1) // 4 + 1, size["latent_h"], size["latent_w"])
            extra = {}
        mc.set_inference_dtype(dtype, None)
        model = mc.get_model({}, device=device)
        init_random(model.diffusion_model)
        self.model = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
        context = torch.randn(1, size["txt_tokens"], size["txt_dim"], generator=gen())
        self.cond = [[context, extra]]
        self.tmp = tempfile.TemporaryDirectory()
        import folder_paths
        folder_paths.add_model_folder_path("dpcache", self.tmp.name, is_default=True)

    def _sample(self, model, steps: int = T):
        import comfy.sample
        noise = comfy.sample.prepare_noise(self.latent, 0)
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", self.cond, self.cond, self.latent,
                                       seed=0, disable_pbar=True)

    def full(self, steps: int = T):
        return self._sample(self.model, steps)

    def cached(self, keys):
        schedule = self.core.Schedule(tuple(keys), T, order=1, source="bench")
        (patched,) = self.nodes["DPCacheApply"]().apply(self.model, schedule)["result"]
        return self._sample(patched)

    def calibrate(self):
        (recording,) = self.nodes["DPCacheCalibrate"]().calibrate(self.model, "bench_gpu", 1, True)
        return self._sample(recording)

    def close(self):
        import comfy.model_management
        del self.model
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        self.tmp.cleanup()


def uniform_keys(k: int) -> list[int]:
    """K key evaluations of T: the first 3, the rest evenly spaced (the pack's (uniform) schedule)."""
    import dpcache_core
    return dpcache_core.uniform_key_steps(T, k, 3, 0)


def axes(head_dim: int) -> list[int]:
    """FLUX's 2:7:7 split of the rotary dims ([16, 56, 56] for head_dim 128)."""
    return [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]


def gen():
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def init_random(module) -> None:
    """Seeded N(0, 1/fan_in) weights drawn on the weights' device, small biases, unit norms."""
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, p.shape[-1] ** -0.5)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.02)
        else:
            p.fill_(1.0)


# ---------------------------------------------------------------------------- the measurement

def bench_model(runner, family: str, meter: Meter) -> list[Row]:
    core = runner.core
    m: dict = {}
    runner.full(steps=3)  # warm-up (kernels, allocator)
    with meter.measure(m):
        runner.full()
    full_s, full_peak = m["seconds"], m["peak"]
    rows = [Row(family, "full", full_s)]
    for k in KS:
        keys = core.uniform_key_steps(T, k, 3, 0)  # the loaded pack's own core (same function as uniform_keys)
        with meter.measure(m):
            runner.cached(keys)
        speedup = full_s / m["seconds"]
        rows.append(Row(family, f"K={k}", m["seconds"], speedup, speedup / (T / k), (m["peak"] - full_peak) / 1e9))
    builds: list = []
    with timed_builds(core, builds), meter.measure(m):
        runner.calibrate()
    rows.append(Row(family, "calibration run", m["seconds"], extra_gb=(m["peak"] - full_peak) / 1e9,
                    note=f"+{m['seconds'] - full_s:.2f} s over a full run, of which PACT build "
                         f"{sum(builds):.2f} s"))
    return rows


def table(rows: list[Row], device_name: str, path: str, cuda: bool) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    mem = "extra peak GB" if cuda else "extra peak GB (CUDA only)"
    lines = [f"Device: {device_name}; path: {path}; T = {T}, euler.", "",
             f"| model | run | wall s | speed-up | efficiency | {mem} | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.label} | {r.seconds:.2f} | {f(r.speedup, '.2f')} | {f(r.efficiency, '.3f')} | "
                     f"{f(r.extra_gb, '.3f') if cuda else ''} | {r.note} |")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (seconds; the test suite's check)")
    ap.add_argument("--models", default="flux,wan", help="comma-separated: flux, wan")
    ap.add_argument("--frames", type=int, default=None, help="Wan video frames (default 9; 4n+1)")
    ap.add_argument("--own", action="store_true", help="the pack's own models even when COMFYUI_PATH is set")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("bench.gpu needs a CUDA GPU; use --tiny for the CPU check at tiny size")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = TINY_SIZES if args.tiny else FULL_SIZES
    if args.frames:
        sizes = dict(sizes, wan=dict(sizes["wan"], frames=args.frames))
    use_comfy = bool(os.environ.get("COMFYUI_PATH")) and not args.own
    runner_cls = ComfyRunner if use_comfy else ToyRunner
    if not cuda:
        torch.set_num_threads(1)
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU (tiny sizes)"
    rows: list[Row] = []
    t0 = time.perf_counter()
    for family in [m.strip() for m in args.models.split(",") if m.strip()]:
        if family not in sizes:
            sys.exit(f"unknown model {family!r}: choose flux or wan")
        runner = runner_cls(family, sizes[family], device, dtype)
        try:
            rows += bench_model(runner, family, Meter(device))
        finally:
            runner.close()
            if cuda:
                torch.cuda.empty_cache()
        print(f"{family} done after {time.perf_counter() - t0:.0f} s", flush=True)
    path = "ComfyUI's classes, sampler and the DPCache nodes" if use_comfy else "the pack's own models and CacheRun"
    print(table(rows, device_name, path, cuda))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
