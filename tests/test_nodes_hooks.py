"""CPU tier: the DPCache hooks driven by fakes of ComfyUI's contracts (tests/nodes_fakes.py)."""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

import nodes_fakes as F
from nodes_fakes import block_calls, reset_calls
from dpcache_core import Schedule, load_pact, uniform_key_steps
from nodes import block_patches, run_state, sampler_counts, ui
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate

STEPS = 10


def flux():
    return F.FakePatcher(F.Flux())


def wan():
    return F.FakePatcher(F.WanModel())


def chroma():
    return F.FakePatcher(F.Chroma())


def hunyuan_video():
    return F.FakePatcher(F.HunyuanVideo())


def qwen_image():
    return F.FakePatcher(F.QwenImageTransformer2DModel())


def wan22_5b():
    return F.FakePatcher(F.WanModel(), base="WAN22")


ALL_FAMILIES = [flux, chroma, hunyuan_video, qwen_image, wan, wan22_5b]


def uniform(k=5, t=STEPS, family=None):
    return Schedule(tuple(uniform_key_steps(t, k)), t, model_family=family)


def apply(model, sched):
    return DPCacheApply().apply(model, sched)["result"][0]



@pytest.mark.parametrize("make", ALL_FAMILIES)
@pytest.mark.parametrize("cfg,split", [(1.0, False), (2.0, False), (2.0, True)])
def test_all_keys_is_exact_and_skips_run_no_block(make, cfg, split):
    model = make()
    ref = F.sample(model, cfg=cfg, split=split)
    exact = F.sample(apply(model, Schedule(tuple(range(STEPS)), STEPS)), cfg=cfg, split=split)
    assert all(torch.equal(a, b) for a, b in zip(ref, exact))
    reset_calls(model)
    fast = F.sample(apply(model, uniform(5)), cfg=cfg, split=split)
    calls_per_eval = 2 if split and cfg != 1.0 else 1
    per_block = 1 if isinstance(model.dm, F.FakeWanBase) else 2  # a fake double block runs on img and txt
    counts = set(block_calls(model).values())
    assert counts <= {5 * calls_per_eval, 5 * calls_per_eval * per_block}, counts
    err = max((a - b).abs().max().item() for a, b in zip(ref, fast))
    assert 0 < err < 0.5
    # the input model is untouched
    again = F.sample(model, cfg=cfg, split=split)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))


def test_cond_and_uncond_are_separate_streams_batched_or_split():
    model = flux()
    batched = F.sample(apply(model, uniform(5)), cfg=2.0, batch=2)
    split = F.sample(apply(model, uniform(5)), cfg=2.0, batch=2, split=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched, split))


def test_no_state_after_run_and_interrupted_run():
    model = flux()
    refs = []
    original = run_state.ApplyRun.__init__

    def tracked(self, *a, **k):
        original(self, *a, **k)
        refs.append(weakref.ref(self))

    run_state.ApplyRun.__init__ = tracked
    try:
        patched = apply(model, uniform(5))
        F.sample(patched)
        with pytest.raises(KeyboardInterrupt):
            F.sample(patched, interrupt_at=6)
    finally:
        run_state.ApplyRun.__init__ = original
    gc.collect()
    assert len(refs) == 2 and all(r() is None for r in refs)
    assert block_patches.RUN_KEY not in F.sample.last_guider.model_options["transformer_options"]
    assert block_patches.RUN_KEY not in patched.model_options["transformer_options"]


def test_schedule_mismatch_errors():
    model = wan()
    with pytest.raises(ValueError, match="makes 8 model evaluations.*T=10.*total_evaluations=8"):
        F.sample(apply(model, uniform(5)), steps=8)  # euler: known before sampling
    # a sampler whose count is only known while it samples: stopped when it passes T, with both numbers
    with pytest.raises(ValueError, match="dpm_adaptive.*at least 11 model evaluations.*T=10") as err:
        F.sample(apply(model, uniform(5)), steps=10, sampler="dpm_adaptive", evals_per_step=2)
    assert "heun" not in str(err.value)
    # one that ends short of T: its output is returned and the node says so (test_nodes_after_output.py)
    F.sample(apply(model, uniform(5)), steps=3, sampler="dpm_adaptive", evals_per_step=2)
    assert F.sample.last_output is not None
    # 2-evaluation samplers whose count follows from the sigmas: checked before the first evaluation
    for sampler in ("dpmpp_sde", "dpmpp_2s_ancestral", "heun"):
        with pytest.raises(ValueError, match=f"\\({sampler}\\) makes 19 model evaluations.*T=10.*total_evaluations=19") as err:
            F.sample(apply(model, uniform(5)), steps=10, sampler=sampler, evals_per_step=0)
        assert sampler == "heun" or "heun" not in str(err.value)
    # a schedule for the right count works with a 2-evaluation sampler
    F.sample(apply(model, uniform(5, 19)), steps=10, sampler="dpmpp_sde", evals_per_step=2, last_single=True)


