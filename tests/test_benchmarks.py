"""The benchmark harness cannot rot: ``python -m benchmarks.run --smoke`` runs every suite on tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_smoke, report
from benchmarks.run import main
from spinenet_fast import _extension

from .conftest import child_env

ROW_FIELDS = {"bench", "provider", "mode", "dtype", "shape", "p50_ms", "p20_ms", "p80_ms", "peak_mb", "kernels",
              "device", "torch", "triton", "git_sha", "date"}  # fmt: skip


# One test for the smoke run (~1-3 minutes on 2 cores), started first: under pytest-xdist a module fixture shared by
# two tests runs once per worker that gets one of them.
@pytest.mark.heavy
def test_smoke_run_writes_every_suites_rows_reports_and_charts(tmp_path):
    main(["--suite", "all", "--out", str(tmp_path), "--smoke"])
    results = json.loads((tmp_path / "results.json").read_text())
    check_rows(results)
    check_reports_charts_and_compare(tmp_path, results)


def check_rows(results: dict) -> None:
    rows = results["rows"]
    assert results["copy_gbps"] > 0
    assert all(row.keys() >= ROW_FIELDS for row in rows)
    providers = {(row["bench"].split(" ")[0], row["provider"]) for row in rows}
    assert {("op", p) for p in ("eager", "compile", "reference", "triton", "cuda")} <= providers
    assert {("connection", p) for p in ("eager", "compile", "fused-auto", "fused-triton", "fused-cuda")} <= providers
    assert {("backbone", "eager"), ("backbone", "fused-auto"), ("retinanet", "torchvision-r50fpn")} <= providers
    assert {("classifier", "eager"), ("classifier", "fused-auto")} <= providers
    assert ("maskrcnn", "eager") in providers  # smoke: eager only (fused-auto and torchvision's in full runs)
    assert {row["mode"] for row in rows} == {"fwd", "bwd", "fwd+bwd", "train", "infer"}
    conv3x3 = {(row["shape"], row["provider"]) for row in rows if row["bench"] == "op conv3x3_bn_stats"}
    assert {p for shape, p in conv3x3 if "stride 1" in shape} >= {"eager", "triton", "cuda"}  # the blocks' 3×3
    ops = {row["bench"].removeprefix("op ") for row in rows if row["provider"] == "triton"}
    assert {"conv1x1_bn", "conv1x1_bn_pair", "conv3x3_bn", "pooled_conv1x1_bn", "expand_merge"} <= ops
    needs_extension = {"cuda", "fused-cuda"}
    for row in rows:
        if _extension.extension is None and row["provider"] in needs_extension:
            continue
        assert "error" not in row, row
        assert row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["kernels"] > 0 or row["mode"] == "bwd"
    timed = [row for row in rows if row.get("p50_ms")]
    assert all(row["images_per_s"] > 0 for row in timed if row["mode"] in ("train", "infer"))
    assert all(row["gbps"] > 0 for row in timed if row["bench"].startswith("connection"))


def test_full_plan_has_every_mask_rcnn_provider():
    from benchmarks.model import plan

    providers = {case[2] for case in plan(False, benches=("maskrcnn",))}
    assert {"eager", "compile", "fused-auto", "torchvision-r50fpn"} <= providers


def check_reports_charts_and_compare(out, results: dict) -> None:
    table = (out / "results.md").read_text()
    assert "## op" in table and "## connection" in table and "## retinanet" in table
    assert "fused vs eager" in table
    assert (out / "summary.md").read_text().startswith("| bench |")
    assert (out / "speedups.png").read_bytes()[:4] == b"\x89PNG"
    comparison = report.compare(results["rows"], results["rows"])
    assert comparison.count("| 1.00 |") == sum(1 for r in results["rows"] if r.get("p50_ms"))


def test_speedups_name_the_slower_side():
    rows = {"eager": {"p50_ms": 1.0}, "compile": {"p50_ms": 0.5}, "fused-triton": {"p50_ms": 0.8},
            "fused-cuda": {"p50_ms": 2.0}}  # fmt: skip
    up = report.speedups(rows)
    assert up["fused"] == "fused-triton"
    assert up["vs_eager"] == pytest.approx(1.25) and up["vs_compile"] == pytest.approx(0.625)
    # What the model runs is the headline, even where a forced backend was faster.
    assert report.speedups({**rows, "fused-auto": {"p50_ms": 0.9}})["fused"] == "fused-auto"
    assert report._ratio(up["vs_compile"]) == "0.62× (slower)"


def test_train_throughput_smoke(tmp_path):
    from benchmarks.train_throughput import main as throughput_main

    rows = throughput_main(["--out", str(tmp_path), "--smoke"])
    assert [row["variant"] for row in rows] == ["eager fp32", "fused fp32"]
    assert all("error" not in row and row["images_per_s"] > 0 for row in rows), rows
    table = (tmp_path / "train_throughput.md").read_text()
    assert "| fused fp32 |" in table and "1.00×" in table
    assert json.loads((tmp_path / "train_throughput.json").read_text())["rows"] == rows


ROOT = Path(__file__).resolve().parents[1]


def test_gpu_run_dry_run_walks_both_calls_within_the_lease():
    """The GPU run's plan, printed without a GPU: both calls' stages with hard caps, 11 minutes together, and the
    headline benchmark rows (no row with torch.compile before the last row without it)."""
    env = child_env(SPINENET_FAST_DRY_RUN="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=True)  # fmt: skip
    out = result.stdout
    assert "call1: budget 300 s" in out and "call2: budget 360 s" in out
    assert "both calls: at most 660 s (11 min 0 s)" in out
    for stage in ("wheels", "build", "info", "smoke", "pytest", "bench"):
        assert f"  {stage} " in out
    rows = out.split("call2's benchmark rows, in order:\n")[1].splitlines()
    rows = [r for r in rows if " | " in r]
    assert any(r.startswith("connection L5(1024)->L3(512)") and "| fused-auto |" in r for r in rows)
    assert any(r.startswith("connection L3(512)->L4(1024) down") for r in rows)
    assert {"retinanet 49 | fused-auto | train b8", "retinanet 49S | eager | infer b1"} <= {
        r.rsplit(" | ", 1)[0] for r in rows
    }
    models = [r for r in rows if r.startswith("retinanet")]
    first_compiled = next(i for i, r in enumerate(models) if "| compile |" in r)
    assert all("| compile |" in r for r in models[first_compiled:])


@pytest.mark.slow
def test_gpu_smoke_runs_every_op_backend_and_the_model(tmp_path):
    """The GPU run's correctness smoke, on tiny shapes under the CPU interpreter: a row per op × backend × dtype
    and per model dtype, and the tolerance rule holds."""
    assert gpu_smoke.main(["--out", str(tmp_path), "--tiny", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    checks = {(r["check"].split(" ")[1], r["backend"], r["dtype"]) for r in rows if r["check"].startswith("op ")}
    assert ("conv3x3_bn_stats", "triton", "bfloat16") in checks and ("merge", "cuda", "float16") in checks
    assert ("retinanet_loss", "triton", "bfloat16") in checks
    assert {("expand_merge", "triton", "bfloat16"), ("pooled_conv1x1_bn", "triton", "float16")} <= checks
    assert len({r["dtype"] for r in rows if r["check"].startswith("model ")}) == 3
    assert "| yes |" in (tmp_path / "smoke.md").read_text()
