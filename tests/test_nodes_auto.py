"""CPU tier: Apply DPCache's automatic mode (nodes/auto.py) driven by the fakes of tests/nodes_fakes.py."""
from __future__ import annotations

import logging
import os

import pytest
import torch

import nodes_fakes as F
from nodes_fakes import block_calls, reset_calls
import dpcache_core as core
from dpcache_core import load_pact
from nodes import auto, ui
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate, DPCacheSchedule



def computed(model) -> int:
    """Evaluations at which every block ran (the fake double blocks run their module twice: img and txt)."""
    c = block_calls(model)
    n = c["single_blocks.0"]
    assert c == {"double_blocks.0": 2 * n, "double_blocks.1": 2 * n, "single_blocks.0": n, "single_blocks.1": n,
                 "single_blocks.2": n}, c
    return n


def flux():
    return F.FakePatcher(F.Flux())


@pytest.fixture
def folder(tmp_path, monkeypatch):
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    return tmp_path


@pytest.fixture
def events(monkeypatch):
    seen = {"text": [], "event": []}
    monkeypatch.setattr(ui, "send_text", lambda text, node: seen["text"].append((str(node), text)) if node is not None else None)
    monkeypatch.setattr(ui, "send_event", lambda name, data: seen["event"].append((name, data)))
    return seen


def auto_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("auto_"))


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_first_run_calibrates_bit_identically_then_the_next_is_planned(folder, events, caplog):
    model = flux()
    plain = F.sample(model, steps=20, cfg=1.0)
    reset_calls(model)
    (patched,) = DPCacheApply().apply(model, unique_id="7")
    with caplog.at_level(logging.INFO, logger="dpcache"):
        first = F.sample(patched, steps=20, cfg=1.0, seed=11)
    assert same(first, plain)  # the calibration run is the plain run, bit for bit
    assert computed(model) == 20
    assert "calibrating this setting (run 1)" in caplog.text
    assert any("calibrating this setting (run 1)" in t for n, t in events["text"] if n == "7")
    (name,) = auto_files(folder)
    assert name.startswith("auto_flux_euler_custom_20_")
    acc, meta = load_pact(str(folder / name))
    assert acc.samples == 1 and meta["order"] == 1 and meta["convention"] == "skip"
    assert meta["setting"]["num_evals"] == 20 and meta["setting"]["conds"] == 1
    assert meta["sample_meta"][0]["seed"] == 11 and meta["sample_meta"][0]["sampler"] == "euler"
    assert (os.stat(folder / name).st_mode & 0o777) == 0o666 & ~current_umask()
    assert not [n for n in os.listdir(folder) if n.endswith((".lock", ".part"))]

    reset_calls(model)
    events["text"].clear()
    second = F.sample(patched, steps=20, cfg=1.0, seed=12)
    k = auto.auto_budget().keys_for(20, 50)  # K = 13 of 50 scaled: 5 of 20
    assert k == 5
    assert computed(model) == k  # every block ran at the K key evaluations only: K x blocks block calls
    assert not same(second, plain)
    (_, data) = events["event"][-1]
    assert data["num_evals"] == 20 and len(data["key_steps"]) == 5 and data["computed"] == 5 and data["node"] == "7"
    assert data["ideal_speedup"] == 4.0 and data["source"] == "auto:" + name
    text = [t for n, t in events["text"] if n == "7"][-1]
    assert f"planned from {name}" in text and "5 of 20 evaluations computed" in text and "ideal 4.00x" in text
    assert auto_files(folder) == [name]  # planning writes nothing


def current_umask():
    from dpcache_core.store import new_file_mode
    return 0o666 & ~new_file_mode()


def test_cfg_batching_and_budget(folder, events):
    model = flux()
    (patched,) = DPCacheApply().apply(model, target_speedup=2.0)
    F.sample(patched, steps=20, cfg=2.0)  # cond and uncond: its own setting
    F.sample(patched, steps=20, cfg=1.0)  # cond only: transferred? no: another cfg batching is another model key
    assert len(auto_files(folder)) == 2
    reset_calls(model)
    F.sample(patched, steps=20, cfg=2.0)
    assert computed(model) == 10  # target 2x: K = 25 of 50, scaled: 10 of 20


def test_other_step_count_or_sigmas_is_transferred_and_says_so(folder, events):
    model = flux()
    (patched,) = DPCacheApply().apply(model, unique_id="3")
    F.sample(patched, steps=20, cfg=1.0)
    (name,) = auto_files(folder)
    for kw in ({"steps": 12}, {"steps": 20, "shift": 3.0}):
        reset_calls(model)
        F.sample(patched, cfg=1.0, **kw)
        text = [t for n, t in events["text"] if n == "3"][-1]
        assert f"transferred from {name} (T=20" in text, text
        assert auto_files(folder) == [name]  # no new file: planned by the transfer
        assert computed(model) < kw["steps"]


