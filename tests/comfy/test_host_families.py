"""Apply DPCache on every family of nodes/families.py inside a real ComfyUI: Chroma, HunyuanVideo,
Qwen-Image, Wan2.2 TI2V 5B and a Wan2.2 A14B-style expert (tiny random-weight models of ComfyUI's own
classes): exact at K = T, blocks only at key evaluations with cfg batched and split, clear refusals."""
from __future__ import annotations

import pytest

from comfy_host import FAMILY_KEYS, BlockCounter, build_model, psnr, sample

pytestmark = pytest.mark.comfy

STEPS, K, CFG = 20, 8, 3.0
MIN_PSNR = 20.0  # dB against the full run
FAMILY = {"chroma": "chroma", "hunyuan_video": "hunyuan_video", "qwen_image": "qwen_image",
          "wan22_5b": "wan22_5b", "wan22_high": "wan", "wan22_low": "wan"}


def schedule(host, keys, num_evals=STEPS, family=None):
    return host["core"].Schedule(tuple(keys), num_evals, model_family=family)


def apply(model, sched):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"][0]


def split_calls(model, monkeypatch):
    """Make ComfyUI call cond and uncond separately (as when memory is short)."""
    base = model.model
    original = base.memory_required
    monkeypatch.setattr(base, "memory_required",
                        lambda shape, cond_shapes={}: 1e30 if shape[0] > 1 else original(shape, cond_shapes=cond_shapes))


@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
@pytest.mark.parametrize("key", FAMILY_KEYS[:-1])  # wan22_low is the same class as wan22_high
def test_family_apply(host, key, split, monkeypatch):
    model = build_model(key)
    assert host["block_patches"].model_info(model).family == FAMILY[key]
    if split:
        split_calls(model, monkeypatch)
    ref = sample(model, key, steps=STEPS, cfg=CFG)

    with BlockCounter(model) as c_full:  # K = T: identical to the unpatched model
        out_full = sample(apply(model, schedule(host, range(STEPS), family=FAMILY[key])), key, steps=STEPS, cfg=CFG)
    diff = (out_full - ref).abs().max().item()
    assert diff <= 1e-6
    calls_per_eval = 2 if split else 1
    assert set(c_full.batch_sizes) == ({1} if split else {2})
    assert c_full.total == STEPS * calls_per_eval * len(c_full.counts)

    keys = host["core"].uniform_key_steps(STEPS, K)
    with BlockCounter(model) as c_fast:  # K < T: every block runs at the key evaluations only
        out_fast = sample(apply(model, schedule(host, keys)), key, steps=STEPS, cfg=CFG)
    assert c_fast.model_calls == STEPS * calls_per_eval
    assert set(c_fast.counts.values()) == {K * calls_per_eval}, c_fast.counts
    db = psnr(ref, out_fast)
    print(f"\n[host] {key} cfg={CFG} {'split' if split else 'batched'}: K=T max|diff|={diff:.1e}; "
          f"K={K}/T={STEPS}: block calls {c_fast.total}/{c_full.total} "
          f"({len(c_fast.counts)} blocks, model calls {c_fast.model_calls}, batch {sorted(set(c_fast.batch_sizes))}), PSNR {db:.2f} dB")
    assert db > MIN_PSNR
    assert (sample(model, key, steps=STEPS, cfg=CFG) - ref).abs().max().item() == 0.0  # input untouched


@pytest.mark.parametrize("key,planned", [("chroma", "flux"), ("wan22_5b", "wan"), ("wan22_high", "wan22_5b"),
                                         ("qwen_image", "flux"), ("hunyuan_video", "wan")])
def test_schedule_of_another_family_is_refused(host, key, planned):
    with pytest.raises(ValueError, match=f"planned on a {planned} PACT.*calibrate a PACT for this model"):
        apply(build_model(key), schedule(host, range(STEPS), family=planned))


def test_unsupported_model_is_refused_with_the_supported_list(host):
    import nodes
    model = build_model("wan_vace")
    for node in ("DPCacheApply", "DPCacheCalibrate"):
        with pytest.raises(ValueError, match="supports FLUX.1.*Chroma.*Qwen-Image.*Wan2.2.*VaceWanModel in a WAN21_Vace model.*VACE"):
            if node == "DPCacheApply":
                apply(model, schedule(host, range(STEPS)))
            else:
                nodes.NODE_CLASS_MAPPINGS[node]().calibrate(model, "x", 1, False)


def test_wan22_5b_with_per_token_timesteps(host):
    """Wan2.2 5B with a denoise mask (the first latent frame kept, as with a start image): ComfyUI feeds
    per-token timesteps ([B, L, 6, dim] modulation); DPCache is exact at K = T and skips at K < T."""
    import torch
    model = build_model("wan22_5b").clone()
    shapes = []

    def probe(args, extra):  # another node's block replacement: DPCache wraps it
        shapes.append(tuple(args["vec"].shape))
        return extra["original_block"](args)

    model.set_model_patch_replace(probe, "dit", "double_block", 0)
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, :1] = 0.0
    ref = sample(model, "wan22_5b", steps=STEPS, cfg=CFG, noise_mask=mask)
    exact = sample(apply(model, schedule(host, range(STEPS))), "wan22_5b", steps=STEPS, cfg=CFG, noise_mask=mask)
    assert (exact - ref).abs().max().item() <= 1e-6
    assert shapes and all(len(s) == 4 and s[1] > 1 for s in shapes), shapes[:2]  # per-token modulation
    keys = host["core"].uniform_key_steps(STEPS, K)
    with BlockCounter(model) as c:
        fast = sample(apply(model, schedule(host, keys)), "wan22_5b", steps=STEPS, cfg=CFG, noise_mask=mask)
    assert set(c.counts.values()) == {K}
    db = psnr(ref, fast)
    print(f"\n[host] wan22_5b per-token timesteps (denoise mask): K={K}/T={STEPS}: block calls {c.total}, PSNR {db:.2f} dB")
    assert db > MIN_PSNR


def test_qwen_block_patches_force_full_compute(host):
    """A non-replace patches["double_block"] (what the DiffSynth ControlNet model patch installs) adds to the
    features between Qwen-Image's blocks: every evaluation is computed, and the output is the patched model's."""
    model = build_model("qwen_image").clone()
    calls = []

    def residual(args):
        calls.append(args["block_index"])
        return {"img": args["img"] + 0.01, "txt": args["txt"]}

    model.set_model_double_block_patch(residual)
    ref = sample(model, "qwen_image", steps=STEPS, cfg=CFG)
    keys = host["core"].uniform_key_steps(STEPS, K)
    with BlockCounter(model) as c:
        out = sample(apply(model, schedule(host, keys)), "qwen_image", steps=STEPS, cfg=CFG)
    assert set(c.counts.values()) == {STEPS} and (out - ref).abs().max().item() <= 1e-6
    print(f"\n[host] qwen_image with a double_block patch: block calls {c.total}/{STEPS * len(c.counts)} (all computed)")
