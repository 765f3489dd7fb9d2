#!/usr/bin/env bash
# Creates .venv (if missing) and installs torch, torchvision, the build tools and spinenet-fast with its extras.
# Usage: source scripts/install.sh [EXTRAS]   (EXTRAS defaults to "test")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet setuptools wheel ninja
python -m pip install --quiet --no-build-isolation -e ".[${extras}]"