def test_a_lora_set_is_another_setting(folder, events):
    model = flux()
    (patched,) = DPCacheApply().apply(model)
    F.sample(patched, steps=10, cfg=1.0)
    lora = model.clone()
    lora.patches = {"diffusion_model.double_blocks.0.img_attn.qkv.weight": [(0.8, ("lora", (torch.ones(4, 2), torch.ones(2, 4))), 1.0, None, None)]}
    (patched_lora,) = DPCacheApply().apply(lora)
    reset_calls(model)
    F.sample(patched_lora, steps=10, cfg=1.0)
    assert computed(model) == 10  # calibrated again: every evaluation computed
    assert len(auto_files(folder)) == 2
    stronger = model.clone()
    stronger.patches = {k: [(1.0,) + v[0][1:]] for k, v in lora.patches.items()}
    assert auto.weights_key(stronger) != auto.weights_key(lora)  # the strength is part of the key


FLUX_BLOCK = [f"{s}_{part}" for s in ("img", "txt") for part in (
    "attn.norm.key_norm.scale", "attn.norm.query_norm.scale", "attn.proj.bias", "attn.proj.weight", "attn.qkv.bias",
    "attn.qkv.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "mod.lin.bias", "mod.lin.weight")]


def with_weights(dm, seed=0):
    """``dm`` with the parameters of a 2-block FLUX checkpoint (the fake blocks hold plain tensors),
    named as in FLUX: attention, MLP, norms, modulation, ``vector_in`` ..."""
    g = torch.Generator().manual_seed(seed)
    names = ["vector_in.in_layer.weight", "vector_in.in_layer.bias", "vector_in.out_layer.weight",
             "final_layer.linear.weight", "img_in.weight", "txt_in.weight"]
    names += [f"double_blocks.{i}.{part}" for i in range(2) for part in FLUX_BLOCK]
    dm.weights = torch.nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        module = dm.weights
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        shape = (8,) if leaf in ("bias", "scale") else (8, 24)
        module.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=g)))
    return dm


def merged_lora(dm, scale=1e-3):
    """A copy of ``dm`` whose attention and MLP weights carry a merged rank-2 LoRA (nothing else changes)."""
    import copy
    other = copy.deepcopy(dm)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in other.weights.named_parameters():
            if ("attn.qkv" in name or "attn.proj" in name or "mlp" in name) and p.ndim == 2:
                p += scale * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
    return other


def test_a_checkpoint_with_a_merged_lora_is_another_setting(folder, events):
    base = with_weights(F.Flux())
    merged = merged_lora(base)
    for dm in (base, merged):
        (patched,) = DPCacheApply().apply(F.FakePatcher(dm))
        F.sample(patched, steps=10, cfg=1.0)
    assert len(auto_files(folder)) == 2  # the merged checkpoint calibrated its own file
    again = F.FakePatcher(merged_lora(base))  # the same merge loaded again: the same setting
    assert auto.weights_key(again) == auto.weights_key(F.FakePatcher(merged))


class FakeHookRef:
    """ComfyUI's _HookRef: an identity object, new for every Create Hook LoRA execution."""


def test_weight_hooks_are_part_of_the_setting(folder, events):
    model = F.FakePatcher(with_weights(F.Flux()))
    (patched,) = DPCacheApply().apply(model)
    F.sample(patched, steps=10, cfg=1.0)
    hooked = model.clone()
    lora = ("lora", (torch.ones(8, 2), torch.ones(2, 24), 2.0, None, None))
    hooked.hook_patches = {FakeHookRef(): {"diffusion_model.weights.double_blocks.0.img_attn.qkv.weight":
                                           [(1.0, lora, 1.0, None, None)]}}
    (patched_hooked,) = DPCacheApply().apply(hooked)
    reset_calls(model)
    F.sample(patched_hooked, steps=10, cfg=1.0)
    assert computed(model) == 10 and len(auto_files(folder)) == 2  # a hooked LoRA calibrates its own file
    again = model.clone()  # the same hook made again (a new HookRef): the same setting
    again.hook_patches = {FakeHookRef(): {k: list(v) for k, v in next(iter(hooked.hook_patches.values())).items()}}
    assert auto.weights_key(again) == auto.weights_key(hooked)
    weaker = model.clone()
    weaker.hook_patches = {FakeHookRef(): {k: [(0.5,) + v[0][1:]] for k, v in next(iter(hooked.hook_patches.values())).items()}}
    assert auto.weights_key(weaker) != auto.weights_key(hooked)


