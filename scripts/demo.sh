#!/usr/bin/env bash
# Installs everything into .venv, then runs the demo. Without a visible GPU the demo needs no CUDA extension, so
# none is built (FORCE_CUDA=1 builds it anyway).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! nvidia-smi -L >/dev/null 2>&1; then
    export FORCE_CUDA="${FORCE_CUDA:-0}"
fi
source scripts/install.sh ""
python -m spinenet_fast.demo "$@"
