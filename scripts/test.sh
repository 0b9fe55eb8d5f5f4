#!/usr/bin/env bash
# Quick start 2: the test suite.
# - CPU tier (pytest in .venv): the algorithm, the nodes against fakes of ComfyUI's patch contracts,
#   the workflows against the node definitions, the demo. Tests that need ComfyUI skip and say why.
# - Frontend logic under Node's test runner, when node is installed.
# - Real-ComfyUI tier, when COMFYUI_PATH points at a ComfyUI checkout and COMFYUI_PYTHON at the
#   Python that runs it (with pytest installed): tests/comfy, the workflows run on the host, and
#   the headless-Chromium tier (which also needs chromium and playwright-core on NODE_PATH).
# Extra arguments go to the CPU tier's pytest. The last line sums up every tier.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh pytest
PY="${DPCACHE_VENV:-.venv}/bin/python"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
summary=()
counts() {  # pytest's closing counts ("12 passed, 3 skipped"), from the log of one tier
  grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected|xfailed|xpassed)|no tests ran' "$log" | tail -n 1 \
    | sed -E 's/^=+ //; s/ =+$//; s/ in [0-9.]+s.*$//'
}
verdict() { if [ "$1" -eq 0 ]; then echo ok; else echo FAILED; fi; }

# The CPU tier runs without COMFYUI_PATH; when it is set, its tests skip here because they run below.
cpu_env=(env)
if [ -n "${COMFYUI_PATH:-}" ]; then
  cpu_env=(env -u COMFYUI_PATH DPCACHE_REAL_TIER_SEPARATE=1)
fi
rc=0
"${cpu_env[@]}" "$PY" -m pytest -q -rs "$@" 2>&1 | tee "$log" || rc=$?
[ "$rc" -eq 0 ] || status=1
summary+=("CPU tier: $(counts), $(verdict "$rc")")

if command -v node >/dev/null 2>&1; then
  rc=0
  node --test web/tests/ 2>&1 | tee "$log" || rc=$?
  [ "$rc" -eq 0 ] || status=1
  pass="$(sed -nE 's/^# pass ([0-9]+).*/\1/p' "$log" | tail -n 1)"
  fail="$(sed -nE 's/^# fail ([0-9]+).*/\1/p' "$log" | tail -n 1)"
  summary+=("frontend: ${pass:-0} passed, ${fail:-0} failed, $(verdict "$rc")")
else
  echo "[test] node not found: the frontend logic tests (web/tests) were not run"
  summary+=("frontend: not run (node not found)")
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  summary+=("real-ComfyUI tier: not run (set COMFYUI_PATH and COMFYUI_PYTHON)")
elif [ -z "${COMFYUI_PYTHON:-}" ]; then
  echo "[test] COMFYUI_PATH is set but COMFYUI_PYTHON is not: set it to the Python that runs that ComfyUI" >&2
  status=1
  summary+=("real-ComfyUI tier: FAILED (COMFYUI_PYTHON is not set)")
else
  rc=0
  "$COMFYUI_PYTHON" -m pytest -q -rs -s tests/comfy tests/test_workflows.py tests/browser 2>&1 | tee "$log" || rc=$?
  [ "$rc" -eq 0 ] || status=1
  summary+=("real-ComfyUI tier: $(counts), $(verdict "$rc")")
fi
joined="$(printf ' | %s' "${summary[@]}")"
echo "[test] summary: ${joined:3}"
exit $status
