"""Apply DPCache beside the ComfyUI 0.3.64 core nodes that patch a DiT's forward, blocks or CFG (issue 19).

For each node, in both orders on the model line where both make sense ("before": the node, then
Apply DPCache; "after": Apply DPCache, then the node): K = T must be bit-identical to the same graph
without DPCache; K < T must be finite, with exactly the block calls DPCache reports (its computed
model calls), and fewer than the full run unless the report says why every call was computed.
Every case prints one `[compose] node | family | order | K=T | K<T block calls | notes` line;
docs/compatibility.md is made from those lines (tests/comfy/compat_table.py).
"""
from __future__ import annotations

import math

import pytest

from comfy_host import BlockCounter, build_model, conditioning, psnr, sample

pytestmark = pytest.mark.comfy

STEPS = 12
K = 5
CFG = 3.5
MIN_PSNR = 20.0  # dB against the same graph without DPCache (the tiny models give 28-44 dB at K = 5 of 12)


def schedule(host, keys, num_evals=STEPS):
    return host["core"].Schedule(tuple(keys), num_evals)


def dpcache(host, keys, num_evals=STEPS):
    def add(model):
        import nodes
        (patched,) = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, schedule(host, keys, num_evals))["result"]
        return patched
    return add


def result(out):
    """The MODEL of a node's output (V3 io.NodeOutput or a V1 tuple)."""
    return out.result[0] if hasattr(out, "result") else out[0]


# --------------------------------------------------------------------------------------------
# The other nodes, each as MODEL -> MODEL (conditioning-side ones change the sampling call instead)


def slg_dit(double, single="", start=0.0, end=1.0):
    def add(model):
        from comfy_extras.nodes_slg import SkipLayerGuidanceDiT
        return result(SkipLayerGuidanceDiT.execute(model, scale=3.0, start_percent=start, end_percent=end,
                                                   double_layers=double, single_layers=single, rescaling_scale=0.0))
    return add


def slg_simple(double, single=""):
    def add(model):
        from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple
        return result(SkipLayerGuidanceDiTSimple.execute(model, start_percent=0.0, end_percent=1.0,
                                                         double_layers=double, single_layers=single))
    return add


def model_sampling(kind):
    def add(model):
        from comfy_extras import nodes_model_advanced as ma
        if kind == "flux":
            return ma.ModelSamplingFlux().patch(model, max_shift=1.15, base_shift=0.5, width=64, height=64)[0]
        if kind == "sd3":
            return ma.ModelSamplingSD3().patch(model, shift=8.0)[0]
        return ma.ModelSamplingAuraFlow().patch_aura(model, shift=3.1)[0]
    return add


def cfg_zero_star(model):
    from comfy_extras.nodes_cfg import CFGZeroStar
    return result(CFGZeroStar.execute(model))


def apg(model):
    from comfy_extras.nodes_apg import APG
    return result(APG.execute(model, eta=1.0, norm_threshold=5.0, momentum=-0.5))


def fresca(model):
    from comfy_extras.nodes_fresca import FreSca
    return result(FreSca.execute(model, scale_low=1.0, scale_high=1.25, freq_cutoff=20))


def differential_diffusion(model):
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    return result(DifferentialDiffusion.execute(model, strength=1.0))


def perp_neg(key):
    def add(model):
        from comfy_extras.nodes_perpneg import PerpNeg
        empty = conditioning(key, seed=7)[0]
        return result(PerpNeg.execute(model, empty_conditioning=empty, neg_scale=1.0))
    return add


