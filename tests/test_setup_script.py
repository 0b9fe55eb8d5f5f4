"""scripts/setup.sh with a stand-in venv whose pip only records what it is asked to install.

The stand-in python runs the real interpreter without its site-packages (-S), so torch looks
absent until the fake pip "installs" it (a dist-info folder on PYTHONPATH, no torch module).
"""
import os
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
        printf 'Metadata-Version: 2.1\\nName: torch\\nVersion: %s\\n' "$v" > "$SITE/torch-$v.dist-info/METADATA";;
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
        full_env = {k: v for k, v in os.environ.items() if k != "DPCACHE_TORCH"}
        full_env.update(DPCACHE_VENV=str(venv), **env)
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
