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
    assert host["hooks"].model_info(model).family == FAMILY[key]
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