SIGMAS = torch.tensor([1.0, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("sampler, count", [
    ("euler", 3), ("uni_pc", 3), ("unipc", 3), ("unipc_bh2", 3), ("dpm_fast_function", 3), ("dpmpp_2m", 3),
    ("heun", 5), ("dpm_2", 5), ("dpmpp_sde", 5), ("dpmpp_2s_ancestral", 5), ("dpm_2_ancestral", 5),
    ("seeds_3", 7), ("heunpp2", 6), ("sa_solver", 3), ("sa_solver_pece", 5),
    ("exp_heun_2_x0", 5), ("exp_heun_2_x0_sde", 5),  # ComfyUI 0.33: seeds_2 (one more in every step not to sigma 0)
    ("dpm_adaptive_function", None), ("some_custom_sampler", None),
])
def test_evaluation_counts_known_before_sampling(sampler, count):
    assert sampler_counts.expected_evaluations(F.FakeSampler(sampler), SIGMAS) == count


def test_model_checks():
    with pytest.raises(ValueError, match="supports FLUX.1.*Chroma.*HunyuanVideo.*Qwen-Image.*Wan2.1.*Wan2.2.*UNetModel"):
        apply(F.FakePatcher(F.UNetModel()), uniform())
    with pytest.raises(ValueError, match="VaceWanModel"):
        apply(F.FakePatcher(F.VaceWanModel()), uniform())
    with pytest.raises(ValueError, match="planned on a flux PACT.*this MODEL is Wan"):
        apply(wan(), uniform(family="flux"))
    apply(wan(), uniform(family="wan"))
    apply(wan(), uniform(family=None))
    with pytest.raises(ValueError, match="already went through 'Apply DPCache'"):
        apply(apply(flux(), uniform()), uniform())
    with pytest.raises(ValueError, match="must come from a DPCache Schedule"):
        apply(flux(), [0, 1, 2])


def test_controlnet_forces_full_compute():
    model = flux()
    control = torch.full((1, F.IMG, F.HIDDEN), 0.01)
    ref = F.sample(model, cfg=1.0, control=control)
    reset_calls(model)
    out = F.sample(apply(model, uniform(3)), cfg=1.0, control=control)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert model.dm.single_blocks[0].calls == STEPS


def test_context_windows_refused():
    with pytest.raises(ValueError, match="context windows"):
        F.sample(apply(wan(), uniform()), context_handler=True)


def test_new_conditioning_at_a_skipped_step_is_computed():
    """A stream never seen at a key evaluation (e.g. a conditioning with a timestep range) is computed."""
    import uuid as uuidlib
    model = wan()
    patched = apply(model, uniform(3))
    late = {"uuid": uuidlib.uuid4(), "control": None}
    runs = []
    original = run_state.ApplyRun.open_call

    def open_call(self, to, x, *rest):
        if self.cache.index == 5 and late["uuid"] not in to["uuids"]:
            to["uuids"] = [late["uuid"]]
        runs.append(self)
        return original(self, to, x, *rest)

    run_state.ApplyRun.open_call = open_call
    try:
        F.sample(patched, cfg=1.0)
    finally:
        run_state.ApplyRun.open_call = original
    assert sum(runs[-1].full_calls.values()) == 1
    assert "1 model calls computed in full, not predicted (1: a conditioning" in runs[-1].summary()


def test_existing_block_replacement_is_chained():
    model = flux()
    seen = []

    def other_patch(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    model.set_model_patch_replace(other_patch, "dit", "double_block", 0)
    F.sample(apply(model, uniform(4)), cfg=1.0)
    assert len(seen) == 4  # called at the key evaluations only


def test_calibrate_accumulates_resets_and_checks(tmp_path, monkeypatch):
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    path = os.path.join(tmp_path, "t.safetensors")
    model = flux()
    (calib,) = DPCacheCalibrate().calibrate(model, "t", 2, False)
    F.sample(calib, cfg=2.0)
    F.sample(calib, cfg=2.0)
    acc, meta = load_pact(path)
    assert acc.samples == 2 and meta["num_evals"] == STEPS and meta["model_family"] == "flux"
    assert meta["sampler"] == "euler" and meta["order"] == 2
    # order 2: the history-exact cost tensor too (issue 11), so the file plans skip-only, history-exact
    assert meta["convention"] == "skip" and acc.history_counts.max() == 2  # one sample per run (streams averaged)
    # an interrupted run adds nothing and leaves the file as it was
    before = open(path, "rb").read()
    with pytest.raises(KeyboardInterrupt):
        F.sample(calib, interrupt_at=3)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["t.safetensors"]
    # another T: refused before sampling, with what to do
    with pytest.raises(ValueError, match="T=10 evaluations.*this run is flux, T=6.*new pact_name.*reset"):
        F.sample(calib, steps=6)
    # another family
    (calib_wan,) = DPCacheCalibrate().calibrate(wan(), "t", 2, False)
    with pytest.raises(ValueError, match="model family flux.*this run is wan"):
        F.sample(calib_wan)
    # reset: the next finished run starts afresh, later ones accumulate again
    (calib_reset,) = DPCacheCalibrate().calibrate(wan(), "t", 2, True)
    F.sample(calib_reset, steps=6)
    assert load_pact(path)[0].samples == 1 and load_pact(path)[1]["model_family"] == "wan"
    F.sample(calib_reset, steps=6)
    assert load_pact(path)[0].samples == 2


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x" * 200, "a b"])
def test_calibrate_rejects_unsafe_names(name):
    with pytest.raises(ValueError, match="not a plain file name"):
        DPCacheCalibrate().calibrate(flux(), name, 2, False)


@pytest.mark.parametrize("blank", ["", " "])
def test_empty_pact_name_is_named_after_family_sampler_scheduler_and_steps_at_run_start(tmp_path, monkeypatch, blank):
    import re
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    assert nd.DPCacheCalibrate.INPUT_TYPES()["required"]["pact_name"][1]["default"] == ""
    (calib,) = DPCacheCalibrate().calibrate(wan(), blank, 1, False)
    F.sample(calib, steps=6, sampler="uni_pc")
    F.sample(calib, steps=8)  # the same node, another setting: another file
    F.sample(calib, steps=8)
    # the fakes' sigmas are no named ComfyUI scheduler's: the name carries their hash instead
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and re.fullmatch(r"wan_euler_sig[0-9a-f]{6}_8\.safetensors", names[0]), names
    assert re.fullmatch(r"wan_uni_pc_sig[0-9a-f]{6}_6\.safetensors", names[1]), names
    acc, meta = load_pact(os.path.join(tmp_path, names[0]))
    assert acc.samples == 2 and meta["sampler"] == "euler" and meta["steps"] == 8
    assert [r["sampler"] for r in meta["sample_meta"]] == ["euler", "euler"]  # per-sample metadata kept as a list
    (calib_flux,) = DPCacheCalibrate().calibrate(flux(), blank, 1, False)
    F.sample(calib_flux, steps=6, sampler="heun", evals_per_step=2, last_single=True)
    (heun,) = [n for n in os.listdir(tmp_path) if n.startswith("flux_heun_")]
    acc, meta = load_pact(os.path.join(tmp_path, heun))
    assert acc.num_evals == 11 and meta["model_family"] == "flux" and heun.endswith("_6.safetensors")


def test_automatic_names_include_the_scheduler():
    from nodes.calibrate_hook import automatic_pact_name
    assert automatic_pact_name("flux", "euler", 20, "beta") == "flux_euler_beta_20"
    assert automatic_pact_name("flux", "euler", 20, "simple") != automatic_pact_name("flux", "euler", 20, "beta")


def test_calibrate_records_separate_streams_and_builds_a_pact(tmp_path, monkeypatch):
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    (calib,) = DPCacheCalibrate().calibrate(wan(), "w.safetensors", 1, False)
    F.sample(calib, cfg=2.0, split=True, batch=2)
    acc, meta = load_pact(os.path.join(tmp_path, "w.safetensors"))
    assert acc.samples == 1 and meta["order"] == 1
    assert torch.isfinite(torch.from_numpy(acc.mean())).any()


def test_node_report_is_sent_in_lines_that_fit_never_split_inside_a_number(monkeypatch):
    """ComfyUI's node text widget breaks anywhere (CSS break-all): each line must fit the node."""
    import sys
    import types

    sent = []
    server = types.SimpleNamespace(send_progress_text=lambda text, node: sent.append((text, node)))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server)))
    report = "DPCache: 13 key evaluations computed, 37 skipped of 50; wall 7.54 s"
    ui.send_text(report, "7")
    (text, node), = sent
    lines = text.split("\n")
    assert node == "7" and len(lines) > 1 and max(map(len, lines)) <= ui.NODE_TEXT_WIDTH
    assert " ".join(lines) == report  # broken only at spaces: every number stays whole


