#!/usr/bin/env bash
# Installs everything into .venv, then runs the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/install.sh ""
python -m spinenet_fast.demo "$@"
