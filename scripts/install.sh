#!/usr/bin/env bash
# Creates .venv (if missing) and installs torch, torchvision, the build tools and spinenet-fast with its extras.
# The C++/CUDA extension is compiled where nvcc is found (or FORCE_CUDA=1 is set), even without a GPU.
# Usage: source scripts/install.sh [EXTRAS]   (EXTRAS defaults to "test": every optional integration too)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1-test}"  # "" installs no extras
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
step() { echo "[install] $*"; }
python -m pip install --quiet --upgrade pip
if python -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and
        torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
    step "torch 2.14.1 and torchvision 0.29.1 already in .venv"
else
    step "torch 2.14.1 + torchvision 0.29.1 (a CUDA build that also runs on the CPU: ~5.6 GB installed, a few" \
        "minutes)"
    python -m pip install --progress-bar on "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install --quiet setuptools wheel ninja
if [ -z "${FORCE_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then
    export FORCE_CUDA=1
fi
if [ "${FORCE_CUDA:-0}" = "1" ]; then
    if [ -z "${CUDA_HOME:-}" ]; then  # nvcc may be a wrapper script outside the toolkit
        if [ -d /usr/local/cuda ]; then
            export CUDA_HOME=/usr/local/cuda
        else
            CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
            export CUDA_HOME
        fi
    fi
    if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # no GPU to ask: compile for Hopper
    fi
    MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    export MAX_JOBS
    echo "building the CUDA extension (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-auto})"
fi
# A stamp per extras and extension choice, newer than every build input: a second run skips the ~2-minute build.
stamp=".venv/.installed-${extras:-base}-cuda${FORCE_CUDA:-0}"
if [ -f "$stamp" ] && [ -z "$(find setup.py pyproject.toml csrc -newer "$stamp" 2>/dev/null)" ]; then
    step "spinenet-fast${extras:+[$extras]} already installed and up to date"
else
    if [ -n "$extras" ]; then
        step "spinenet-fast[$extras] with the integrations the tests use (TensorFlow, ONNX, timm: ~2.7 GB more)"
    else
        step "spinenet-fast"
    fi
    # (setuptools warns about editable installs in general; nothing here to act on)
    PYTHONWARNINGS="ignore:Editable installation" python -m pip install --quiet --no-build-isolation -e ".${extras:+[${extras}]}"
    if [[ ",${extras}," == *",test,"* ]]; then
        # The converter test builds TF Model Garden's RetinaNet-SpineNet; its package pins would replace our
        # dependencies, so it comes without them (the [model-garden] extra has what it imports).
        python -m pip install --quiet --no-deps "tf-models-official==2.20.0"
    fi
    touch "$stamp"
fi
step "done: .venv ready"