def test_a_controlnet_on_the_conditioning_is_seen_before_sampling():
    """Apply DPCache computes every evaluation of a run with a ControlNet (it adds residuals between blocks)."""
    from types import SimpleNamespace

    from nodes.sampling_hooks import uses_controlnet
    assert uses_controlnet(SimpleNamespace(conds={"positive": [{"control": object()}], "negative": [{}]}))
    assert not uses_controlnet(SimpleNamespace(conds={"positive": [{"control": None}], "negative": None}))


def test_apply_with_a_schedule_reports_its_run_in_the_automatic_modes_words(monkeypatch):
    """One end-of-run report for a schedule and the automatic mode: keys, evaluations computed of T,
    forecaster and wall time on the node (the schedule's report named no forecaster before)."""
    sent = []
    monkeypatch.setattr(ui, "send_text", lambda text, node: sent.append((node, text)))
    monkeypatch.setattr(ui, "send_event", lambda name, data: sent.append((name, data)))
    sched = uniform(5)
    F.sample(DPCacheApply().apply(flux(), sched, unique_id="7")["result"][0])
    (node0, start), (node, text), (name, data) = sent  # the plan as the run starts, then the run's report
    assert node0 == "7" and start == f"5 of {STEPS} evaluations computed, {STEPS - 5} skipped: ideal speed-up {STEPS / 5:.2f}x"
    assert node == "7" and name == "dpcache.run" and data["summary"] == text
    assert f"keys {list(sched.key_steps)}: 5 of {STEPS} evaluations computed, T={STEPS}" in text
    assert f"{sched.predictor} forecaster" in text and "; wall " in text


