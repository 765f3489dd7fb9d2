#!/usr/bin/env bash
# A GPU run in two device calls that fit one 15-minute lease (benchmarks/README.md, "On a GPU machine"):
#   call1  build (skipped when this tree's build still imports) + info + correctness smoke + pytest -m gpu
#   call2  the headline benchmark rows (rebuilds only if the build is gone, e.g. on a fresh machine)
# Usage: OUT=/path bash benchmarks/gpu_run.sh call1|call2
#        SPINENET_FAST_DRY_RUN=1 bash benchmarks/gpu_run.sh [call1|call2]   (no GPU needed: prints each call's
#        stages, commands and time caps, and the benchmark rows; runs nothing)
# Every stage runs under a hard `timeout`, capped by what is left of the call's budget (call1 300 s, call2 360 s:
# 11 minutes together), so the call ends, and packs, before the device tool's limit. A failed or stopped stage still packs what it
# wrote. At most 8 files land in $OUT (the tool brings back 8): the key ones, plus rest.tar.gz with the others.
# Wheels the image lacks (pycocotools) are carried in .whl/ (scripts/gpu_wheels.sh) and installed
# with pip --no-index into a folder outside the tree, which a warm machine keeps for the second call.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_out}"
WORK="${GPU_RUN_WORK:-/tmp/spinenet_fast_gpu_run}"
SITE=/tmp/spinenet_fast_site
declare -A BUDGET_S=([call1]=300 [call2]=360)
[[ -n "${CALL_BUDGET_S:-}" ]] && BUDGET_S=([call1]=$CALL_BUDGET_S [call2]=$CALL_BUDGET_S)  # tests of this script
declare -A PACK_RESERVE_S=([call1]=15 [call2]=35)  # call2 renders its tables and chart while packing
REST=100000  # a stage cap meaning "whatever is left of the call"
DRY_RUN="${SPINENET_FAST_DRY_RUN:-0}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# The headline rows (issue 14 / fused_ops.md §6): connections L5→L3 and L3→L4 forward + backward; RetinaNet-49 and
# -49S training step at batch 8 and inference at batch 1; eager, torch.compile and the fused model as it runs
# (fused-auto). Rows with torch.compile come last, so that the cap cuts the slowest rows first.
BENCH_PLAN=(--suite connections,model --connections 5-3,3-4 --connection-modes fwd+bwd --connection-dtypes bfloat16
    --connection-providers eager,fused-auto,compile --compile-connections all
    --models 49,49S --model-benches retinanet --train-batches 8 --infer-batches 1
    --model-providers eager,fused-auto,compile --compile-max-modes none)

started=$SECONDS
dry_elapsed=0  # a dry run assumes every stage takes its whole cap
status=0
stage_lines=()
exec 3>&1  # the dry run's plan lines, whatever a stage's output is redirected to

elapsed() { if [[ "$DRY_RUN" == 1 ]]; then echo "$dry_elapsed"; else echo $((SECONDS - started)); fi; }

# stage NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, what is left of the call) with a hard timeout.
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((${BUDGET_S[$CALL]} - ${PACK_RESERVE_S[$CALL]} - $(elapsed)))
    local own=$cap
    ((cap > left)) && cap=$left
    if [[ "$DRY_RUN" == 1 ]]; then
        local shown=$own
        ((own == REST)) && shown="rest"
        printf '  %-7s cap %4s s (%3s s if every stage before used its whole cap)  %s\n' "$name" "$shown" "$cap" "$*" >&3
        dry_elapsed=$((dry_elapsed + cap))
        return 0
    fi
    if ((cap < 5)); then
        stage_lines+=("$(printf '| %s | %s | skipped: the call budget is spent |' "$name" "$cap")")
        status=1
        return 1
    fi
    echo "== $name (cap ${cap} s)"
    local t0=$SECONDS rc=0
    # A function of this script runs as `bash gpu_run.sh --stage FUNCTION`: timeout runs programs, not functions.
    if declare -F "$1" >/dev/null; then set -- bash "$ROOT/benchmarks/gpu_run.sh" --stage "$@"; fi
    timeout --signal=TERM --kill-after=10 "$cap" "$@" || rc=$?
    local note="exit $rc"
    ((rc == 124 || rc == 137)) && note="stopped at its cap (exit $rc)"
    stage_lines+=("$(printf '| %s | %s | %s | %s |' "$name" "$cap" "$((SECONDS - t0))" "$note")")
    ((rc != 0)) && status=1
    return "$rc"
}

install_wheels() {
    compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/ wheels carried (scripts/gpu_wheels.sh)"; return 0; }
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
}

build() {  # once per machine: an importable extension built from this tree is reused
    if python -c "import spinenet_fast, spinenet_fast._C, sys; sys.exit(spinenet_fast.__file__.startswith('$ROOT') == 0)" \
        2>/dev/null; then
        echo "reusing the build in $ROOT"
        return 0
    fi
    python -m pip install -e . --no-build-isolation --no-deps
}

