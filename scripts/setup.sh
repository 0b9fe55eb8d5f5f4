#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the pack needs.
# torch goes in first, as the CPU build by default. On Linux (x86_64, aarch64) and Windows, where a
# plain package index serves the multi-GB CUDA build, torch==2.13.0 comes from PyTorch's CPU wheel
# index (DPCACHE_TORCH_INDEX, default https://download.pytorch.org/whl/cpu), with the configured index
# as an extra one for its dependencies. When the CPU index cannot be reached, torch comes from the
# configured index and the script says so (a local mirror may serve a +cpu build). macOS wheels are
# CPU builds already. After installing torch it checks that no nvidia-* packages came in, and says so
# loudly if they did. DPCACHE_TORCH overrides all of this, e.g.
# DPCACHE_TORCH="torch --index-url https://download.pytorch.org/whl/cu128" for a CUDA build.
# Then numpy and the rest of requirements.txt, every later pip call constrained to the torch that is
# installed, so pip never replaces it. torch is never imported here (importing it before numpy is
# installed prints "Failed to initialize NumPy"). When the torch spec, requirements.txt and the extra
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
has_cpu_wheels() {  # platforms where PyTorch publishes CPU wheels apart from the default CUDA ones
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64|Linux-aarch64|MINGW*|MSYS*|CYGWIN*) return 0;;
    *) return 1;;
  esac
}
reachable() {  # 5 s at most: an index that cannot be reached is skipped, not retried for minutes
  "$PY" -c 'import os, sys, urllib.parse, urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
if url.startswith("file:"):  # a local index is a folder
    sys.exit(not os.path.isdir(urllib.request.url2pathname(urllib.parse.urlparse(url).path)))
urllib.request.urlopen(url, timeout=5).close()' "$1" >/dev/null 2>&1
}
torch_source() {  # the pip arguments that choose where torch comes from (URLs hold no spaces)
  if [ -n "${DPCACHE_TORCH:-}" ] || ! has_cpu_wheels; then
    return 0
  fi
  local cpu_index="${DPCACHE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" default_index
  if reachable "$cpu_index"; then
    default_index="${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || true)}"
    echo "--index-url $cpu_index --extra-index-url ${default_index:-https://pypi.org/simple}"
  else
    echo "[setup] the CPU wheel index $cpu_index cannot be reached: torch comes from the configured" \
         "index (a CPU build only where that index serves one; checked below)" >&2
  fi
}
nvidia_packages() {
  "$PY" -c 'import importlib.metadata as m
names = {d.metadata["Name"] or "" for d in m.distributions()}
print(" ".join(sorted(n for n in names if n.lower().startswith("nvidia-"))))'
}
if [ -n "${DPCACHE_TORCH:-}" ] || ! installed_torch >/dev/null; then
  source_args="$(torch_source)"
  echo "[setup] installing $TORCH${DPCACHE_TORCH:+ (DPCACHE_TORCH)}${source_args:+ (CPU build: $source_args)} ..."
  # shellcheck disable=SC2086
  "${PIP[@]}" $source_args $TORCH
  nvidia="$(nvidia_packages)"
  if [ -n "$nvidia" ] && [ -z "${DPCACHE_TORCH:-}" ]; then
    {
      echo "[setup] ************************************************************************"
      echo "[setup] WARNING: a CUDA build of torch was installed, with $nvidia (several GB)."
      echo "[setup] The pack runs on it, but the CPU build was meant. For it, remove $VENV and run again"
      echo "[setup] where https://download.pytorch.org/whl/cpu can be reached, or set DPCACHE_TORCH,"
      echo "[setup] e.g. DPCACHE_TORCH='torch==2.13.0+cpu --index-url <an index with CPU wheels>'."
      echo "[setup] ************************************************************************"
    } >&2
  fi
fi
constraints="$VENV/torch-constraint.txt"
installed_torch > "$constraints"
"${PIP[@]}" -c "$constraints" -r requirements.txt "$@"
echo "$want" > "$stamp"
