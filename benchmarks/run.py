"""``python -m benchmarks.run --suite {ops,connections,model,all}[,...] --out DIR [--compare OLD.json] [--smoke]``.

``--dry-run`` prints the rows the connection and model suites would measure, without measuring. Writes
``DIR/results.json`` (``{"env": ..., "copy_gbps": ..., "rows": [...]}``), ``DIR/results.md`` (tables),
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
    parser.add_argument("--suite", default="all", help=f"comma-separated: {', '.join(SUITES)}, or all")
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
    parser.add_argument(
        "--connections",
        default=None,
        help="connection suite: comma-separated PARENT-TARGET levels, e.g. 5-3,3-4 (default: all)",
    )
    parser.add_argument("--connection-providers", default=",".join(connections.PROVIDERS))
    parser.add_argument("--connection-modes", default=",".join(connections.MODES))
    parser.add_argument("--connection-dtypes", default=None, help="e.g. bfloat16 (default: bf16, and fp32 for L5→L3)")
    parser.add_argument("--models", default="49S,49,96", help="model suite: comma-separated model ids")
    parser.add_argument("--model-benches", default=",".join(model.BENCHES), help=",".join(model.BENCHES))
    parser.add_argument("--train-batches", default="8,16")
    parser.add_argument("--infer-batches", default="1,8")
    parser.add_argument("--model-providers", default=",".join(model.PROVIDERS))
    parser.add_argument("--model-dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
    parser.add_argument("--compile-max-modes", default="train,infer", help="model modes that get compile-max")
    parser.add_argument("--dry-run", action="store_true", help="print the connection and model rows, run nothing")
    args = parser.parse_args(argv)
    args.suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    unknown = [suite for suite in args.suites if suite not in SUITES]
    if unknown:
        parser.error(f"--suite: unknown {unknown}; choose from {', '.join(SUITES)} or all")
    return args


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def connection_selection(args: argparse.Namespace) -> dict:
    """The connection suite's keyword arguments from the command line."""
    pairs = None
    if args.connections:
        pairs = tuple(tuple(int(level) for level in pair.split("-")) for pair in _names(args.connections))
    dtypes = tuple(getattr(torch, d) for d in _names(args.connection_dtypes)) if args.connection_dtypes else None
    return {"compile_on": args.compile_connections, "pairs": pairs, "providers": _names(args.connection_providers),
            "modes": _names(args.connection_modes), "dtypes": dtypes}  # fmt: skip


def model_selection(args: argparse.Namespace) -> dict:
    """The model suite's keyword arguments from the command line."""
    return {
        "models": _names(args.models), "train_batches": _ints(args.train_batches),
        "infer_batches": _ints(args.infer_batches), "providers": _names(args.model_providers),
        "dtypes": tuple(getattr(torch, d) for d in _names(args.model_dtypes)),
        "compile_max_modes": _names(args.compile_max_modes), "benches": _names(args.model_benches),
    }  # fmt: skip


def print_plan(args: argparse.Namespace) -> int:
    """The rows the connection and model suites would measure (the ops suite: every op × backend × mode)."""
    rows = []
    if "connections" in args.suites:
        rows += [" | ".join(row) for row in connections.plan(args.smoke, **connection_selection(args))]
    if "model" in args.suites:
        for bench, model_id, provider, mode, batch, dtype in model.plan(args.smoke, **model_selection(args)):
            rows.append(f"{bench} {model_id} | {provider} | {mode} b{batch} | {str(dtype).removeprefix('torch.')}")
    compiled = sum(" | compile" in row for row in rows)
    print("\n".join(rows))
    print(f"{len(rows)} rows ({compiled} with torch.compile){'; plus the ops suite' if 'ops' in args.suites else ''}")
    return len(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.dry_run:
        print_plan(args)
        return []
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU (must precede their import)
    s = Settings.create(args.smoke, args.runs)
    env = environment(s.device)
    args.out.mkdir(parents=True, exist_ok=True)
    copy_gbps = copy_bandwidth_gbps(s)
    print(f"{env['device']}: device copy {copy_gbps:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for suite in args.suites:
        started = time.perf_counter()
        if suite == "ops":
            produced = ops.run(s, env)
        elif suite == "connections":
            produced = connections.run(s, env, copy_gbps, **connection_selection(args))
        else:
            produced = model.run(s, env, **model_selection(args))
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
