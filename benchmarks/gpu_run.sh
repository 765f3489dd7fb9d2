#!/usr/bin/env bash
# One scripted GPU run: build the package and the CUDA extension (no package registry needed), run the GPU
# tests, the training-throughput variants, then every benchmark suite, writing under $OUT (default: ./gpu_out):
#   build.log  info.txt  pytest_gpu.log  train.log  bench.log
#   bench/{results.json,results.md,summary.md,speedups.png,train_throughput.json,train_throughput.md}
# Usage: OUT=/path bash benchmarks/gpu_run.sh [build,test,train,bench]   (stages, comma-separated; default all)
# The benchmark plan fits about 8 minutes on an H100; widen it with BENCH_ARGS (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
stages="${1:-build,test,train,bench}"
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi
status=0
if [[ "$stages" == *build* ]]; then
    # --no-deps: torch, triton, torchvision and the rest come with the image. A visible GPU builds the extension.
    python -m pip install -e . --no-build-isolation --no-deps >"$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }
fi
python -m spinenet_fast.info >"$OUT/info.txt" 2>&1
cat "$OUT/info.txt"
if [[ "$stages" == *test* ]]; then
    timeout 300 python -m pytest -m gpu -q -x -p no:cacheprovider >"$OUT/pytest_gpu.log" 2>&1 || status=1
    tail -15 "$OUT/pytest_gpu.log"
fi
if [[ "$stages" == *train* ]]; then
    # The training CLI's images/s: eager fp32 vs --amp, channels_last, fused, --cuda-graphs, --compile.
    timeout 300 python -m benchmarks.train_throughput --out "$OUT/bench" ${TRAIN_ARGS:-} >"$OUT/train.log" 2>&1 \
        || status=1
    cat "$OUT/bench/train_throughput.md" 2>/dev/null
fi
if [[ "$stages" == *bench* ]]; then
    # shellcheck disable=SC2086
    timeout 420 python -m benchmarks.run --suite all --out "$OUT/bench" \
        --models 49S,49 --train-batches 8 --infer-batches 1,8 --compile-max-modes infer \
        ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 || status=1
    python -c "from pathlib import Path; from benchmarks.run import render; render(Path('$OUT/bench'))" || status=1
    tail -5 "$OUT/bench.log"
    cat "$OUT/bench/summary.md" 2>/dev/null
fi
exit "$status"
