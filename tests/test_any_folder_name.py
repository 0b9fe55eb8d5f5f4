"""The suite passes in a checkout folder of any name, e.g. ComfyUI-DPCache (what git clone, ComfyUI-Manager
and comfy-cli create), which is not a valid Python package name."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = ["tests/test_core_store.py", "tests/test_nodes_definitions.py", "tests/test_core_taylor_runtime.py"]
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "out", "node_modules", "*.egg-info")


def copy_checkout(dest):
    """The files git knows of (tracked or not ignored), else everything but build outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(ROOT, dest, ignore=SKIP)
        return
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def test_pytest_passes_in_a_folder_named_comfyui_dpcache(tmp_path):
    dest = tmp_path / "ComfyUI-DPCache"
    copy_checkout(dest)
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET], cwd=dest,
                          env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "error" not in proc.stdout.splitlines()[-1], tail
