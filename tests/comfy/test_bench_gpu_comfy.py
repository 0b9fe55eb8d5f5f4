"""bench.gpu's ComfyUI path at tiny size: ComfyUI's Flux / Wan classes, its sampler, the DPCache nodes."""
import pytest

pytestmark = pytest.mark.comfy


def test_bench_gpu_tiny_through_comfyui(host, capsys):
    from bench import gpu
    rows = gpu.main(["--tiny"])
    assert [r.label for r in rows if r.model == "flux"] == ["full", "K=50", "K=13", "K=9", "calibration run"]
    assert all(r.seconds > 0 for r in rows)
    out = capsys.readouterr().out
    assert "ComfyUI's classes" in out
    print("\n" + "\n".join(l for l in out.splitlines() if l.startswith("| flux |")))