def test_calibrate_keeps_an_older_files_convention(tmp_path, monkeypatch):
    """Samples added to a PACT written before issue 11 (no convention recorded) keep it planned as before."""
    import nodes.dpcache_nodes as nd
    from dpcache_core import save_pact
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    path = os.path.join(tmp_path, "old.safetensors")
    (calib,) = DPCacheCalibrate().calibrate(flux(), "old", 1, False)
    F.sample(calib, cfg=1.0)
    acc, meta = load_pact(path)
    assert meta["convention"] == "skip" and acc.history_sums is None  # order 1: no history tensor needed
    meta.pop("convention")
    save_pact(path, acc, meta)  # as an older version wrote it
    F.sample(calib, cfg=1.0)
    acc, meta = load_pact(path)
    assert acc.samples == 2 and "convention" not in meta


# --------------------------------------------------------------------------------------------
# Other nodes on the same model (issue 19): repeated calls, replaced blocks, per-block patches

FIRST_LAST = {"flux": (("double_block", 0), ("single_block", 2)), "wan": (("double_block", 0), ("double_block", 2))}
BLOCK_NAME = {"double_block": {"flux": "double_blocks", "wan": "blocks"}, "single_block": {"flux": "single_blocks"}}


def all_keys(t=STEPS):
    return Schedule(tuple(range(t)), t)


