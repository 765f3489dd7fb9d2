#!/usr/bin/env bash
# The oldest versions the README promises (torch 2.6 with its triton 3.2, torchvision 0.21, numpy < 2.3) in their
# own .venv-oldest: installs them and the package (no extension: the tree's build is for the newest torch) and runs
# the op, main model, detection and data tests, which cover every custom-op schema and Triton kernel (under the
# interpreter). Extra arguments go to pytest. Called by .ci/run after the main suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv-oldest/bin/python ]; then
    python3 -m venv .venv-oldest
fi
py=.venv-oldest/bin/python
$py -m pip install --quiet --upgrade pip
$py -m pip install --quiet "torch==2.6.0" "torchvision==0.21.0" "numpy<2.3" pytest pytest-xdist tqdm matplotlib \
    pillow setuptools wheel
FORCE_CUDA=0 $py -m pip install --quiet --no-build-isolation --no-deps -e .
# Every op test (custom-op schemas, opcheck, the Triton kernels under triton 3.2's interpreter), the eager and fused
# models' main tests, detection and data: what an older torch or triton could break.
env -u FORCE_CUDA -u SPINENET_FAST_REQUIRE_OPTIONAL $py -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 \
    -m "not slow" tests/ops tests/models/test_spinenet.py tests/models/test_fused_spinenet.py tests/detection \
    tests/data "$@"
