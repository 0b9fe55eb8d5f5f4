#!/usr/bin/env bash
# Quick start 1: calibrate -> schedule -> accelerated sampling on the built-in model (CPU is fine).
# Arguments go to the demo: bash scripts/demo.sh --keys 9 --steps 50
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${DPCACHE_VENV:-.venv}/bin/python" -m dpcache_demo.demo "$@"