def expected_calls(model, name, keys, calls, skipped):
    """Calls of one fake block: ``calls`` model calls at each of ``keys`` key evaluations, minus the
    calls that skip this block; a fake FLUX double block runs twice per call (img and txt)."""
    per_call = 2 if name.startswith("double_blocks") else 1
    return keys * per_call * (calls - skipped.get(name, 0))


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("split", [False, True])
def test_skip_layer_guidance_second_positive_call(family, split):
    """SkipLayerGuidanceDiT calls the positive conditioning again, with a layer skipped, in the same
    evaluation: at K = T exact (the old hooks raised 'key steps must increase'); at K < T that call
    is predicted from its own cache, never given the plain positive call's prediction."""
    model = flux() if family == "flux" else wan()
    kw = dict(cfg=2.0, split=split, slg="dit", slg_blocks=(("double_block", 1),))
    ref = F.sample(model, **kw)
    exact = F.sample(apply(model, all_keys()), **kw)
    assert all(torch.equal(a, b) for a, b in zip(ref, exact))
    reset_calls(model)
    patched = apply(model, uniform(5))
    runs = track_runs()
    fast = F.sample(patched, **kw)
    calls = (3 if split else 2)
    skipped_name = f"{BLOCK_NAME['double_block'][family]}.1"
    assert block_calls(model) == {n: expected_calls(model, n, 5, calls, {skipped_name: 1}) for n in block_calls(model)}
    keys = set(uniform(5).key_steps)
    for t, out in enumerate(fast):
        assert torch.isfinite(out).all()
        if t not in keys:  # rows: uncond, cond, the SLG call for cond
            assert not torch.allclose(out[1], out[2]), f"evaluation {t}: the SLG call got the positive prediction"
    assert max((a - b).abs().max().item() for a, b in zip(ref, fast)) < 0.5
    assert "separate caches for calls whose blocks another node replaced (double_block 1 replaced by skip_block)" in runs[-1].summary()


def test_repeated_identical_call_is_consistent():
    """A repeated call for the same conditioning through the same blocks (SLG naming a layer the model
    does not have): computed again at key evaluations without feeding the cache twice, and given the
    same prediction as the first call at skipped ones."""
    model = wan()
    kw = dict(cfg=2.0, slg="dit", slg_blocks=(("double_block", 7),))
    ref = F.sample(model, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ref, F.sample(apply(model, all_keys()), **kw)))
    fast = F.sample(apply(model, uniform(5)), **kw)
    assert all(torch.allclose(out[1], out[2], atol=1e-6) for out in fast)
    assert max((a - b).abs().max().item() for a, b in zip(ref, fast)) < 0.5


def track_runs():
    """Every ApplyRun / CalibrateRun made from now on (the test's own monkeypatching)."""
    made = []
    for cls in (run_state.ApplyRun, run_state.CalibrateRun):
        original = cls.__init__

        def tracked(self, *a, _original=original, **k):
            _original(self, *a, **k)
            made.append(self)

        tracked.original = original
        cls.__init__ = tracked
    track_runs.undo.append(lambda: [setattr(c, "__init__", c.__init__.original) for c in (run_state.ApplyRun, run_state.CalibrateRun)])
    return made


track_runs.undo = []


@pytest.fixture(autouse=True)
def _untrack_runs():
    yield
    while track_runs.undo:
        track_runs.undo.pop()()


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("which", [0, 1])
def test_skip_layer_guidance_simple_on_the_first_or_last_block(family, which):
    """SkipLayerGuidanceDiTSimple calls uncond separately with our first (or last) block replaced by a
    skip: the old hooks, set up by the first block only, gave uncond the cond call's state."""
    model = flux() if family == "flux" else wan()
    key = FIRST_LAST[family][which]
    kw = dict(cfg=2.0, slg="simple", slg_blocks=(key,))
    ref = F.sample(model, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ref, F.sample(apply(model, all_keys()), **kw)))
    reset_calls(model)
    fast = F.sample(apply(model, uniform(5)), **kw)
    name = f"{BLOCK_NAME[key[0]][family]}.{key[1]}"
    assert block_calls(model) == {n: expected_calls(model, n, 5, 2, {name: 1}) for n in block_calls(model)}
    keys = set(uniform(5).key_steps)
    for t, out in enumerate(fast):  # rows: uncond (block skipped), cond
        assert torch.isfinite(out).all()
        if t not in keys:
            assert not torch.allclose(out[0], out[1]), f"evaluation {t}: uncond got the cond prediction"
    assert max((a - b).abs().max().item() for a, b in zip(ref, fast)) < 0.5


