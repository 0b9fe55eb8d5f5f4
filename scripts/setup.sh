#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the pack needs.
# torch goes in first, as the CPU build by default (override with DPCACHE_TORCH, e.g.
# DPCACHE_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"); every later pip
# call is constrained to the torch that is installed, so pip never replaces it.
# Usage: bash scripts/setup.sh [extra pip packages...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${DPCACHE_VENV:-.venv}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "DPCache needs Python 3.10 or newer; set PYTHON=/path/to/python3.10+" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "[setup] installing ${DPCACHE_TORCH:-torch==2.13.0} (CPU build by default) ..."
  # shellcheck disable=SC2086
  "${PIP[@]}" ${DPCACHE_TORCH:-torch==2.13.0}
fi
constraints="$VENV/torch-constraint.txt"
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"${PIP[@]}" -c "$constraints" -r requirements.txt "$@"
