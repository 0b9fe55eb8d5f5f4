#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the pack needs.
# torch goes in first, as the CPU build by default (override with DPCACHE_TORCH, e.g.
# DPCACHE_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"), then numpy and the
# rest of requirements.txt, every later pip call constrained to the torch that is installed, so
# pip never replaces it. torch is never imported here (importing it before numpy is installed
# prints "Failed to initialize NumPy"). When the torch spec, requirements.txt and the extra
# packages are the same as at the last successful run (a stamp in the venv), pip is not run.
# Usage: bash scripts/setup.sh [extra pip packages...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${DPCACHE_VENV:-.venv}"
TORCH="${DPCACHE_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "DPCache needs Python 3.10 or newer; set PYTHON=/path/to/python3.10+" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/dpcache-setup.stamp"
want="$("$PY" - "$TORCH" "$@" <<'EOF'
import hashlib, sys
digest = hashlib.sha256("\n".join(sys.argv[1:]).encode())
with open("requirements.txt", "rb") as f:
    digest.update(f.read())
print(digest.hexdigest())
EOF
)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # nothing changed since the last set-up
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)
installed_torch() {
  "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' 2>/dev/null
}
if [ -n "${DPCACHE_TORCH:-}" ] || ! installed_torch >/dev/null; then
  echo "[setup] installing $TORCH${DPCACHE_TORCH:+ (DPCACHE_TORCH)} ..."
  # shellcheck disable=SC2086
  "${PIP[@]}" $TORCH
fi
constraints="$VENV/torch-constraint.txt"
installed_torch > "$constraints"
"${PIP[@]}" -c "$constraints" -r requirements.txt "$@"
echo "$want" > "$stamp"
