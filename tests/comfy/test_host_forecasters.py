"""DPCache Schedule's default entry, (spectrum: no calibration), and the spectral forecaster on every
model family inside a real ComfyUI: exact at K = T, blocks only at the K key evaluations."""
from __future__ import annotations

import pytest

from comfy_host import ALL_KEYS, BlockCounter, build_model, psnr, sample

pytestmark = pytest.mark.comfy

STEPS, CFG = 20, 3.0
MIN_PSNR = 15.0  # dB against the full run (random-weight models, 3.3x fewer evaluations)


def node_schedule(k, forecaster=None, pact=None):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]
    extra = {} if forecaster is None else {"forecaster": forecaster}
    pact = pact or node.INPUT_TYPES()["required"]["pact"][1]["default"]
    return node().schedule(pact, k, 3, 0, STEPS, **extra)["result"][0]


def apply(model, sched):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"][0]


@pytest.mark.parametrize("key", [k for k in ALL_KEYS if k != "wan22_low"])  # wan22_low: wan22_high's class
def test_default_entry_and_spectral_forecaster(host, key):
    model = build_model(key)
    ref = sample(model, key, steps=STEPS, cfg=CFG)
    default = node_schedule(STEPS)
    assert default.source == "spectrum" and default.num_keys == STEPS  # the default entry needs no calibration
    for sched in (default, node_schedule(STEPS, "spectral")):
        with BlockCounter(model) as full:
            out = sample(apply(model, sched), key, steps=STEPS, cfg=CFG)
        assert (out - ref).abs().max().item() == 0.0, f"K=T with {sched.predictor} is not the plain run"
        assert set(full.counts.values()) == {STEPS * (full.model_calls // STEPS)}
    line = [f"\n[host] {key} cfg={CFG}:"]
    for k, forecaster in ((6, None), (6, "spectral"), (8, "spectral"), (8, "taylor")):
        sched = node_schedule(k, forecaster)
        assert sched.num_keys == k and sched.source == "spectrum"
        assert sched.predictor == (forecaster or "spectral")  # auto: spectral at 20/6 = 3.3x
        with BlockCounter(model) as fast:
            out = sample(apply(model, sched), key, steps=STEPS, cfg=CFG)
        calls_per_eval = fast.model_calls // STEPS
        assert fast.model_calls == STEPS * calls_per_eval
        assert set(fast.counts.values()) == {k * calls_per_eval}, fast.counts  # K x blocks, nothing more
        db = psnr(ref, out)
        line.append(f"K={k} {sched.predictor}: {fast.total} block calls, {db:.1f} dB;")
        assert db > MIN_PSNR
    print(" ".join(line))
