"""bench.gpu at tiny size on the CPU (the pack's own models): the table's rows and their arithmetic."""
import pytest

from bench import gpu


def test_tiny_run_reports_every_row(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)  # the pack's own models, not ComfyUI's
    rows = gpu.main(["--tiny"])
    labels = [(r.model, r.label) for r in rows]
    expected = [(m, lab) for m in ("flux", "wan") for lab in ["full"] + [f"K={k}" for k in gpu.KS] + ["calibration run"]]
    assert labels == expected
    full = {r.model: r.seconds for r in rows if r.label == "full"}
    for r in rows:
        assert r.seconds > 0
        if r.label.startswith("K="):
            k = int(r.label[2:])
            assert r.speedup == pytest.approx(full[r.model] / r.seconds)
            assert r.efficiency == pytest.approx(r.speedup * k / gpu.T)
    assert all("PACT build" in r.note for r in rows if r.label == "calibration run")
    out = capsys.readouterr().out
    assert "| flux | K=13 |" in out and "| wan | calibration run |" in out


def test_needs_cuda_without_tiny(monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.main([])


def test_unknown_model_is_refused(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit, match="unknown model"):
        gpu.main(["--tiny", "--models", "sdxl"])