def lora(model, where=lambda target: "attn" in target):
    """A rank-2 LoRA on the attention projections ``where(target)`` picks (every ``attn`` weight by
    default), through comfy.lora and add_patches."""
    import torch
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(3)
    lora_sd = {}
    for name, target in key_map.items():
        if not (name.startswith("diffusion_model.") and where(target) and target.endswith(".weight")):
            continue
        w = sd[target]
        if w.ndim != 2:
            continue
        lora_sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.05
        lora_sd[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.05
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    assert patches, "no LoRA key matched the model"
    m = model.clone()
    assert len(m.add_patches(patches, 1.0)) == len(patches)
    return m


class StandInVAE:
    """The two VAE methods DiffSynthCnetPatch calls, shaped like Qwen-Image's (Wan) VAE: 8x spatial
    compression to 16 latent channels and one latent frame."""

    def encode(self, image):
        import torch
        x = image.movedim(-1, 1)[:, :3]
        x = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([x] * 6, dim=1)[:, :16].unsqueeze(2).contiguous()

    def spacial_compression_encode(self):
        return 8


def qwen_model_patch(model):
    """QwenImageDiffsynthControlnet with a tiny QwenImageBlockWiseControlNet (ComfyUI's class) as model patch."""
    import torch
    import comfy.model_patcher
    import comfy.ops
    from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet, QwenImageDiffsynthControlnet
    from comfy_host import init_weights
    dm = model.model.diffusion_model
    net = QwenImageBlockWiseControlNet(num_layers=len(dm.transformer_blocks), in_dim=64, dim=dm.inner_dim,
                                       dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    init_weights(net, seed=11)
    cpu = torch.device("cpu")
    patch = comfy.model_patcher.ModelPatcher(net, load_device=cpu, offload_device=cpu)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # as ComfyUI executes nodes (else its encoded image cannot be deep-copied by a clone)
        return QwenImageDiffsynthControlnet().diffsynth_controlnet(model, patch, StandInVAE(), image, 1.0)[0]


def flux_controlnet():
    """A tiny xlabs-style ControlNetFlux wrapped in comfy.controlnet.ControlNet, as ComfyUI loads one."""
    import torch
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops
    from comfy_host import FLUX_CFG, init_weights, with_host_fields
    cfg = {k: v for k, v in with_host_fields(FLUX_CFG).items() if k not in ("image_model", "guidance_embed")}
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, device=torch.device("cpu"),
                                                    dtype=torch.float32, guidance_embed=True, **cfg)
    init_weights(net, seed=13)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), manual_cast_dtype=None, extra_conds=["y", "guidance"])


# --------------------------------------------------------------------------------------------
# One case: reference, K = T, K < T


@pytest.fixture
def runs(host, monkeypatch):
    run_state = host["run_state"]
    made = []

    class TrackedRun(run_state.ApplyRun):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(run_state, "ApplyRun", TrackedRun)
    return made


def run_case(host, runs, node, key, order, other, sample_kw=None, expect_full=None):
    """Sample ``key`` with ``other`` (MODEL -> MODEL) and Apply DPCache in ``order``; check and print."""
    sample_kw = dict(steps=STEPS, cfg=CFG, **(sample_kw or {}))
    model = build_model(key)

    def graph(keys):
        first, second = (other, dpcache(host, keys)) if order == "before" else (dpcache(host, keys), other)
        return second(first(model))

    with BlockCounter(model) as c_ref:
        ref = sample(other(model), key, **sample_kw)
    exact = sample(graph(range(STEPS)), key, **sample_kw)
    diff = (exact - ref).abs().max().item()
    assert diff == 0.0, f"{node} {order} Apply DPCache on {key}: K=T differs from the graph without DPCache by {diff}"

    keys = host["core"].uniform_key_steps(STEPS, K)
    with BlockCounter(model) as c_fast:
        fast = sample(graph(keys), key, **sample_kw)
    run = runs[-1]
    assert math.isfinite(fast.abs().max().item()), f"{node} {order}: non-finite output at K<T"
    # block calls as reported: each block runs once per computed call, except in calls where another node replaced it
    replaced = {f"{block_list(key, kind)}.{i}" for variant in run.variants for (kind, i), _ in variant}
    intact = {n: c for n, c in c_fast.counts.items() if n not in replaced}
    assert set(intact.values()) == {run.computed_calls}, (intact, run.summary())
    assert all(c <= run.computed_calls for c in c_fast.counts.values())
    assert c_fast.model_calls == run.computed_calls + run.predicted_calls
    db = psnr(ref, fast)
    assert db > MIN_PSNR, f"{node} {order}: K<T is {db:.1f} dB from the graph without DPCache ({run.summary()})"
    full = expect_full is not None
    if full:
        assert c_fast.total == c_ref.total and expect_full in run.summary(), run.summary()
    else:
        assert c_fast.total < c_ref.total and run.predicted_calls > 0, run.summary()
    report = run.summary().split("; wall")[0].replace("DPCache: ", "") + "".join(
        "; " + p for p in run.summary().split("; ")[1:] if not p.startswith("wall"))
    print(f"\n[compose] {node} | {key} | {order} | bit-identical (max abs diff {diff:.0e}) | "
          f"K={K}/T={STEPS}: {c_fast.total}/{c_ref.total}, PSNR {db:.1f} dB | {report}")
    return run


def block_list(key, kind):
    if key.startswith(("flux", "chroma", "hunyuan")):
        return "double_blocks" if kind == "double_block" else "single_blocks"
    if key == "kandinsky5":
        return "visual_transformer_blocks"
    return "transformer_blocks" if key in ("qwen_image", "ltx2") else "blocks"


ORDERS = ["before", "after"]