pytest_gpu() {
    local options=()
    python -c "import xdist" 2>/dev/null && options+=(-n 8)  # Triton compiles dominate: 8 processes, one GPU
    python -c "import pytest_timeout" 2>/dev/null && options+=(--timeout=120)  # a hung test fails, the rest run
    python -m pytest -m gpu -q -rfEs -p no:cacheprovider "${options[@]}" --junitxml="$WORK/pytest_gpu.xml"
}

bench() {
    python -m benchmarks.run "${BENCH_PLAN[@]}" --out "$WORK/bench"
}

render() {  # the tables and chart from the rows written so far (benchmarks.run writes them after each suite)
    [[ -f "$WORK/bench/results.json" ]] || return 0
    timeout 20 python -c "from pathlib import Path; from benchmarks.run import render; render(Path('$WORK/bench'))" \
        >>"$WORK/bench.log" 2>&1
}

# pack FILE...: copy the named files (those that exist) into $OUT, tar every other file of $WORK into
# $OUT/rest.tar.gz, and write $OUT/run.md (the stage table): at most 8 files together.
pack() {
    mkdir -p "$OUT"
    {
        echo "# gpu_run.sh $CALL ($(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
        echo
        echo "| stage | cap (s) | took (s) | result |"
        echo "|---|---:|---:|---|"
        printf '%s\n' "${stage_lines[@]}"
        echo
        echo "call: $((SECONDS - started)) s of a ${BUDGET_S[$CALL]} s budget; status $status"
    } >"$WORK/run.md"
    local kept=("$WORK/run.md")
    for f in "$@"; do [[ -f "$f" ]] && kept+=("$f"); done
    cp "${kept[@]:0:7}" "$OUT/"
    (cd "$WORK" && find . -type f | sort >"$WORK/manifest.txt" && tar -czf "$OUT/rest.tar.gz" .)
    cat "$WORK/run.md"
}

call1() {
    stage wheels 20 install_wheels >>"$WORK/build.log" 2>&1
    stage build 150 build >>"$WORK/build.log" 2>&1 || tail -30 "$WORK/build.log"
    stage info 15 python -m spinenet_fast.info >"$WORK/info.txt" 2>&1
    cat "$WORK/info.txt"
    stage smoke 90 python -m benchmarks.gpu_smoke --out "$WORK" >"$WORK/smoke.log" 2>&1
    tail -3 "$WORK/smoke.log"
    stage pytest "$REST" pytest_gpu >"$WORK/pytest_gpu.log" 2>&1
    tail -15 "$WORK/pytest_gpu.log"
}

call2() {
    stage wheels 20 install_wheels >>"$WORK/build.log" 2>&1
    stage build 150 build >>"$WORK/build.log" 2>&1 || tail -30 "$WORK/build.log"
    stage bench "$REST" bench >"$WORK/bench.log" 2>&1
    tail -5 "$WORK/bench.log"
}

dry_run() {
    local total=0
    for CALL in call1 call2; do
        dry_elapsed=0
        echo "$CALL: budget ${BUDGET_S[$CALL]} s, the last ${PACK_RESERVE_S[$CALL]} s kept for packing;" \
            "device tool timeout_s $((${BUDGET_S[$CALL]} + 30))"
        "$CALL" >/dev/null 2>&1
        total=$((total + ${BUDGET_S[$CALL]}))
    done
    echo "both calls: at most ${total} s ($((total / 60)) min $((total % 60)) s) of device time, plus the machine's start"
    echo
    echo "call2's benchmark rows, in order:"
    python -m benchmarks.run "${BENCH_PLAN[@]}" --out "$WORK/bench" --dry-run
}

CALL="${1:-}"
if [[ "$CALL" == --stage ]]; then  # one stage function, under stage()'s timeout
    shift
    "$@"
    exit
fi
if [[ "$DRY_RUN" == 1 ]]; then
    WORK="$(mktemp -d)"
    dry_run
    exit 0
fi
case "$CALL" in
call1 | call2) ;;
*)
    echo "usage: OUT=DIR bash benchmarks/gpu_run.sh call1|call2 (SPINENET_FAST_DRY_RUN=1: print the plans)" >&2
    exit 2
    ;;
esac
rm -rf "$WORK" && mkdir -p "$WORK"
if [[ "$CALL" == call1 ]]; then
    trap 'pack "$WORK/info.txt" "$WORK/smoke.md" "$WORK/smoke.json" "$WORK/pytest_gpu.log" "$WORK/build.log"' EXIT
    call1
else
    trap 'render; pack "$WORK/bench/results.json" "$WORK/bench/results.md" "$WORK/bench/summary.md" \
        "$WORK/bench/speedups.png" "$WORK/bench.log"; cat "$WORK/bench/summary.md" 2>/dev/null' EXIT
    call2
fi
exit "$status"
