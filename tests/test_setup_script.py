"""scripts/setup.sh with a stand-in venv whose pip only records what it is asked to install.

The stand-in python runs the real interpreter without its site-packages (-S), so torch looks
absent until the fake pip "installs" it (a dist-info folder on PYTHONPATH, no torch module).
"""
import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.name != "posix" or shutil.which("bash") is None, reason="needs bash")

FAKE_PYTHON = """#!/bin/sh
LOG="{log}"
SITE="{site}"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  shift 2
  echo "pip $*" >> "$LOG"
  for arg in "$@"; do
    case "$arg" in
      torch==*)
        v="${{arg#torch==}}"
        rm -rf "$SITE"/torch-*.dist-info
        mkdir -p "$SITE/torch-$v.dist-info"
        printf 'Metadata-Version: 2.1\\nName: torch\\nVersion: %s\\n' "$v" > "$SITE/torch-$v.dist-info/METADATA"
        if [ -n "${{FAKE_CUDA_TORCH:-}}" ]; then
          mkdir -p "$SITE/nvidia_cublas_cu12-12.8.dist-info"
          printf 'Metadata-Version: 2.1\\nName: nvidia-cublas-cu12\\nVersion: 12.8\\n' > "$SITE/nvidia_cublas_cu12-12.8.dist-info/METADATA"
        fi;;
    esac
  done
  exit 0
fi
echo "python $*" >> "$LOG"
PYTHONPATH="$SITE" exec "{real}" -S "$@"
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of scripts/setup.sh and requirements.txt with a stand-in venv; returns (run, log lines)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "setup.sh"), repo / "scripts")
    shutil.copy(os.path.join(ROOT, "requirements.txt"), repo)
    venv, site, log = tmp_path / "venv", tmp_path / "site", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    site.mkdir()
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(log=log, site=site, real=sys.executable))
    python.chmod(0o755)

    def run(*extra, **env):
        log.write_text("")
        full_env = {k: v for k, v in os.environ.items() if k not in ("DPCACHE_TORCH", "PIP_INDEX_URL")}
        # no network in tests: the CPU wheel index is a folder (reachable) or a missing one (not)
        full_env.update({"DPCACHE_VENV": str(venv), "DPCACHE_TORCH_INDEX": (tmp_path / "no-such-index").as_uri(), **env})
        proc = subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *extra], env=full_env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = log.read_text().splitlines()
        return [ln for ln in lines if ln.startswith("pip ")], [ln for ln in lines if ln.startswith("python ")], proc

    return repo, venv, run


def test_torch_then_requirements_and_torch_is_never_imported(checkout):
    repo, venv, run = checkout
    pips, pythons, proc = run("pytest")
    assert len(pips) == 2 and "torch==2.13.0" in pips[0].split()
    assert "-r requirements.txt" in pips[1] and pips[1].endswith("pytest") and "-c" in pips[1].split()
    assert (venv / "torch-constraint.txt").read_text().strip() == "torch==2.13.0"
    assert not any("import torch" in p for p in pythons), pythons
    assert "Failed to initialize NumPy" not in proc.stderr


def test_pip_is_skipped_when_nothing_changed(checkout):
    repo, venv, run = checkout
    assert len(run("pytest")[0]) == 2
    assert run("pytest")[0] == []  # the second call (every demo.sh / test.sh) runs no pip
    assert run("pytest")[0] == []
    pips = run()[0]  # other extra packages: requirements again, torch stays
    assert len(pips) == 1 and "-r requirements.txt" in pips[0]
    with open(repo / "requirements.txt", "a") as f:
        f.write("pytest\n")
    pips = run()[0]  # requirements.txt changed
    assert len(pips) == 1 and "-r requirements.txt" in pips[0]
    assert run()[0] == []


def test_dpcache_torch_override_is_installed_and_pins_the_rest(checkout):
    repo, venv, run = checkout
    run()
    pips = run(DPCACHE_TORCH="torch==2.7.1")[0]
    assert len(pips) == 2 and "torch==2.7.1" in pips[0].split()
    assert (venv / "torch-constraint.txt").read_text().strip() == "torch==2.7.1"
    assert run(DPCACHE_TORCH="torch==2.7.1")[0] == []


def test_requirements_list_pillow_unpinned():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = f.read().split()
    assert "Pillow" in reqs
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"Pillow"' in f.read()


CPU_WHEEL_PLATFORM = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")


@pytest.mark.skipif(not CPU_WHEEL_PLATFORM, reason="PyTorch's separate CPU wheels are chosen on Linux x86_64/aarch64 and Windows")
def test_torch_comes_from_the_cpu_wheel_index_with_the_configured_one_for_its_dependencies(checkout, tmp_path):
    repo, venv, run = checkout
    index = tmp_path / "cpu-index"
    (index / "torch").mkdir(parents=True)
    pips, _, proc = run(DPCACHE_TORCH_INDEX=index.as_uri(), PIP_INDEX_URL="https://mirror.example/simple")
    args = pips[0].split()
    assert args[args.index("--index-url") + 1] == index.as_uri()
    assert args[args.index("--extra-index-url") + 1] == "https://mirror.example/simple"
    assert "torch==2.13.0" in args and "cannot be reached" not in proc.stderr
    assert "--index-url" not in pips[1]  # numpy and the rest come from the configured index only


@pytest.mark.skipif(not CPU_WHEEL_PLATFORM, reason="PyTorch's separate CPU wheels are chosen on Linux x86_64/aarch64 and Windows")
def test_an_unreachable_cpu_index_falls_back_to_the_configured_one_and_says_so(checkout):
    repo, venv, run = checkout
    pips, _, proc = run()
    assert "--index-url" not in pips[0] and "torch==2.13.0" in pips[0].split()
    assert "cannot be reached: torch comes from the configured index" in proc.stderr
    assert "WARNING" not in proc.stderr


def test_a_cuda_torch_is_reported_loudly(checkout):
    repo, venv, run = checkout
    proc = run(FAKE_CUDA_TORCH="1")[2]
    assert "WARNING: a CUDA build of torch was installed, with nvidia-cublas-cu12" in proc.stderr
    assert "DPCACHE_TORCH" in proc.stderr


def test_dpcache_torch_is_installed_as_given(checkout, tmp_path):
    repo, venv, run = checkout
    index = tmp_path / "cpu-index"
    (index / "torch").mkdir(parents=True)
    spec = "torch==2.7.1 --index-url https://download.pytorch.org/whl/cu128"
    pips, _, proc = run(DPCACHE_TORCH=spec, DPCACHE_TORCH_INDEX=index.as_uri(), FAKE_CUDA_TORCH="1")
    assert pips[0].endswith(spec) and pips[0].count("--index-url") == 1
    assert "WARNING" not in proc.stderr  # a CUDA build asked for is not a surprise