# --------------------------------------------------------------------------------------------
# Skip Layer Guidance: the SLG graphs of issue 19 (cfg 3.5, 12 steps, FLUX and Wan, both orders)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("key,double,single", [("flux", "1", "1"), ("wan_t2v", "1", "")])
def test_skip_layer_guidance_dit(host, runs, key, double, single, order):
    run = run_case(host, runs, "SkipLayerGuidanceDiT", key, order, slg_dit(double, single))
    assert "SkipLayerGuidanceDiT" in run.summary()  # its call has a cache of its own


def test_skip_layer_guidance_dit_default_window(host, runs):
    """SLG's default window (1 % to 15 % of the run): its call exists only at the first evaluations."""
    run_case(host, runs, "SkipLayerGuidanceDiT (window 0.01-0.15)", "wan_t2v", "after", slg_dit("1", "", 0.01, 0.15))


@pytest.mark.parametrize("key", ["chroma", "hunyuan_video", "qwen_image"])
def test_skip_layer_guidance_dit_other_families(host, runs, key):
    run_case(host, runs, "SkipLayerGuidanceDiT", key, "after", slg_dit("1", "1" if key != "qwen_image" else ""))


@pytest.mark.parametrize("key,double,single", [("flux2", "1", "1"), ("hunyuan_video15", "1", "1"), ("ltx2", "1", ""),
                                               ("kandinsky5", "1", "")])
def test_skip_layer_guidance_dit_newer_families(host, runs, key, double, single):
    """The families ComfyUI 0.33 adds (skipped on a host without them); Kandinsky 5's blocks are called
    directly by DPCache (ComfyUI 0.33's block_wrap passes names they do not take)."""
    run = run_case(host, runs, "SkipLayerGuidanceDiT", key, "after", slg_dit(double, single))
    assert "SkipLayerGuidanceDiT" in run.summary()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("key,double,single", [("flux", "0", "2"), ("wan_t2v", "0", "")])
def test_skip_layer_guidance_simple_first_and_last_block(host, runs, key, double, single, order):
    """SkipLayerGuidanceDiTSimple on block 0 (and FLUX's last block): the negative call's blocks are replaced."""
    run_case(host, runs, f"SkipLayerGuidanceDiTSimple (layers {double}{'/' + single if single else ''})",
             key, order, slg_simple(double, single))


# --------------------------------------------------------------------------------------------
# Sampling, CFG and weight patches


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("node,key,other", [
    ("ModelSamplingFlux", "flux", model_sampling("flux")),
    ("ModelSamplingSD3", "wan_t2v", model_sampling("sd3")),
    ("ModelSamplingAuraFlow", "qwen_image", model_sampling("aura")),
    ("CFGZeroStar", "wan_t2v", cfg_zero_star),
    ("APG", "flux", apg),
    ("FreSca", "wan_t2v", fresca),
    ("PerpNeg", "flux", perp_neg("flux")),
    ("LoRA (add_patches)", "flux", lora),
    ("LoRA (add_patches)", "wan_t2v", lora),
], ids=lambda v: v if isinstance(v, str) else "")
def test_model_line_nodes(host, runs, node, key, other, order):
    run_case(host, runs, node, key, order, other)


@pytest.mark.parametrize("order", ORDERS)
def test_differential_diffusion(host, runs, order):
    import torch
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    run_case(host, runs, "DifferentialDiffusion (with a mask)", "flux", order, differential_diffusion,
             sample_kw={"noise_mask": mask})


# --------------------------------------------------------------------------------------------
# Residuals injected between blocks: every call computed in full, with the report saying why


@pytest.mark.parametrize("order", ORDERS)
def test_qwen_image_model_patch(host, runs, order):
    run_case(host, runs, "QwenImageDiffsynthControlnet", "qwen_image", order, qwen_model_patch,
             expect_full="per-block patches of DiffSynthCnetPatch")


def test_flux_controlnet(host, runs, monkeypatch):
    """A FLUX ControlNet (comfy.controlnet.ControlNet around ControlNetFlux) on the conditioning."""
    import torch
    import comfy_host
    import nodes
    control = flux_controlnet()
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(9))
    plain = comfy_host.conditioning

    def with_control(key, **kw):
        pos, neg, latent = plain(key, **kw)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 0.8, 0.0, 1.0)
        return pos, neg, latent

    monkeypatch.setattr(comfy_host, "conditioning", with_control)
    run_case(host, runs, "ControlNet (FLUX, ControlNetApplyAdvanced)", "flux", "conditioning", lambda m: m,
             expect_full="forced by injected residuals")


# --------------------------------------------------------------------------------------------
# torch.compile (TorchCompileModel): no recompile per step or per run, K = T as without DPCache

