#!/usr/bin/env bash
# Quick start 2: the test suite. The real-ComfyUI tier runs when COMFYUI_PATH points at a ComfyUI
# checkout (and COMFYUI_PYTHON at its Python); otherwise those tests skip and say why.
# The frontend's pure logic runs under Node's test runner when node is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh pytest
PY="${DPCACHE_VENV:-.venv}/bin/python"
status=0
"$PY" -m pytest -q "$@" || status=$?
if command -v node >/dev/null 2>&1 && ls web/tests/*.test.mjs >/dev/null 2>&1; then
  node --test web/tests/ || status=$?
else
  echo "[test] node not found: web/tests skipped"
fi
exit $status
