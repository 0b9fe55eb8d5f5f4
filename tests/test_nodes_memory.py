"""CPU tier: the cache's memory declared to ComfyUI's model loading (nodes/memory.py), with a fake
``comfy.model_management``; the real-ComfyUI test is tests/comfy/test_host_memory.py."""
import sys
import types

import pytest
import torch

from dpcache_core.taylor import peak_bytes
from nodes import memory


class Model:
    def __init__(self, dm, dtype=torch.bfloat16):
        self.dm, self.model, self.dtype, self.wrappers = dm, types.SimpleNamespace(manual_cast_dtype=None), dtype, {}

    def get_model_object(self, name):
        return self.dm

    def model_dtype(self):
        return self.dtype

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, []).append((key, fn))


@pytest.fixture
def fake_mm(monkeypatch):
    mm = types.SimpleNamespace(EXTRA_RESERVED_VRAM=400 << 20)
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


def test_expected_bytes_follow_the_cache_point_of_each_family():
    flux = memory.cache_bytes(Model(types.SimpleNamespace(hidden_size=3072, patch_size=2)), order=1)
    conds = {"positive": [{}], "negative": []}  # FLUX-dev: one stream
    assert flux((1, 16, 128, 128), conds) == peak_bytes(4096 * 3072, 1, torch.bfloat16)
    assert flux((1, 16, 128, 128), conds) <= 8 * 4096 * 3072  # the target at order 1
    wan = memory.cache_bytes(Model(types.SimpleNamespace(dim=5120, patch_size=(1, 2, 2))), order=2)
    both = {"positive": [{}], "negative": [{}]}
    assert wan((1, 16, 21, 60, 104), both) == 2 * peak_bytes(21 * 30 * 52 * 5120, 2, torch.bfloat16)
    odd = memory.cache_bytes(Model(types.SimpleNamespace(inner_dim=64, patch_size=2), torch.float32), order=1)
    assert odd((2, 16, 1, 9, 7), both) == 2 * peak_bytes(2 * 5 * 4 * 64, 1, torch.float32)  # padded to the patch
    assert memory.cache_bytes(Model(types.SimpleNamespace()), order=1) is None


def test_the_reservation_lasts_exactly_the_load(fake_mm):
    model = Model(types.SimpleNamespace(hidden_size=64, patch_size=2))
    memory.reserve(model, memory.cache_bytes(model, 1))
    [(key, wrapper)] = model.wrappers["prepare_sampling"]
    assert key == memory.WRAPPER_KEY
    seen = []
    wrapper(lambda *a, **k: seen.append(fake_mm.EXTRA_RESERVED_VRAM), model, (1, 16, 8, 8), {"positive": [{}]})
    assert seen == [(400 << 20) + peak_bytes(16 * 64, 1, torch.bfloat16)]
    assert fake_mm.EXTRA_RESERVED_VRAM == 400 << 20

    def fails(*a, **k):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        wrapper(fails, model, (1, 16, 8, 8), {"positive": [{}]})
    assert fake_mm.EXTRA_RESERVED_VRAM == 400 << 20
    unknown = Model(types.SimpleNamespace())
    memory.reserve(unknown, memory.cache_bytes(unknown, 1))
    assert not unknown.wrappers  # nothing declared when the layout is unknown


def test_a_spectral_schedule_declares_the_spectral_ring():
    """The default forecaster is spectral at K 13 of 50: it keeps up to 8 features per stream, so the
    declaration must follow the forecaster the run will use, not the Taylor order alone."""
    from dpcache_core import spectral
    model = Model(types.SimpleNamespace(hidden_size=3072, patch_size=2))
    conds = {"positive": [{}]}
    taylor = memory.cache_bytes(model, 1)((1, 16, 128, 128), conds)
    ring = memory.cache_bytes(model, 1, "spectral")((1, 16, 128, 128), conds)
    assert ring == spectral.peak_bytes(4096 * 3072, torch.bfloat16) > taylor
    predictor = spectral.SpectralPredictor()
    feature = torch.randn(1, 64, 32).to(torch.bfloat16)
    for t in range(12):  # past the ring's length: what it holds stays within the bound
        predictor.update(t / 12, feature)
        assert predictor.nbytes() <= spectral.peak_bytes(feature.numel(), torch.bfloat16)


def test_apply_declares_the_memory_of_the_forecaster_that_will_run(monkeypatch):
    import nodes.dpcache_nodes as nd
    seen = []
    monkeypatch.setattr(memory, "reserve", lambda model, expected: seen.append(expected))
    monkeypatch.setattr(memory, "cache_bytes", lambda model, order, predictor="taylor": (order, predictor))
    import nodes_fakes as F
    sched, _, _ = nd.make_schedule(nd.PRIOR, 13)  # forecaster auto: spectral at 3.85x
    nd.DPCacheApply().apply(F.FakePatcher(F.Flux()), sched)
    nd.DPCacheApply().apply(F.FakePatcher(F.Flux()))  # the automatic mode at its default 3.85x
    nd.DPCacheApply().apply(F.FakePatcher(F.Flux()), target_speedup=2.0)  # replay may choose spectral at any speed-up
    assert seen == [(sched.order, "spectral"), (1, "spectral"), (1, "spectral")]
