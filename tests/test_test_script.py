"""scripts/test.sh with stand-ins for pytest, node and the real-ComfyUI Python: its one-line summary of
every tier, and the CPU tier's environment (no COMFYUI_PATH; told that the real tier runs separately)."""
import os
import shutil
import subprocess

import pytest

from real_tier import unset_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.name != "posix" or shutil.which("bash") is None, reason="needs bash")

FAKE_PYTEST = """#!/bin/sh
echo "COMFYUI_PATH=${{COMFYUI_PATH-unset}} SEPARATE=${{DPCACHE_REAL_TIER_SEPARATE-unset}}" >> "{log}"
echo "s [1] tests/comfy/test_x.py: skipped"
echo "{line}"
exit {rc}
"""
FAKE_NODE = """#!/bin/sh
echo "# tests 7"
echo "# pass 7"
echo "# fail 0"
"""


def script(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def run_tests(tmp_path):
    """Runs a copy of scripts/test.sh (setup.sh a no-op) with stand-ins; returns (stdout lines, rc, CPU env log)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "test.sh"), repo / "scripts")
    script(repo / "scripts" / "setup.sh", "#!/bin/sh\nexit 0\n")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    log = tmp_path / "cpu-env.log"
    script(tmp_path / "bin" / "node", FAKE_NODE)
    comfy_python = script(tmp_path / "comfy-python", FAKE_PYTEST.format(log=tmp_path / "real.log", line="=== 5 passed, 1 failed in 9.10s ===", rc=1))

    def run(cpu_rc=0, comfy=True):
        script(tmp_path / "venv" / "bin" / "python", FAKE_PYTEST.format(log=log, line="12 passed, 3 skipped in 1.23s", rc=cpu_rc))
        env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "COMFYUI_PYTHON", "DPCACHE_REAL_TIER_SEPARATE")}
        env.update(DPCACHE_VENV=str(tmp_path / "venv"), PATH=f"{tmp_path / 'bin'}:{env['PATH']}")
        if comfy:
            env.update(COMFYUI_PATH=str(tmp_path / "ComfyUI"), COMFYUI_PYTHON=comfy_python)
        proc = subprocess.run(["bash", str(repo / "scripts" / "test.sh")], env=env, capture_output=True, text=True, timeout=60)
        return proc.stdout.splitlines(), proc.returncode, log.read_text().splitlines()[-1]

    return run


def test_the_last_line_sums_up_every_tier(run_tests):
    lines, rc, cpu_env = run_tests()
    assert lines[-1] == ("[test] summary: CPU tier: 12 passed, 3 skipped, ok | frontend: 7 passed, 0 failed, ok"
                         " | real-ComfyUI tier: 5 passed, 1 failed, FAILED")
    assert rc == 1
    assert cpu_env == "COMFYUI_PATH=unset SEPARATE=1"  # the CPU tier's skips say the real tier runs below


def test_without_comfyui_the_summary_says_what_to_set(run_tests):
    lines, rc, cpu_env = run_tests(cpu_rc=1, comfy=False)
    assert lines[-1] == ("[test] summary: CPU tier: 12 passed, 3 skipped, FAILED | frontend: 7 passed, 0 failed, ok"
                         " | real-ComfyUI tier: not run (set COMFYUI_PATH and COMFYUI_PYTHON)")
    assert rc == 1 and cpu_env == "COMFYUI_PATH=unset SEPARATE=unset"
    assert run_tests(cpu_rc=0, comfy=False)[1] == 0


def test_the_skip_reason_says_what_to_set(monkeypatch):
    monkeypatch.delenv("DPCACHE_REAL_TIER_SEPARATE", raising=False)
    assert "set COMFYUI_PATH" in unset_reason() and "COMFYUI_PYTHON" in unset_reason()
    monkeypatch.setenv("DPCACHE_REAL_TIER_SEPARATE", "1")
    assert "runs separately below with COMFYUI_PYTHON" in unset_reason()
