"""The cache's memory declared to a real ComfyUI's model loading (nodes/memory.py, issue 19): the
estimate ``load_models_gpu`` works with grows by the declared bytes during a DPCache run, that is
the cache's peak for the features the run really caches, and nothing stays reserved afterwards."""
from __future__ import annotations

import pytest

from comfy_host import ALL_KEYS, MODULE_KEYS, NEW_KEYS, build_model, sample

pytestmark = pytest.mark.comfy

STEPS, K = 6, 3
# every family the pack runs; LTX-2 (video and audio streams in one packed latent) declares nothing
DECLARED_KEYS = ALL_KEYS + tuple(k for k in NEW_KEYS if k != "ltx2") + MODULE_KEYS


@pytest.fixture
def load_estimates(host, monkeypatch):
    """What every load_models_gpu call keeps free: (memory_required, minimum) + extra_reserved_memory()."""
    import comfy.model_management as mm
    seen, real = [], mm.load_models_gpu

    def spy(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, **kwargs):
        seen.append((memory_required + mm.extra_reserved_memory(), (minimum_memory_required or 0) + mm.extra_reserved_memory()))
        return real(models, memory_required=memory_required, force_patch_weights=force_patch_weights,
                    minimum_memory_required=minimum_memory_required, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    return seen


@pytest.fixture
def cached_features(host, monkeypatch):
    """(numel, dtype) of every stream's cache-point feature in each DPCache run."""
    run_state, runs = host["run_state"], []

    class Recording(run_state.ApplyRun):
        def close(self):
            runs.append([(p.factors[0].numel(), p.factors[0].dtype) for p in self.cache.predictors.values()])
            super().close()

    monkeypatch.setattr(run_state, "ApplyRun", Recording)
    return runs


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("key", DECLARED_KEYS)
def test_comfy_keeps_room_for_the_cache(host, key, order, load_estimates, cached_features):
    import comfy.model_management as mm
    import nodes
    from dpcache_core.taylor import peak_bytes

    reserved = mm.EXTRA_RESERVED_VRAM
    model = build_model(key)
    sample(model, key, steps=STEPS, cfg=3.0)
    plain = load_estimates[-1]
    schedule = host["core"].Schedule(tuple(host["core"].uniform_key_steps(STEPS, K)), STEPS, order=order)
    (fast,) = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, schedule)["result"]
    sample(fast, key, steps=STEPS, cfg=3.0)
    with_cache = load_estimates[-1]
    [streams] = cached_features
    cache = sum(peak_bytes(numel, order, dtype) for numel, dtype in streams)
    assert len(streams) == 2  # cond and uncond
    declared = with_cache[0] - plain[0]
    if key in MODULE_KEYS:  # one joint sequence: the latent's tokens are declared, the text tokens are not
        assert 0 < declared < cache
    else:
        assert declared == cache  # memory_required grows by the cache's peak
    assert with_cache[1] - plain[1] == declared  # and so does the minimum for a partial load
    assert mm.EXTRA_RESERVED_VRAM == reserved  # nothing stays reserved after the load
    print(f"\n[host] {key:13s} order {order}: streams {[n for n, _ in streams]} ({streams[0][1]}), "
          f"cache {cache:,} bytes = {cache / sum(n for n, _ in streams):.2f} B/elem, declared {declared / cache:.0%} of it")


def test_at_cfg_1_only_the_stream_that_runs_is_reserved(host, load_estimates, cached_features):
    """At cfg 1 ComfyUI skips the negative conditioning: one stream runs, and one is reserved (two were)."""
    import nodes
    from dpcache_core.taylor import peak_bytes

    model = build_model("flux")
    sample(model, "flux", steps=STEPS, cfg=1.0)
    plain = load_estimates[-1]
    schedule = host["core"].Schedule(tuple(host["core"].uniform_key_steps(STEPS, K)), STEPS, order=1)
    (fast,) = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, schedule)["result"]
    sample(fast, "flux", steps=STEPS, cfg=1.0)
    [streams] = cached_features
    assert len(streams) == 1
    assert load_estimates[-1][0] - plain[0] == peak_bytes(streams[0][0], 1, streams[0][1])
