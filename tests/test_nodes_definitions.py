"""CPU tier: node definitions, the Schedule node's values and errors (no ComfyUI needed)."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

import nodes_fakes  # noqa: F401  (puts the repo root on sys.path)
from dpcache_core import PactAccumulator, save_pact
from nodes import dpcache_nodes as nd

ROOT = nodes_fakes.ROOT
NAMES = {"DPCacheCalibrate": "DPCache Calibrate", "DPCacheSchedule": "DPCache Schedule", "DPCacheApply": "Apply DPCache"}


def test_pack_root_imports_like_comfyui_loads_it():
    spec = importlib.util.spec_from_file_location("dpcache_pack_under_test", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        assert mod.NODE_DISPLAY_NAME_MAPPINGS == NAMES
        assert set(mod.NODE_CLASS_MAPPINGS) == set(NAMES)
        assert mod.WEB_DIRECTORY == "./web"
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name)]:
            del sys.modules[name]


@pytest.mark.parametrize("node_id", list(NAMES))
def test_definitions(node_id):
    cls = nd.NODE_CLASS_MAPPINGS[node_id]
    assert nd.NODE_DISPLAY_NAME_MAPPINGS[node_id] == NAMES[node_id]
    assert cls.CATEGORY == "sampling/dpcache" and len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    for name, entry in {**spec["required"], **spec.get("optional", {})}.items():
        assert entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_contract_inputs_and_defaults():
    cal = nd.DPCacheCalibrate.INPUT_TYPES()["required"]
    assert cal["pact_name"][1]["default"] == ""  # named after family, sampler and steps at run start
    assert (cal["order"][1]["default"], cal["order"][1]["min"], cal["order"][1]["max"]) == (1, 1, 3)
    assert cal["reset"][0] == "BOOLEAN" and cal["reset"][1]["default"] is False
    sch = nd.DPCacheSchedule.INPUT_TYPES()["required"]
    assert sch["pact"][0][:4] == [nd.SPECTRUM, nd.PRIOR, "(uniform)", "(manual)"] and sch["pact"][1]["default"] == nd.SPECTRUM
    assert [sch[k][1]["default"] for k in ("key_steps", "first_full_steps", "last_full_steps", "total_evaluations", "manual_key_steps")] == [13, 3, 0, 50, ""]
    assert nd.DPCacheSchedule.RETURN_TYPES == ("DPCACHE_SCHEDULE", "IMAGE")
    assert sch["pact"][0][-1] == "(auto)"  # offered, never the default entry
    app = nd.DPCacheApply.INPUT_TYPES()
    assert app["required"]["model"][0] == "MODEL" and app["optional"]["schedule"][0] == "DPCACHE_SCHEDULE"
    assert "schedule" not in app["required"]  # nothing connected: the automatic mode
    assert app["optional"]["target_speedup"][1]["default"] == 3.85 and app["optional"]["refine_every"][1]["default"] == 0
    assert nd.DPCacheApply.RETURN_TYPES == ("MODEL",) == nd.DPCacheCalibrate.RETURN_TYPES


def run_schedule(**kw):
    args = dict(pact="(uniform)", key_steps=13, first_full_steps=3, last_full_steps=0, total_evaluations=50, manual_key_steps="")
    args.update(kw)
    out = nd.DPCacheSchedule().schedule(**args)
    return out["result"][0], out["result"][1], out["ui"]["text"][0]


def test_uniform_and_manual_schedules():
    sched, image, text = run_schedule()
    assert sched.num_evals == 50 and sched.num_keys == 13 and sched.key_steps[:3] == (0, 1, 2)
    assert sched.model_family is None and sched.order == 2 and sched.source == "uniform"
    assert "ideal speed-up 3.85x" in text and str(list(sched.key_steps)) in text
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0
    sched, _, text = run_schedule(pact="(manual)", manual_key_steps="0, 1, 2, 5, 9-11", total_evaluations=20)
    assert sched.key_steps == (0, 1, 2, 5, 9, 10, 11) and sched.num_evals == 20 and sched.source == "manual"
    assert "7 of 20 evaluations" in text


@pytest.mark.parametrize("kw,match", [
    (dict(key_steps=60), "K=60 key steps is more than the T=50"),
    (dict(key_steps=2, first_full_steps=3), "fewer than the 3 mandatory"),
    (dict(pact="(manual)", manual_key_steps="0, 2, x"), "cannot read key step 'x'"),
    (dict(pact="(manual)", manual_key_steps=""), "no key steps given"),
    (dict(pact="(manual)", manual_key_steps="0, 60"), "out of range for T=50"),
    (dict(pact="missing.safetensors"), "not found"),
])
def test_schedule_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        run_schedule(**kw)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(nd, "SHIPPED_DIR", str(tmp_path))
    return tmp_path


def test_schedule_from_a_pact_file(shipped):
    t = 12
    rng = np.random.default_rng(0)
    acc = PactAccumulator(t)
    cost = np.where(np.isfinite(np.zeros((t, t + 1, t + 1))), rng.random((t, t + 1, t + 1)), np.inf)
    acc.add(cost)
    save_pact(os.path.join(shipped, "w.safetensors"), acc, {"model_family": "wan", "order": 2, "scheme": "reference"})
    (shipped / "notes.txt").write_text("not a PACT")
    assert nd.DPCacheSchedule.INPUT_TYPES()["required"]["pact"][0] == [nd.SPECTRUM, nd.PRIOR, "(uniform)", "(manual)", "w.safetensors", "(auto)"]
    sched, image, text = run_schedule(pact="w.safetensors", key_steps=6)
    assert sched.num_evals == t and sched.num_keys == 6 and sched.model_family == "wan"
    assert sched.source == "pact:w.safetensors" and sched.cost is not None
    assert image.shape[0] == 1 and image.shape[-1] == 3
    assert nd.DPCacheSchedule.IS_CHANGED("w.safetensors") != ""
    with pytest.raises(ValueError, match="no schedule with K=5 key steps of T=12 has finite cost.*the smallest K that works is 6"):
        run_schedule(pact="w.safetensors", key_steps=5)
    (shipped / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        run_schedule(pact="bad.safetensors", key_steps=5)


def test_uniform_and_manual_run_the_taylor_order_given_and_say_which(shipped):
    spec = nd.DPCacheSchedule.INPUT_TYPES()["optional"]["taylor_order"]
    assert spec[0] == "INT" and (spec[1]["default"], spec[1]["min"], spec[1]["max"]) == (2, 1, 3) and spec[1]["tooltip"]
    sched, _, text = run_schedule(forecaster="taylor")
    assert sched.order == 2 and "Taylor order 2 (taylor_order;" in text
    for order in (1, 3):
        sched, _, text = run_schedule(taylor_order=order, forecaster="taylor")
        assert sched.order == order and f"Taylor order {order} (taylor_order;" in text
        sched, _, text = run_schedule(pact="(manual)", manual_key_steps="0, 1, 2, 9, 20", taylor_order=order, forecaster="taylor")
        assert sched.order == order and f"Taylor order {order}" in text
    with pytest.raises(ValueError, match="taylor_order must be 1, 2 or 3, got 0"):
        run_schedule(taylor_order=0)
    acc = PactAccumulator(12)
    acc.add(np.random.default_rng(0).random((12, 13, 13)))
    save_pact(os.path.join(shipped, "o1.safetensors"), acc, {"model_family": "flux", "order": 1})
    sched, _, text = run_schedule(pact="o1.safetensors", key_steps=8, taylor_order=3, forecaster="taylor")  # the PACT's order wins
    assert sched.order == 1 and "Taylor order 1 (from the PACT;" in text


def test_a_pact_without_samples_says_so(shipped):
    save_pact(os.path.join(shipped, "empty.safetensors"), PactAccumulator(12), {"model_family": "flux", "order": 1})
    with pytest.raises(ValueError, match="'empty.safetensors' holds no samples.*DPCache Calibrate") as err:
        run_schedule(pact="empty.safetensors", key_steps=6)
    assert "raise K" not in str(err.value) and "hop cap" not in str(err.value)


def test_the_pack_exceptions_have_a_stable_module_name():
    """ComfyUI's error dialog names an exception module.qualname; the module must not be the pack's folder path."""
    from dpcache_core import PactFileError, ScheduleMismatchError
    from nodes.families import UnsupportedModelError

    for cls in (PactFileError, ScheduleMismatchError, UnsupportedModelError):
        assert cls.__module__ == "dpcache", cls
        assert issubclass(cls, ValueError)


def test_schedule_and_apply_send_the_schedule_to_the_frontend():
    import json

    out = nd.DPCacheSchedule().schedule(pact="(uniform)", key_steps=13, first_full_steps=3, last_full_steps=0,
                                        total_evaluations=50, manual_key_steps="")
    (info,) = out["ui"]["dpcache_schedule"]
    assert info == {"key_steps": list(out["result"][0].key_steps), "num_evals": 50, "ideal_speedup": 3.8462,
                    "source": "uniform", "cost": None}
    json.dumps(out["ui"])  # plain JSON for the websocket
    from nodes_fakes import FakePatcher, Flux

    applied = nd.DPCacheApply().apply(FakePatcher(Flux()), out["result"][0])
    assert applied["ui"]["dpcache_schedule"] == [info]


def test_schedule_plans_under_the_files_convention(shipped):
    """Issue 11: files without a recorded convention (older ones, the authors' PACTs) plan exactly as
    before; "skip" files plan skip-only, and history-exact when they hold the history tensor."""
    from dpcache_core import solve_schedule
    from dpcache_core.history import history_shape
    from dpcache_core.schedule import hop_costs_history, skip_only_cost, solve_schedule_history

    t, k = 14, 6
    rng = np.random.default_rng(1)
    cost = rng.random((t, t + 1, t + 1))
    history = rng.random(history_shape(t, 2, 4))
    for name, meta, with_history in [("old.safetensors", {"order": 2}, True), ("skip1.safetensors", {"order": 1, "convention": "skip"}, False),
                                     ("skip2.safetensors", {"order": 2, "convention": "skip"}, True),
                                     ("ref2.safetensors", {"order": 2, "convention": "reference"}, True)]:
        acc = PactAccumulator(t)
        acc.add(cost, history=history if with_history else None)
        save_pact(os.path.join(shipped, name), acc, dict(meta, model_family="flux", scheme="reference"))
    sched, _, text = run_schedule(pact="old.safetensors", key_steps=k)
    assert sched.convention == "reference" and list(sched.key_steps) == solve_schedule(cost, k, 3, 0)
    assert "planned with reference costs" in text
    sched, _, _ = run_schedule(pact="ref2.safetensors", key_steps=k)
    assert sched.convention == "reference" and list(sched.key_steps) == solve_schedule(cost, k, 3, 0)
    sched, _, text = run_schedule(pact="skip1.safetensors", key_steps=k)
    assert sched.convention == "skip" and list(sched.key_steps) == solve_schedule(cost, k, 3, 0, convention="skip")
    assert sched.cost == pytest.approx(float(sum(skip_only_cost(cost)[a, i, j] for a, i, j in
                                                 zip([0, 0, *sched.key_steps[1:-1]], sched.key_steps, [*sched.key_steps[1:], t]))))
    assert "planned with skip-only costs" in text
    sched, image, text = run_schedule(pact="skip2.safetensors", key_steps=k)
    keys = solve_schedule_history(history, k, 3, 0)
    assert sched.convention == "history" and list(sched.key_steps) == keys
    assert sched.cost == pytest.approx(sum(hop_costs_history(history, keys, 3)))
    assert "history-exact" in text and image.shape[-1] == 3
    assert "history-exact" in sched.planned_by and "history-exact" in sched.describe()
