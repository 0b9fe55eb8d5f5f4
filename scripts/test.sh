#!/usr/bin/env bash
# Quick start 2: the test suite.
# - CPU tier (pytest in .venv): the algorithm, the nodes against fakes of ComfyUI's patch contracts,
#   the workflows against the node definitions, the demo. Tests that need ComfyUI skip and say why.
# - Frontend logic under Node's test runner, when node is installed.
# - Real-ComfyUI tier, when COMFYUI_PATH points at a ComfyUI checkout and COMFYUI_PYTHON at the
#   Python that runs it (with pytest installed): tests/comfy, the workflows run on the host, and
#   the headless-Chromium tier (which also needs chromium and playwright-core on NODE_PATH).
# Extra arguments go to the CPU tier's pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh pytest
PY="${DPCACHE_VENV:-.venv}/bin/python"
status=0
env -u COMFYUI_PATH "$PY" -m pytest -q -rs "$@" || status=$?
if command -v node >/dev/null 2>&1; then
  node --test web/tests/ || status=$?
else
  echo "[test] node not found: the frontend logic tests (web/tests) were not run"
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
  if [ -z "${COMFYUI_PYTHON:-}" ]; then
    echo "[test] COMFYUI_PATH is set but COMFYUI_PYTHON is not: set it to the Python that runs that ComfyUI" >&2
    status=1
  else
    "$COMFYUI_PYTHON" -m pytest -q -rs -s tests/comfy tests/test_workflows.py tests/browser || status=$?
  fi
fi
exit $status