class FakeAdapter:
    """A comfy.weight_adapter LoRA adapter object: loaded_keys and a tuple of weights (some None)."""

    def __init__(self, up, down):
        self.loaded_keys = {"a", "b"}
        self.weights = (up, down, 4.0, None, None, None)


@pytest.mark.parametrize("entry", [
    (1.0, FakeAdapter(torch.ones(8, 2), torch.ones(2, 24)), 1.0, None, None),
    (1.0, ("diff", (torch.ones(8, 24),)), 1.0, (0, 0, 4), None),  # an offset
    (1.0, ("set", (torch.empty(8, 24, device="meta"),)), 1.0, None, None),  # a tensor that cannot be read
    (1.0, torch.ones(8, 24, dtype=torch.float8_e4m3fn), 1.0, None, lambda w: w * 2),  # a function
    (1.0, "model_as_lora", 1.0, None, None),  # not a tensor at all
    (1.0, None, 1.0, None, None),
    [0.5, {"odd": object()}],  # not even a tuple
    (torch.tensor(0.5), (torch.ones(3, dtype=torch.complex64),)),
])
def test_unusual_patches_never_crash_the_setting_and_still_count(folder, events, entry):
    model = F.FakePatcher(with_weights(F.Flux()))
    patched_model = model.clone()
    patched_model.patches = {"diffusion_model.weights.double_blocks.0.img_mlp.0.weight": [entry]}
    (patched,) = DPCacheApply().apply(patched_model)
    F.sample(patched, steps=10, cfg=1.0)  # no crash at sampling start
    assert len(auto_files(folder)) == 1
    assert auto.weights_key(patched_model) != auto.weights_key(model)


def test_the_weights_are_read_once_per_loaded_model(folder, events, monkeypatch):
    reads = []
    digest = auto.settings.tensors_digest
    monkeypatch.setattr(auto.settings, "tensors_digest", lambda named: reads.append(1) or digest(named))
    model = F.FakePatcher(with_weights(F.Flux()))
    (patched,) = DPCacheApply().apply(model)
    for _ in range(3):
        F.sample(patched, steps=10, cfg=1.0)
    F.sample(DPCacheApply().apply(model.clone())[0], steps=10, cfg=1.0)  # another clone of the same model
    assert len(reads) == 1


def test_interrupted_first_run_leaves_no_file(folder, events):
    (patched,) = DPCacheApply().apply(flux())
    with pytest.raises(KeyboardInterrupt):
        F.sample(patched, steps=10, interrupt_at=4)
    assert os.listdir(folder) == []


def test_damaged_file_is_refused_by_name_and_the_run_computes_in_full(folder, events, caplog):
    model = flux()
    (patched,) = DPCacheApply().apply(model, unique_id="5")
    plain = F.sample(model, steps=10, cfg=1.0)
    F.sample(patched, steps=10, cfg=1.0)
    (name,) = auto_files(folder)
    (folder / name).write_bytes(b"\0garbage" * 10)
    reset_calls(model)
    with caplog.at_level(logging.INFO, logger="dpcache"):
        out = F.sample(patched, steps=10, cfg=1.0)
    assert same(out, plain) and computed(model) == 10
    assert name in caplog.text and "damaged" in caplog.text and "computes every evaluation" in caplog.text
    assert (folder / name).read_bytes() == b"\0garbage" * 10  # left for the user to look at


def test_refine_every_adds_a_calibration_run(folder, events):
    model = flux()
    (patched,) = DPCacheApply().apply(model, refine_every=2)
    calls = []
    for _ in range(4):
        reset_calls(model)
        F.sample(patched, steps=10, cfg=1.0)
        calls.append(computed(model))
    assert calls[0] == 10 and calls[1] == 10 and calls[2] < 10 and calls[3] == 10
    (name,) = auto_files(folder)
    assert load_pact(str(folder / name))[0].samples == 3


def test_degraded_budget_says_no_speed_up(folder, events):
    (patched,) = DPCacheApply().apply(flux(), unique_id="9")
    F.sample(patched, steps=4, cfg=1.0)
    F.sample(patched, steps=4, cfg=1.0)
    text = [t for n, t in events["text"] if n == "9"][-1]
    assert "4 of 4 evaluations computed" in text and "nothing skipped: the plain run" in text


def test_schedule_auto_entry_feeds_apply_and_shows_the_plan_that_ran(folder, events):
    out = DPCacheSchedule().schedule("(auto)", 13, 3, 0, 50, unique_id="2")
    marker = out["result"][0]
    assert marker.auto and out["result"][1].ndim == 4 and "(auto)" in out["ui"]["text"][0]
    model = flux()
    (patched,) = DPCacheApply().apply(model, marker, unique_id="4")
    F.sample(patched, steps=20, cfg=1.0)
    F.sample(patched, steps=20, cfg=1.0)
    name, data = events["event"][-1]
    assert name == "dpcache.run" and data["nodes"] == ["4", "2"] and len(data["key_steps"]) == 5
    assert any(n == "2" and "5 of 20 evaluations computed" in t for n, t in events["text"])


