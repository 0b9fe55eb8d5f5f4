"""Apply DPCache inside a real ComfyUI: exactness at K = T, skipped blocks, closeness, no leftovers."""
from __future__ import annotations

import gc
import weakref

import pytest

from comfy_host import MODEL_KEYS, BlockCounter, build_model, psnr, sample

pytestmark = pytest.mark.comfy

STEPS = 20
K = 8
MIN_PSNR = 25.0  # dB against the full run; the tiny models give 40-60 dB at K = 8 of 20


def schedule(host, keys, num_evals=STEPS, family=None):
    return host["core"].Schedule(tuple(keys), num_evals, model_family=family)


def uniform(host, num_keys=K, num_evals=STEPS):
    return schedule(host, host["core"].uniform_key_steps(num_evals, num_keys), num_evals)


def apply(model, sched):
    import nodes
    (patched,) = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"]
    return patched


@pytest.fixture
def live_runs(host, monkeypatch):
    """Weak references to every per-run state Apply DPCache creates, to check nothing survives."""
    run_state = host["run_state"]
    refs = []

    class TrackedRun(run_state.ApplyRun):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            refs.append(weakref.ref(self))

    monkeypatch.setattr(run_state, "ApplyRun", TrackedRun)
    return refs


def assert_freed(refs, model):
    gc.collect()
    assert refs, "no DPCache run was created"
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} DPCache run states still referenced after sampling"
    assert "dpcache_run" not in model.model_options["transformer_options"]


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("key", MODEL_KEYS)
def test_apply(host, key, cfg, live_runs):
    model = build_model(key)
    ref = sample(model, key, steps=STEPS, cfg=cfg)

    # (a) K = T: every block runs at every evaluation, output identical to the unpatched model
    full = apply(model, schedule(host, range(STEPS)))
    with BlockCounter(model) as c_full:
        out_full = sample(full, key, steps=STEPS, cfg=cfg)
    assert (out_full - ref).abs().max().item() <= 1e-6
    calls_per_eval = c_full.model_calls // STEPS
    assert c_full.total == STEPS * calls_per_eval * len(c_full.counts)

    # (b) K < T: the original blocks run only at the K key evaluations
    fast = apply(model, uniform(host))
    with BlockCounter(model) as c_fast:
        out_fast = sample(fast, key, steps=STEPS, cfg=cfg)
    assert c_fast.model_calls == STEPS * calls_per_eval
    assert set(c_fast.counts.values()) == {K * calls_per_eval}, c_fast.counts

    # (c) close to the full run
    db = psnr(ref, out_fast)
    print(f"\n[host] {key:12s} cfg={cfg}: K=T max|diff|={(out_full - ref).abs().max().item():.1e}; "
          f"K={K}/T={STEPS}: block calls {c_fast.total}/{c_full.total} "
          f"(model calls {c_fast.model_calls}, batch {sorted(set(c_fast.batch_sizes))}), PSNR {db:.2f} dB")
    assert db > MIN_PSNR

    # (e) the input MODEL is untouched: sampling it again gives the reference bit for bit
    assert (sample(model, key, steps=STEPS, cfg=cfg) - ref).abs().max().item() == 0.0
    # (f) no run state survives sampling
    del full, fast
    assert_freed(live_runs, model)


@pytest.mark.parametrize("key", ["flux", "wan_t2v"])
def test_split_cond_uncond_calls(host, key, monkeypatch):
    """Low memory: ComfyUI calls cond and uncond separately; same result as batched, half the rows each."""
    model = build_model(key)
    ref_batched = sample(model, key, cfg=3.0, steps=STEPS)
    fast_batched = sample(apply(model, uniform(host)), key, cfg=3.0, steps=STEPS)
    base = model.model
    original = base.memory_required
    monkeypatch.setattr(base, "memory_required",
                        lambda shape, cond_shapes={}: 1e30 if shape[0] > 1 else original(shape, cond_shapes=cond_shapes))
    ref = sample(model, key, cfg=3.0, steps=STEPS)
    exact = sample(apply(model, schedule(host, range(STEPS))), key, cfg=3.0, steps=STEPS)
    with BlockCounter(model) as c:
        fast = sample(apply(model, uniform(host)), key, cfg=3.0, steps=STEPS)
    assert set(c.batch_sizes) == {1} and c.model_calls == 2 * STEPS  # really split
    assert (exact - ref).abs().max().item() <= 1e-6
    assert set(c.counts.values()) == {2 * K}
    assert (fast - fast_batched).abs().max().item() < 1e-4  # split and batched predict the same
    print(f"\n[host] {key} split cond/uncond: block calls {c.total}, PSNR {psnr(ref, fast):.2f} dB "
          f"(batched vs split max|diff| {(ref - ref_batched).abs().max().item():.1e})")


