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
    kandinsky = memory.cache_bytes(Model(types.SimpleNamespace(model_dim=1792, patch_size=(1, 2, 2))), order=1)
    assert kandinsky((1, 16, 5, 64, 64), both) == 2 * peak_bytes(5 * 32 * 32 * 1792, 1, torch.bfloat16)
    krea2 = memory.cache_bytes(Model(types.SimpleNamespace(patch=2, first=torch.nn.Linear(64, 96))), order=1)
    assert krea2((1, 16, 64, 64), conds) == peak_bytes(32 * 32 * 96, 1, torch.bfloat16)  # width of the input projection
    ltx2 = memory.cache_bytes(Model(types.SimpleNamespace(inner_dim=4096)), order=1)
    assert ltx2 is None  # no patch size: nothing declared


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


GIB = 2 ** 30
WAN720 = 21 * 45 * 80 * 5120  # Wan 14B at 1280x720 x 81 frames: tokens x width of one stream's feature


def test_the_forecaster_that_fits_the_free_memory():
    from dpcache_core import spectral
    from dpcache_core.taylor import peak_bytes as taylor_bytes
    ring8 = spectral.peak_bytes(WAN720, torch.bfloat16)
    assert 6.4 * GIB < ring8 < 6.6 * GIB  # about 6.5 GiB per stream
    kept = memory.fit_forecaster("spectral", 1, WAN720, torch.bfloat16, 2, 20 * GIB)
    assert (kept.predictor, kept.history, kept.bytes, kept.note) == ("spectral", 8, 2 * ring8, "")
    assert memory.fit_forecaster("spectral", 1, WAN720, torch.bfloat16, 2, None).history == 8  # unknown: kept
    shorter = memory.fit_forecaster("spectral", 1, WAN720, torch.bfloat16, 2, 9 * GIB)
    assert shorter.predictor == "spectral" and shorter.history == 5 and shorter.bytes <= 9 * GIB
    assert "ring keeps 5 key features instead of 8" in shorter.note
    taylor = memory.fit_forecaster("spectral", 1, WAN720, torch.bfloat16, 2, 5 * GIB)
    assert (taylor.predictor, taylor.order, taylor.history) == ("taylor", 1, None)
    assert taylor.bytes == 2 * taylor_bytes(WAN720, 1, torch.bfloat16) and "Taylor order 1" in taylor.note
    none = memory.fit_forecaster("taylor", 2, WAN720, torch.bfloat16, 2, GIB)
    assert none.predictor == "taylor" and none.order == 1 and "offload" in none.note


def test_only_the_streams_that_run_are_counted():
    from types import SimpleNamespace as NS
    both = {"positive": [{}], "negative": [{}]}
    assert memory.streams_that_run(NS(conds=both, cfg=1.0, model_options={})) == 1  # ComfyUI skips the uncond
    assert memory.streams_that_run(NS(conds=both, cfg=3.5, model_options={})) == 2
    assert memory.streams_that_run(NS(conds=both, cfg=1.0, model_options={"disable_cfg1_optimization": True})) == 2
    assert memory.streams_that_run(NS(conds={"positive": [{}], "negative": []}, cfg=5.0, model_options={})) == 1


def test_a_run_that_does_not_fit_downgrades_its_forecaster_and_declares_what_runs(fake_mm, monkeypatch):
    """Apply with a spectral schedule on a GPU with too little free memory for its ring of 8: the run
    keeps a shorter ring, the reservation is what that run keeps for the one stream that runs at cfg 1,
    and the node says so."""
    import nodes_fakes as F
    import nodes.dpcache_nodes as nd
    from dpcache_core import Schedule, uniform_key_steps
    from nodes import block_patches, ui
    texts = []
    monkeypatch.setattr(ui, "send_text", lambda text, node: texts.append(text))
    model = F.FakePatcher(F.Flux())
    model.dm.hidden_size, model.dm.patch_size = F.HIDDEN, 1  # the fake's layout: tokens x width
    model.model_dtype = lambda: torch.float32
    numel = F.HIDDEN * F.HIDDEN  # the fake noise (1, IMG, HIDDEN): one latent axis of HIDDEN tokens x width HIDDEN
    ring = memory.forecaster_bytes("spectral", 1, numel, torch.float32)
    monkeypatch.setattr(memory, "free_vram", lambda guider, shape: ring - 1)  # no room for the ring of 8
    sched = Schedule(tuple(uniform_key_steps(10, 5)), 10, predictor="spectral", order=1)
    patched = nd.DPCacheApply().apply(model, sched, unique_id="9")["result"][0]
    seen = {}
    real_start = patched.wrappers["outer_sample"][0].__self__.start

    def start(guider, args):
        run = real_start(guider, args)
        seen["run"] = run
        (reserve,) = patched.wrappers["prepare_sampling"]
        options = {"transformer_options": {block_patches.RUN_KEY: run}}
        seen["reserved"] = reserve.bytes_for(args[0].shape, guider.conds, options)
        return run

    patched.wrappers["outer_sample"][0].__self__.start = start
    F.sample(patched, steps=10, cfg=1.0)
    run = seen["run"]
    assert run.cache.schedule.predictor == "spectral" and run.cache.spectral_history == 7  # the longest that fits
    assert seen["reserved"] == memory.forecaster_bytes("spectral", 1, numel, torch.float32, run.cache.spectral_history)
    assert any("does not fit" in t and "ring keeps" in t for t in texts)