def test_explicit_schedule_reports_the_plan_that_ran_to_its_schedule_node(events):
    sched = DPCacheSchedule().schedule("(uniform)", 13, 3, 0, 50, unique_id="21")["result"][0]
    (patched,) = DPCacheApply().apply(flux(), sched, unique_id="22")["result"]
    F.sample(patched, steps=20, cfg=1.0)  # re-planned for 20: 5 keys
    _, data = events["event"][-1]
    assert data["nodes"] == ["22", "21"] and data["num_evals"] == 20 and len(data["key_steps"]) == 5
    assert any(n == "21" and "T=20" in t for n, t in events["text"])
    assert data["measured_speedup"] > 0 and "measured" in data["summary"]


# ---- DPCache Calibrate with an explicit name: no silent mixing


def test_calibrate_refuses_a_run_with_other_sigmas(tmp_path, monkeypatch):
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    (calib,) = DPCacheCalibrate().calibrate(flux(), "flux_euler_20", 1, False)
    F.sample(calib, steps=20, img=6)
    F.sample(calib, steps=20, img=8, seed=5)  # same sigmas, another resolution: added, both kept
    acc, meta = load_pact(str(tmp_path / "flux_euler_20.safetensors"))
    assert acc.samples == 2 and meta["resolution"] == ["64x48", "64x64"]
    assert [r["resolution"] for r in meta["sample_meta"]] == ["64x48", "64x64"] and meta["sample_meta"][1]["seed"] == 5
    with pytest.raises(ValueError, match="other sigmas"):
        F.sample(calib, steps=20, shift=3.0)
    assert load_pact(str(tmp_path / "flux_euler_20.safetensors"))[0].samples == 2


def test_explicit_schedule_says_when_the_budget_leaves_no_speed_up(events):
    sched = DPCacheSchedule().schedule("(uniform)", 13, 3, 0, 50, unique_id="31")["result"][0]
    (patched,) = DPCacheApply().apply(flux(), sched, unique_id="32")["result"]
    F.sample(patched, steps=3, cfg=1.0)  # 3 evaluations, all mandatory
    texts = [t for n, t in events["text"] if n == "32"]
    assert "3 of 3 evaluations computed" in texts[-1] and "nothing skipped: the plain run" in texts[-1]
    assert [t for t in texts if "T=3 leaves nothing to skip" in t and "this run is the plain run" in t]  # said as it starts


@pytest.mark.parametrize("target, forecaster", [(3.85, "spectral"), (2.0, "taylor")])
def test_planned_runs_from_a_file_without_trajectories_pick_the_forecaster_like_schedule_auto(folder, events, target, forecaster):
    """A file without replay trajectories (written before they were kept): DPCache Schedule's no-data
    "auto" rule, spectral from T/K = 2.9 up, Taylor below."""
    from dpcache_core import save_pact
    model = flux()
    (patched,) = DPCacheApply().apply(model, target_speedup=target, unique_id="7")
    F.sample(patched, steps=20, cfg=1.0)  # calibrates
    (name,) = auto_files(folder)
    acc, meta = load_pact(str(folder / name))
    acc.trajectories = None
    save_pact(str(folder / name), acc, meta)
    F.sample(patched, steps=20, cfg=1.0)  # planned
    text = [t for n, t in events["text"] if n == "7"][-1]
    assert f"{forecaster} forecaster" in text and "by replay" not in text, text


def test_the_first_run_keeps_trajectories_and_planned_runs_use_the_replay_choice(folder, events):
    model = flux()
    (patched,) = DPCacheApply().apply(model, unique_id="7")
    F.sample(patched, steps=20, cfg=1.0)  # calibrates: the file keeps the run's replay trajectory
    (name,) = auto_files(folder)
    acc, meta = load_pact(str(folder / name))
    assert acc.trajectories is not None and acc.trajectories.shape[:2] == (1, 20)
    choice = core.choose.replay_choice(acc, meta, 5, 3, 0)
    reset_calls(model)
    F.sample(patched, steps=20, cfg=1.0)  # planned: the replay's keys and forecaster
    text = [t for n, t in events["text"] if n == "7"][-1]
    (_, data) = events["event"][-1]
    assert data["key_steps"] == list(choice.best.keys) and computed(model) == 5
    best, runner = choice.best, choice.runner_up
    assert f"forecaster chosen by replay on 1 recorded trajectory: {core.choose.label(best.name)}" in text, text
    assert f"runner-up {core.choose.label(runner.name)}" in text and f"{best.predictor} forecaster" in text