@pytest.mark.parametrize("key", ["flux", "wan_i2v"])
def test_batch_two(host, key):
    model = build_model(key)
    ref = sample(model, key, cfg=3.0, batch=2, steps=STEPS)
    exact = sample(apply(model, schedule(host, range(STEPS))), key, cfg=3.0, batch=2, steps=STEPS)
    assert (exact - ref).abs().max().item() <= 1e-6
    with BlockCounter(model) as c:
        fast = sample(apply(model, uniform(host)), key, cfg=3.0, batch=2, steps=STEPS)
    assert set(c.batch_sizes) == {4} and set(c.counts.values()) == {K}
    db = [psnr(ref[i], fast[i]) for i in range(2)]
    print(f"\n[host] {key} batch 2 cfg 3: PSNR per image {db[0]:.2f} / {db[1]:.2f} dB")
    assert min(db) > MIN_PSNR


@pytest.mark.parametrize("key,sizes", [("flux", [(64, 64), (96, 64), (64, 128)]),
                                       ("wan_t2v", [(64, 64), (48, 80), (64, 64)])])
def test_resolution_changes_between_runs(host, key, sizes):
    model = build_model(key)
    fast = apply(model, uniform(host))
    exact = apply(model, schedule(host, range(STEPS)))
    for frames, (h, w) in zip([9, 5, 13], sizes):
        kw = dict(cfg=3.0, steps=STEPS, height=h, width=w, frames=frames)
        ref = sample(model, key, **kw)
        assert (sample(exact, key, **kw) - ref).abs().max().item() <= 1e-6
        db = psnr(ref, sample(fast, key, **kw))
        shape = f"{w}x{h}" + (f", {frames} frames" if key.startswith("wan") else "")
        print(f"\n[host] {key} {shape}: PSNR {db:.2f} dB")
        assert db > MIN_PSNR


def test_heun_counts_evaluations(host):
    """heun evaluates twice per step (once on the last): a schedule needs that T, else a clear error."""
    model = build_model("flux")
    steps = 10
    evals = 2 * steps - 1
    ref = sample(model, "flux", steps=steps, sampler="heun")
    with BlockCounter(model) as c:
        out = sample(apply(model, uniform(host, 9, evals)), "flux", steps=steps, sampler="heun")
    assert c.model_calls == evals and set(c.counts.values()) == {9}
    print(f"\n[host] flux heun {steps} steps = {evals} evaluations, K=9: block calls {c.total}, PSNR {psnr(ref, out):.2f} dB")
    with pytest.raises(ValueError, match=f"makes {evals} model evaluations.*T={steps}.*total_evaluations={evals}"):
        sample(apply(model, uniform(host, 5, steps)), "flux", steps=steps, sampler="heun")


def test_mismatch_errors(host, live_runs):
    model = build_model("wan_t2v")
    # single-evaluation sampler: detected before sampling starts
    with BlockCounter(model) as c, pytest.raises(ValueError, match="makes 12 model evaluations.*T=20.*total_evaluations=12"):
        sample(apply(model, uniform(host)), "wan_t2v", steps=12)
    assert c.model_calls == 0
    # 2-evaluation samplers: their count follows from the sigmas, so they are refused before sampling too
    with BlockCounter(model) as c, pytest.raises(ValueError, match=r"\(dpmpp_2s_ancestral\) makes 39 model evaluations.*T=20"):
        sample(apply(model, uniform(host)), "wan_t2v", steps=STEPS, sampler="dpmpp_2s_ancestral")
    with pytest.raises(ValueError, match=r"\(dpmpp_sde\) makes 11 model evaluations.*T=20"):
        sample(apply(model, uniform(host)), "wan_t2v", steps=6, sampler="dpmpp_sde")
    assert c.model_calls == 0
    # a sampler whose count is only known while it samples: stopped when it passes T, both numbers given
    with pytest.raises(ValueError, match="dpm_adaptive.*at least 11 model evaluations.*T=10"):
        sample(apply(model, uniform(host, 4, 10)), "wan_t2v", steps=STEPS, sampler="dpm_adaptive")
    assert_freed(live_runs, model)


def test_family_and_model_checks(host):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]()
    with pytest.raises(ValueError, match="planned on a wan PACT.*this MODEL is FLUX"):
        node.apply(build_model("flux"), schedule(host, range(STEPS), family="wan"))
    patched = apply(build_model("flux"), uniform(host))
    with pytest.raises(ValueError, match="already went through 'Apply DPCache'"):
        node.apply(patched, uniform(host))


def test_interrupted_run_leaves_nothing(host, live_runs):
    import comfy.model_management
    model = build_model("flux")
    fast = apply(model, uniform(host))

    def stop(step, *_):
        if step == 5:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(fast, "flux", steps=STEPS, callback=stop)
    assert_freed(live_runs, model)
    ref = sample(model, "flux", steps=STEPS)
    assert (sample(apply(model, schedule(host, range(STEPS))), "flux", steps=STEPS) - ref).abs().max().item() <= 1e-6
