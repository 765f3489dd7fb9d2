"""``python -m benchmarks.train_throughput --out DIR``: images/s of the training CLI, eager vs the throughput
options (fused ops, ``--amp``, channels_last, ``--cuda-graphs``, ``--compile``), one GPU, one process.

Every variant trains the same model on the same synthetic set (data loading included, as users see it) for
``--epochs`` epochs without evaluation (so no pycocotools is needed); the first is warm-up (Triton compilation,
autotuning, graph capture) and the reported images/s and peak memory are the last epoch's. Writes
``DIR/train_throughput.{json,md}``; a variant that fails becomes a row with its error. ``--smoke`` runs two tiny
CPU variants to check the script.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from pathlib import Path

import torch

from spinenet_fast.data.synthetic import make_synthetic_coco
from spinenet_fast.ops import use_backend
from spinenet_fast.train.__main__ import main as train_main

from ._harness import fused_backend

EAGER = ["--fused", "false", "--channels-last", "false"]
FUSED_AMP_NHWC = ["--fused", "true", "--channels-last", "true", "--amp"]
# name -> extra training arguments; the baseline is plain eager fp32 NCHW.
VARIANTS = {
    "eager fp32": EAGER,
    "eager --amp": [*EAGER, "--amp"],
    "eager --amp channels_last": ["--fused", "false", "--channels-last", "true", "--amp"],
    "fused --amp channels_last": FUSED_AMP_NHWC,
    "fused --amp channels_last --cuda-graphs": [*FUSED_AMP_NHWC, "--cuda-graphs"],
    "fused --amp channels_last --compile": [*FUSED_AMP_NHWC, "--compile"],
}
SMOKE_VARIANTS = {"eager fp32": EAGER, "fused fp32": ["--fused", "true"]}


def run_variant(data: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train one variant; returns the last epoch's ``images_per_s`` / ``max_memory_mb`` / ``loss`` or ``error``."""
    argv = ["--data-path", str(data), "--model", args.model, "--image-size", str(args.image_size),
            "-b", str(args.batch_size), "--epochs", str(args.epochs), "--eval-every", "0",
            "--workers", str(args.workers), "--lr", "0.01", "--output-dir", str(out), "--no-progress",
            "--device", args.device, *extra]  # fmt: skip
    try:
        with use_backend(fused_backend(torch.device(args.device))):
            train_main(argv)
    except Exception as exc:  # reported in the table, the other variants still run
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {k: last[k] for k in ("images_per_s", "max_memory_mb", "loss") if k in last}


def to_markdown(rows: list[dict], setup: str) -> str:
    base = next((r["images_per_s"] for r in rows if r["variant"] == "eager fp32" and "images_per_s" in r), None)
    lines = [setup, "", "| variant | images/s | vs eager fp32 | peak memory (MiB) |", "|---|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | error: {row['error'][:80]} | | |")
            continue
        speedup = f"{row['images_per_s'] / base:.2f}×" if base else ""
        memory = f"{row['max_memory_mb']:.0f}" if "max_memory_mb" in row else ""
        lines.append(f"| {row['variant']} | {row['images_per_s']:.1f} | {speedup} | {memory} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="49S")
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=320, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="the first is warm-up")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    p.add_argument("--smoke", action="store_true", help="two tiny CPU variants: checks the script only")
    args = p.parse_args(argv)
    variants = VARIANTS
    if args.smoke:
        args.model, args.image_size, args.batch_size, args.images, args.epochs = "49XS-custom", 128, 2, 4, 1
        args.workers, args.device, variants = 0, "cpu", SMOKE_VARIANTS
    if args.variants:
        variants = {name: variants[name] for name in args.variants.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    setup = (
        f"SpineNet-{args.model} RetinaNet, {args.image_size} px, batch {args.batch_size}, {args.images} synthetic "
        f"images per epoch, {args.workers} workers, last of {args.epochs} epochs, {args.device}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_coco(Path(tmp) / "data", num_train=args.images, num_val=2,
                                   image_size=args.image_size, seed=0)  # fmt: skip
        for i, (name, extra) in enumerate(variants.items()):
            rows.append({"variant": name, "args": extra, **run_variant(data, Path(tmp) / f"run{i}", args, extra)})
            print(json.dumps(rows[-1]), flush=True)
            # Written after every variant: a run stopped by a time limit keeps what it measured.
            (args.out / "train_throughput.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
            (args.out / "train_throughput.md").write_text(to_markdown(rows, setup))
    return rows


if __name__ == "__main__":
    main()
