#!/usr/bin/env bash
# Downloads, on a machine with a package registry, the wheels that the GPU machine's image lacks, into .whl/
# (ignored by git), for the device tool to carry: `carry: [".whl"]`. benchmarks/gpu_run.sh installs them there
# with `pip install --no-index --no-deps --target`. The image: Python 3.12, torch 2.11, triton 3.6,
# torchvision 0.26, numpy 2.5, pytest, pytest-xdist, matplotlib, tqdm, pillow — but no pycocotools (COCO
# evaluation: the GPU tests and benchmarks do not need it, the evaluation tests and the demo do). No
# dependencies are fetched: the image has what it needs (numpy).
# Usage: bash scripts/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python_version="${1:-3.12}"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d .whl "pycocotools>=2.0.7"
ls -l .whl