INDUCTOR_REASON = ("the inductor backend compiles the tiny FLUX with gcc for about a minute per order on a shared "
                   "2-core CPU (both orders: 111 s); set DPCACHE_TEST_INDUCTOR=1 to run it. The eager backend runs "
                   "the same TorchCompileModel wrapper and dynamo guards, so it counts the same recompiles")


def compiled_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class RecompileLog:
    """Counts dynamo's "Recompiling function" messages (torch._logging's recompiles artifact)."""

    def __enter__(self):
        import logging
        import torch._logging
        self.lines = []
        outer = self

        class Catch(logging.Handler):
            def emit(self, record):
                if "Recompiling function" in record.getMessage():
                    outer.lines.append(record.getMessage().split("\n")[0])

        self.handler = Catch()
        torch._logging.set_logs(recompiles=True)
        self.logger = logging.getLogger("torch._dynamo.guards.__recompiles")  # the artifact logger; it does not propagate
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import torch._logging
        torch._logging.set_logs()
        self.logger.removeHandler(self.handler)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_model(host, runs, backend, order):
    import os
    import torch
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    if backend == "inductor" and os.environ.get("DPCACHE_TEST_INDUCTOR") != "1":
        pytest.skip(INDUCTOR_REASON)
    key, steps = "flux", 6
    torch._dynamo.reset()
    model = build_model(key)

    def compile_node(m):
        if backend == "inductor":
            return result(TorchCompileModel.execute(m, backend))
        m = m.clone()
        set_torch_compile_wrapper(m, backend=backend)  # what TorchCompileModel does, with dynamo's eager backend
        return m

    def graph(keys):
        apply_ = dpcache(host, keys, steps)
        return apply_(compile_node(model)) if order == "before" else compile_node(apply_(model))

    kw = dict(steps=steps, cfg=CFG)
    ref = sample(compile_node(model), key, **kw)  # compiled, without DPCache
    plain_graphs = compiled_graphs()
    with RecompileLog() as log:
        exact = sample(graph(range(steps)), key, **kw)
        after_first = compiled_graphs()
        first_lines = list(log.lines)
        outs = []
        for keys in ([0, 2, 5], [0, 1, 3, 5], [0, 2, 5]):  # other key/skip patterns, and a repeated run
            outs.append(sample(graph(keys), key, **kw))
        fast_report = runs[-1].summary().split("; wall")[0].replace("DPCache: ", "")
        exact_again = sample(graph(range(steps)), key, **kw)
    diff = (exact - ref).abs().max().item()
    later = log.lines[len(first_lines):]
    print(f"\n[compose] TorchCompileModel ({backend}) | {key} | {order} | "
          f"{'bit-identical' if diff == 0 else 'max abs diff'} {diff:.0e} | K=3,4/T={steps}: {len(later)} recompiles and "
          f"{compiled_graphs() - after_first} new graphs in 4 runs after the first DPCache run (which made "
          f"{after_first - plain_graphs} graphs beyond the plain compiled model's, {len(first_lines)} recompiles) | "
          f"K=3 run: {fast_report}")
    assert later == [], later
    assert compiled_graphs() == after_first
    assert (exact_again - exact).abs().max().item() == 0.0
    assert all(torch.isfinite(o).all() for o in outs) and (outs[0] - outs[2]).abs().max().item() == 0.0
    assert diff == 0.0, diff  # the same compiled graphs as the model without DPCache


# --------------------------------------------------------------------------------------------
# DPCache Calibrate beside Skip Layer Guidance


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.01, 0.15)])
def test_calibrate_with_skip_layer_guidance(host, pact_dir, caplog, window):
    """Calibrate records the positive and negative streams (the old hooks dropped the positive one,
    called twice per evaluation), the SLG call as a stream of its own when it comes at every
    evaluation, and names it as left out when it comes at some only."""
    import logging
    import nodes
    model = slg_dit("1")(build_model("wan_t2v")) if window == (0.0, 1.0) else slg_dit("1", "", *window)(build_model("wan_t2v"))
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, "slg", 1, True)
    with caplog.at_level(logging.INFO, logger="dpcache"):
        sample(calib, "wan_t2v", steps=STEPS, cfg=CFG)
    (line,) = [r.getMessage() for r in caplog.records if "sample 1 added" in r.getMessage()]
    print(f"\n[compose-calibrate] SLG window {window}: {line}")
    if window == (0.0, 1.0):
        assert "3 streams averaged (with calls whose double_block 1 replaced by SkipLayerGuidanceDiT)" in line
        assert "left out" not in line
    else:
        assert "2 streams averaged; left out (not recorded at every evaluation): a call variant " \
               "(double_block 1 replaced by SkipLayerGuidanceDiT), seen at 1 of 12 evaluations" in line
