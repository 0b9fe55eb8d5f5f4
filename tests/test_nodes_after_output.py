"""CPU tier: once the sampler has produced its output, nothing in the pack raises (nodes/sampling_hooks.py
``sample_with_run``): the output is returned and the node says what failed; driven by tests/nodes_fakes.py."""
from __future__ import annotations

import logging
import os

import pytest
import torch

import nodes_fakes as F
from nodes_fakes import block_calls, reset_calls
from dpcache_core import Schedule, runtime, uniform_key_steps
from nodes import auto, ui
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate


def flux():
    return F.FakePatcher(F.Flux())


def computed(model) -> int:
    return block_calls(model)["single_blocks.0"]


@pytest.fixture
def events(monkeypatch):
    seen = {"text": []}
    monkeypatch.setattr(ui, "send_text", lambda text, node: seen["text"].append((str(node), text)) if node is not None else None)
    monkeypatch.setattr(ui, "send_event", lambda name, data: None)
    return seen


@pytest.fixture
def unwritable(tmp_path, monkeypatch):
    """models/dpcache under a parent that is a file: every write raises NotADirectoryError."""
    import nodes.dpcache_nodes as nd
    (tmp_path / "models").write_text("not a folder")
    folder = str(tmp_path / "models" / "dpcache")
    monkeypatch.setattr(nd, "calibration_folder", lambda: folder)
    return folder


def texts(events, node="7"):
    return " ".join(t for n, t in events["text"] if n == node)


def test_auto_returns_the_image_when_its_pact_cannot_be_written_then_plans_on_the_prior(unwritable, events, caplog):
    model = flux()
    F.sample(model, steps=20, cfg=1.0)
    plain = F.sample.last_output
    reset_calls(model)
    (patched,) = DPCacheApply().apply(model, unique_id="7")
    with caplog.at_level(logging.INFO, logger="dpcache"):
        F.sample(patched, steps=20, cfg=1.0)  # raised NotADirectoryError before
    assert torch.equal(F.sample.last_output, plain)  # the calibration run's output is the plain run's
    assert computed(model) == 20
    said = texts(events)
    assert "not saved" in said and "NotADirectoryError" in said and unwritable in said and "cost prior" in said
    assert "NotADirectoryError" in caplog.text
    for _ in range(2):  # later runs at this setting: planned on the prior, never calibrated again
        reset_calls(model)
        events["text"].clear()
        F.sample(patched, steps=20, cfg=1.0)
        assert computed(model) == auto.auto_budget().keys_for(20, 50)
        assert "cost prior" in texts(events) and "calibrating" not in texts(events)
    assert not os.path.exists(unwritable)


def test_auto_returns_the_image_when_the_sample_cannot_be_built(tmp_path, monkeypatch, events):
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))

    def no_stream(*args, **kwargs):
        raise ValueError("no stream was recorded at every evaluation: nothing to calibrate from")

    monkeypatch.setattr(runtime.TrajectoryRecorder, "build_sample", no_stream)
    model = flux()
    (patched,) = DPCacheApply().apply(model, unique_id="7")
    F.sample(patched, steps=12, cfg=1.0)
    assert F.sample.last_output is not None
    assert "no stream was recorded" in texts(events)
    reset_calls(model)
    F.sample(patched, steps=12, cfg=1.0)
    assert "cost prior" in texts(events), texts(events)
    assert computed(model) < 12


def test_calibrate_returns_the_image_when_its_pact_cannot_be_written(unwritable, events):
    model = flux()
    F.sample(model, steps=10, cfg=2.0)
    plain = F.sample.last_output
    (calib,) = DPCacheCalibrate().calibrate(model, "flux_euler_10", 1, False, unique_id="5")
    F.sample(calib, steps=10, cfg=2.0)  # raised NotADirectoryError before
    assert torch.equal(F.sample.last_output, plain)
    said = texts(events, "5")
    assert "nothing added" in said and "NotADirectoryError" in said and "flux_euler_10" in said


def test_apply_returns_the_image_of_a_run_shorter_than_planned(events, caplog):
    model = F.FakePatcher(F.WanModel())
    schedule = Schedule(tuple(uniform_key_steps(10, 5)), 10)
    patched = DPCacheApply().apply(model, schedule, unique_id="3")["result"][0]
    with caplog.at_level(logging.INFO, logger="dpcache"):  # dpm_adaptive: its count is known only while it samples
        F.sample(patched, steps=3, sampler="dpm_adaptive", evals_per_step=2)  # 6 of 10: raised before
    assert F.sample.last_output is not None
    assert "makes 6 model evaluations" in texts(events, "3") and "output is returned" in texts(events, "3")
    assert "makes 6 model evaluations" in caplog.text


def test_an_interrupted_run_still_raises_and_writes_nothing(unwritable, events):
    (patched,) = DPCacheApply().apply(flux(), unique_id="7")
    with pytest.raises(KeyboardInterrupt):
        F.sample(patched, steps=20, cfg=1.0, interrupt_at=4)
    assert "not saved" not in texts(events)


def test_a_failure_freeing_the_run_state_after_the_output_is_logged_not_raised(events, caplog, monkeypatch):
    from nodes import run_state

    def broken_close(self):
        raise RuntimeError("close failed")

    monkeypatch.setattr(run_state.ApplyRun, "close", broken_close)
    model = F.FakePatcher(F.WanModel())
    patched = DPCacheApply().apply(model, Schedule(tuple(uniform_key_steps(10, 5)), 10), unique_id="3")["result"][0]
    with caplog.at_level(logging.INFO, logger="dpcache"):
        F.sample(patched, steps=10)  # raised RuntimeError before
    assert F.sample.last_output is not None
    assert "freeing the run's state failed" in caplog.text and "close failed" in caplog.text
