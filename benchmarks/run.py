"""``python -m benchmarks.run --suite {ops,connections,model,all} --out DIR [--compare OLD.json] [--smoke]``.

Writes ``DIR/results.json`` (``{"env": ..., "copy_gbps": ..., "rows": [...]}``), ``DIR/results.md`` (tables),
``DIR/summary.md`` (the README's short table) and ``DIR/speedups.png``; with ``--compare`` also
``DIR/compare.md``, printed too. Rows are written as they come and the tables after every suite, so an
interrupted run keeps what it measured (``benchmarks.run.render(Path(DIR))`` re-renders them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import connections, model, ops, report
from ._harness import Settings, copy_bandwidth_gbps, environment

SUITES = ("ops", "connections", "model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--compare", type=Path, help="an earlier results.json to compare with")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 runs, CPU: checks the harness only")
    parser.add_argument("--runs", type=int, help="timed runs per row (default 100; --smoke: 2)")
    parser.add_argument(
        "--compile-connections",
        choices=("headline", "all", "none"),
        default="headline",
        help="which connections also get the compile providers (compiling all takes minutes)",
    )
    parser.add_argument("--models", default="49S,49,96", help="model suite: comma-separated model ids")
    parser.add_argument("--train-batches", default="8,16")
    parser.add_argument("--infer-batches", default="1,8")
    parser.add_argument("--model-providers", default=",".join(model.PROVIDERS))
    parser.add_argument("--model-dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
    parser.add_argument("--compile-max-modes", default="train,infer", help="model modes that get compile-max")
    return parser.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU (must precede their import)
    s = Settings.create(args.smoke, args.runs)
    env = environment(s.device)
    args.out.mkdir(parents=True, exist_ok=True)
    copy_gbps = copy_bandwidth_gbps(s)
    print(f"{env['device']}: device copy {copy_gbps:.0f} GB/s", flush=True)
    suites = SUITES if args.suite == "all" else (args.suite,)
    rows: list[dict] = []
    for suite in suites:
        started = time.perf_counter()
        if suite == "ops":
            produced = ops.run(s, env)
        elif suite == "connections":
            produced = connections.run(s, env, copy_gbps, compile_on=args.compile_connections)
        else:
            produced = model.run(
                s, env, models=tuple(args.models.split(",")), train_batches=_ints(args.train_batches),
                infer_batches=_ints(args.infer_batches), providers=tuple(args.model_providers.split(",")),
                dtypes=tuple(getattr(torch, d) for d in args.model_dtypes.split(",")),
                compile_max_modes=tuple(args.compile_max_modes.split(",")),
            )  # fmt: skip
        for row in produced:
            rows.append(row.as_json())
            status = row.extra.get("error") or f"{row.p50_ms:.3f} ms"
            print(f"{row.bench} | {row.provider} | {row.mode} | {row.dtype} | {row.shape}: {status}", flush=True)
            _write(args.out, env, copy_gbps, rows)
        print(f"suite {suite}: {time.perf_counter() - started:.0f} s", flush=True)
        render(args.out)  # after every suite, so that a run stopped by a time limit keeps its tables
    if args.compare:
        text = report.compare(report.load(args.compare), rows)
        (args.out / "compare.md").write_text(text)
        print(text)
    return rows


def render(out: Path) -> None:
    """results.md, summary.md and speedups.png from ``out/results.json``."""
    rows = report.load(out / "results.json")
    (out / "results.md").write_text(report.markdown(rows))
    (out / "summary.md").write_text(report.summary(rows))
    report.plot(rows, out / "speedups.png")


def _write(out: Path, env: dict, copy_gbps: float, rows: list[dict]) -> None:
    """results.json, rewritten atomically after every row."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"env": env, "copy_gbps": copy_gbps, "rows": rows}, indent=1))
    tmp.replace(out / "results.json")


if __name__ == "__main__":
    main(sys.argv[1:])