@pytest.mark.parametrize("which", [0, 1])
def test_replacement_added_after_apply_is_composed(which):
    """Another node replaces our first or last block on the patched MODEL (after Apply): its
    replacement runs at key evaluations only, and skipped ones are still predicted."""
    model = flux()
    key = FIRST_LAST["flux"][which]
    seen = []

    def counting(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    def add(m):
        m = m.clone()
        m.set_model_patch_replace(counting, "dit", *key)
        return m

    ref = F.sample(add(model), cfg=2.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, F.sample(add(apply(model, all_keys())), cfg=2.0)))
    seen.clear()
    runs = track_runs()
    fast = F.sample(add(apply(model, uniform(4))), cfg=2.0)
    assert len(seen) == 4  # the old hooks ran it at every evaluation
    assert 0 < max((a - b).abs().max().item() for a, b in zip(ref, fast)) < 0.5
    assert runs[-1].cache.skipped == STEPS - 4 and "replaced by test_replacement_added_after_apply_is_composed" in runs[-1].summary()


def test_replacement_that_chains_to_ours_runs_our_logic_once():
    """A node added after Apply that wraps the replacement it found (ours) and calls it."""
    model = wan()
    patched = apply(model, uniform(4)).clone()
    ours = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    seen = []

    def chained(args, extra):
        seen.append(1)
        return ours(args, extra)

    patched.set_model_patch_replace(chained, "dit", "double_block", 0)
    reset_calls(model)
    out = F.sample(patched, cfg=1.0)
    assert len(seen) == 4 and set(block_calls(model).values()) == {4}
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("after", [False, True])
def test_per_block_patches_compute_those_calls_in_full(after):
    """Per-block ``patches`` (Qwen-Image's DiffSynth ControlNet patch) add residuals between blocks:
    calls carrying them are computed in full, before or after Apply, and the report names them."""
    model = qwen_image()

    def residual_patch(d):
        return {"img": d["img"] + 0.01 * d["x"], "txt": d["txt"]}

    def add(m):
        m = m.clone()
        m.set_model_patch(residual_patch, "double_block")
        return m

    ref = F.sample(add(model), cfg=2.0)
    runs = track_runs()
    fast = F.sample(add(apply(model, uniform(4))) if after else apply(add(model), uniform(4)), cfg=2.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, fast))
    assert "10 model calls computed in full, not predicted (10: per-block patches of test_per_block_patches_compute_those_calls_in_full)" in runs[-1].summary()


def test_calibrate_records_what_it_can_with_skip_layer_guidance(tmp_path, monkeypatch, caplog):
    """SLG's second positive call, made at some evaluations only, is left out and reported; the plain
    positive and negative streams are recorded (the old hooks dropped the positive one silently)."""
    import logging
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    (calib,) = DPCacheCalibrate().calibrate(wan(), "slg", 1, False)
    with caplog.at_level(logging.INFO, logger="dpcache"):
        F.sample(calib, cfg=2.0, slg="dit", slg_sigmas=(0.55, 1.0))
    assert ("2 streams averaged; left out (not recorded at every evaluation): a call variant "
            "(double_block 1 replaced by skip_block), seen at 5 of 10 evaluations") in caplog.text
    # SLG at every evaluation: its call is a stream of its own, recorded in full
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpcache"):
        F.sample(calib, cfg=2.0, slg="dit")
    assert "sample 2 added (10 evaluations, every cache-point element); 3 streams averaged (with calls whose double_block 1 replaced by skip_block)" in caplog.text
    assert "left out" not in caplog.text


def test_last_block_replaced_inside_the_call_is_computed_in_full():
    """A wrapper that runs inside ours (after Apply) puts its own function on our last block for the
    call: DPCache cannot predict through it, so the call is computed in full and reported."""
    model = wan()
    last = FIRST_LAST["wan"][1]

    def counting(args, extra):
        return extra["original_block"](args)

    def inner(executor, *args, **kwargs):
        return executor(*args[:5], F.with_replacements({"transformer_options": args[5]}, [last], counting)["transformer_options"])

    def add(m):
        m = m.clone()
        m.add_wrapper_with_key("apply_model", "other", inner)
        return m

    ref = F.sample(add(model), cfg=2.0)
    runs = track_runs()
    fast = F.sample(add(apply(model, uniform(4))), cfg=2.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, fast))
    assert "10 model calls computed in full, not predicted (10: its last block was replaced by another node inside the model call)" in runs[-1].summary()
