"""The Hopper compile check (``python -m benchmarks.compile_sm90``): every Triton kernel variant the launchers
launch compiles for sm_90 without register spills, and the check fails on a planted compile error, a planted
spill and a kernel that nothing launches. Each runs in a subprocess: this test process imported the kernels
under the CPU interpreter, and the check needs them as real ``JITFunction``s."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ..conftest import child_env

ROOT = Path(__file__).resolve().parents[2]


def run_without_interpreter(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = child_env(without=("TRITON_INTERPRET",))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(cwd), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90_without_spills(tmp_path):
    """All ~1000 variants (~10 minutes on 2 cores): before landing a kernel change."""
    check_compile_report(tmp_path, [])


@pytest.mark.heavy
def test_the_largest_variant_of_each_kernel_and_dtype_compiles_for_sm90_without_spills(tmp_path):
    """CI's check (~1 minute): per kernel and set of pointer dtypes, the variant with the largest tiles."""
    check_compile_report(tmp_path, ["--sample"])


def check_compile_report(tmp_path, extra: list[str]) -> None:
    jobs = ["--jobs", str(torch.get_num_threads())]  # this worker's share of the cores
    result = run_without_interpreter(["-m", "benchmarks.compile_sm90", "--out", str(tmp_path), *jobs, *extra], ROOT)
    report = json.loads((tmp_path / "compile_sm90.json").read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["problems"] == [] and report["unlaunched"] == []
    variants = report["variants"]
    kernels = {v["kernel"].split(":")[1] for v in variants}
    assert {
        "_conv1x1_fwd_kernel",
        "_conv1x1_backward_kernel",
        "_conv1x1_pair_backward_kernel",
        "_conv3x3_fwd_kernel",
        "_merge_fwd_kernel",
        "_merge_bwd_kernel",
        "_bn_finalize_kernel",
        "_bn_finalize_bwd_kernel",
        "_conv3x3_backward_kernel",
        "_depthwise3x3_fwd_kernel",
        "_depthwise3x3_backward_kernel",
        "_retinanet_loss_kernel",
        "_best_per_gt_kernel",
        "_match_kernel",
        "_expand_stats_kernel",
        "_expand_merge_fwd_kernel",
        "_expand_merge_k1_kernel",
        "_expand_k2_kernel",
    } <= kernels
    assert all(v["registers"] and v["spill_stores"] == 0 and v["spill_loads"] == 0 for v in variants)
    # Hopper's tensor cores for every half-precision GEMM; the fp32 path is IEEE (no TF32), so no wgmma there.
    gemms = [v for v in variants if "conv" in v["kernel"]]
    assert all(v["wgmma"] == (not v["constexprs"]["FP32_DOT"]) for v in gemms)
    assert {d for v in gemms for d in v["pointer_dtypes"]} >= {"*fp32", "*bf16", "*fp16"}
    assert "| _merge_bwd_kernel |" in (tmp_path / "compile_sm90.md").read_text()


PLANTED = """
import torch
import triton
import triton.language as tl


@triton.jit
def _square(x):
    return x * x


@triton.jit
def hungry_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    a = tl.load(x_ptr + offsets)
    tl.store(y_ptr + offsets, _square(tl.dot(a, a, input_precision="ieee")))


@triton.jit
def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + not_defined_anywhere)


@triton.jit
def forgotten_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


def drive():
    x = torch.zeros(64, 64)
    hungry_kernel[(1,)](x, x, BLOCK=64, num_warps=4, maxnreg=32)  # 32 registers cannot hold a 64×64 dot
    broken_kernel[(1,)](x, BLOCK=64)
"""

CHECK = """
import json, sys
from pathlib import Path
import planted
from benchmarks.compile_sm90 import check_kernels
since = [Path(sys.argv[2])] if len(sys.argv) > 2 else []
problems = check_kernels(["planted"], [("planted", planted.drive)], Path(sys.argv[1]), jobs=2, since=since)
print("PROBLEMS=" + json.dumps(problems))
"""


def test_check_fails_on_a_compile_error_a_spill_and_an_unlaunched_kernel(tmp_path):
    (tmp_path / "planted.py").write_text(textwrap.dedent(PLANTED))
    result = run_without_interpreter(["-c", CHECK, str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout.split("PROBLEMS=")[1])
    assert len(problems) == 3, problems
    assert any(p.startswith("planted:broken_kernel") and "compile error" in p for p in problems)
    assert any(p.startswith("planted:hungry_kernel") and "bytes spill stores" in p for p in problems)
    assert any(p.startswith("planted:forgotten_kernel") and "no driver launches" in p for p in problems)
    markdown = (tmp_path / "out" / "compile_sm90.md").read_text()
    assert "## Problems" in markdown and "_square" not in markdown  # a device helper is neither launched nor a miss
    # --since: against that table nothing is new; the unlaunched kernel is still reported.
    table = tmp_path / "out" / "compile_sm90.json"
    result = run_without_interpreter(["-c", CHECK, str(tmp_path / "again"), str(table)], tmp_path)
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout.split("PROBLEMS=")[1])
    assert len(problems) == 1 and "no driver launches" in problems[0], problems
    report = json.loads((tmp_path / "again" / "compile_sm90.json").read_text())
    assert report["variants"] == [] and report["env"]["recorded"] == 2
