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
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
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
python -m pip install --quiet --no-build-isolation -e ".${extras:+[${extras}]}"
if [[ ",${extras}," == *",test,"* ]]; then
    # The converter test builds TF Model Garden's RetinaNet-SpineNet; its package pins would replace our
    # dependencies, so it comes without them (the [model-garden] extra has what it imports).
    python -m pip install --quiet --no-deps "tf-models-official==2.20.0"
fi
