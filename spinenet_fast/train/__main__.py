"""``python -m spinenet_fast.train``: train (and evaluate) a RetinaNet-SpineNet (``--task box``, the default) or a
Mask R-CNN-SpineNet (``--task mask``: box and mask AP) on a COCO-format dataset.

Single process: ``python -m spinenet_fast.train --data-path DIR --model 49S -b 16 --epochs 10``;
many GPUs: ``torchrun --nproc_per_node=N -m spinenet_fast.train ... [--sync-bn]`` (elastic: add
``--max-restarts=K`` to torchrun and ``--resume auto`` here, and a killed worker resumes from the last checkpoint).
Data layout: ``DIR/{train,val}2017/`` images and ``DIR/annotations/instances_{train,val}2017.json``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..data import CocoDetectionDataset, LabelMap, collate, eval_transforms, train_transforms
from ..detection.presets import MODEL_NAMES, TASKS, detector_from_args, label_offset
from ..eval.coco_eval import format_stats
from .checkpoint import load_checkpoint, read_jsonl_rows, remove_stale_temporaries, save_atomic, write_jsonl_atomic
from .cuda_graphs import graph_detector
from .engine import ShardSampler, TrainingDiverged, distributed_init, evaluate, param_groups, train_one_epoch
from .plot import plot_metrics
from .schedule import default_warmup_steps, lr_factor, scaled_lr


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", type=Path, required=True, help="dataset root (COCO 2017 layout)")
    p.add_argument("--train-split", default="train2017")
    p.add_argument("--val-split", default="val2017")
    p.add_argument("--task", default="box", choices=list(TASKS),
                   help="box: RetinaNet; mask: Mask R-CNN (masks from the annotations' segmentation)")  # fmt: skip
    p.add_argument("--model", default="49S", choices=MODEL_NAMES)
    p.add_argument("--image-size", type=int, default=640, help="square training size, a multiple of 128")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), help="scale jitter range")
    p.add_argument("--activation", default=None, choices=("swish", "relu"),
                   help="default: the task's official one (box: swish, mask: relu)")  # fmt: skip
    p.add_argument("--bn-momentum", type=float, default=0.01, help="PyTorch BN momentum (official: 0.01)")
    p.add_argument("--fused", default="auto", choices=("auto", "true", "false"),
                   help="fused connections, blocks, head and loss (auto: on a GPU with Triton)")  # fmt: skip
    p.add_argument("--stochastic-depth-rate", type=float, default=None,
                   help="default: the task's official one (box: 0.2, protocol C; mask: 0)")  # fmt: skip
    p.add_argument("-b", "--batch-size", type=int, default=8, help="images per process and batch")
    p.add_argument("--accum-steps", type=int, default=1, help="batches per optimiser step (gradient accumulation)")
    p.add_argument("--sync-bn", action="store_true",
                   help="nn.SyncBatchNorm across processes (the fused ops all-reduce their statistics)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="peak LR; default 0.28 × global batch / 256")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 2000 × 256 / global batch, ≤ 10%%")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=4e-5)
    p.add_argument("--clip-norm", type=float, default=10.0)
    p.add_argument("--max-loss", type=float, default=1e4,
                   help="a batch loss above this (or not finite) stops training as diverged")  # fmt: skip
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 autocast by default)")
    p.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every N epochs and after the last; 0: never (throughput runs)")  # fmt: skip
    p.add_argument("--output-dir", type=Path, default=Path("runs/train"))
    p.add_argument("--resume", type=Path, default=None,
                   help="checkpoint to continue from; 'auto': OUTPUT_DIR/checkpoint.pth if it exists")  # fmt: skip
    p.add_argument("--test-only", action="store_true", help="only evaluate the --resume checkpoint")
    p.add_argument("--channels-last", default="auto", choices=("auto", "true", "false"),
                   help="NHWC model and activations (auto: on a GPU)")  # fmt: skip
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training model (default backend: inductor)")  # fmt: skip
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the backbone's and head's training forward/backward from CUDA graphs")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (pinned memory on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def args_to_dict(args: argparse.Namespace) -> dict:
    """Plain JSON-like values only, so that checkpoints load with ``weights_only=True``."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}


def check_hyperparameters(args: argparse.Namespace) -> None:
    """``ValueError`` naming the flag for a value no training can use (NaN, infinite, out of range)."""
    ranges = {  # flag: (value, low, high, low included); None: not given
        "--lr": (args.lr, 0.0, math.inf, False),
        "--momentum": (args.momentum, 0.0, 1.0, True),
        "--weight-decay": (args.weight_decay, 0.0, math.inf, True),
        "--clip-norm": (args.clip_norm, 0.0, math.inf, False),
        "--max-loss": (args.max_loss, 0.0, math.inf, False),
        "--bn-momentum": (args.bn_momentum, 0.0, 1.0, False),
        "--stochastic-depth-rate": (args.stochastic_depth_rate, 0.0, 1.0, True),
    }
    for flag, (value, low, high, low_included) in ranges.items():
        if value is None:
            continue
        above_low = value >= low if low_included else value > low
        if not (math.isfinite(value) and above_low and value <= high and (flag != "--momentum" or value < high)):
            bounds = f"{'[' if low_included else '('}{low:g}, {high:g}{')' if flag == '--momentum' else ']'}"
            raise ValueError(f"{flag} must be a finite number in {bounds}, got {value}")
    low, high = args.scale_range
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f"--scale-range must be two finite numbers 0 < MIN <= MAX, got {low} {high}")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 1),
                               ("--workers", args.workers, 0), ("--warmup-steps", args.warmup_steps, 0)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{flag} must be an int >= {least}, got {value}")


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``--output-dir`` and prove it writable now, not after an epoch; remove the temporary files a killed
    checkpoint or metrics write left there."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--output-dir {output_dir} is not a writable directory: {exc}") from exc
    for name in ("checkpoint.pth", "metrics.jsonl"):
        for stale in remove_stale_temporaries(output_dir / name):
            print(f"removed {stale}, left by an interrupted write", flush=True)


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating parameters and buffers holding a NaN or an infinity."""
    state = model.state_dict()
    floating = [(name, t) for name, t in state.items() if t.is_floating_point()]
    finite = torch.stack([t.isfinite().all() for _, t in floating]).tolist() if floating else []
    return [name for (name, _), ok in zip(floating, finite) if not ok]


def describe_run(args: argparse.Namespace, model: nn.Module, train_set, val_set, world_size: int) -> str:
    """One paragraph saying what is about to be trained, on what, where, and where it lands."""
    label_map = train_set.label_map
    names = ", ".join(label_map.names[:5]) + (", ..." if len(label_map) > 5 else "")
    parameters = sum(p.numel() for p in model.parameters())
    fused = any(m.uses_fused_ops() for m in model.modules() if hasattr(m, "uses_fused_ops"))
    processes = f" x {world_size} processes" if world_size > 1 else ""
    evaluation = f"every {args.eval_every} epoch(s) on {len(val_set)} {args.val_split} images"
    parts = "connections and loss" if args.task == "box" else "connections"  # Mask R-CNN's heads are eager
    return (
        f"training {TASKS[args.task][1]}-SpineNet-{args.model} ({parameters / 1e6:.2f} M parameters, fused {parts} "
        f"{'on' if fused else 'off'}) to detect {len(label_map)} classes ({names})\n"
        f"  data: {len(train_set)} {args.train_split} images from {args.data_path.resolve()}, {args.image_size} px, "
        f"batch {args.batch_size}{processes}, {args.epochs} epochs on {args.device}; evaluation: "
        f"{evaluation if args.eval_every else 'never'}\n"
        f"  output: {args.output_dir.resolve()} (checkpoint.pth, metrics.jsonl, metrics.png)"
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run training or evaluation; returns the last validation stats (rank 0) or an empty dict."""
    args = get_args_parser().parse_args(argv)
    check_hyperparameters(args)
    if args.image_size % 128 or args.image_size < 128:
        raise ValueError(f"--image-size must be a positive multiple of 128, got {args.image_size}")
    if args.accum_steps < 1:
        raise ValueError(f"--accum-steps must be a positive int, got {args.accum_steps}")
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be 0 (never) or a positive number of epochs, got {args.eval_every}")
    if args.resume is not None and str(args.resume) == "auto":
        last = args.output_dir / "checkpoint.pth"
        args.resume = last if last.is_file() else None
    if args.test_only and args.resume is None:
        raise ValueError("--test-only needs --resume CHECKPOINT to evaluate")
    if args.cuda_graphs:
        if not args.device.startswith("cuda"):
            raise ValueError(f"--cuda-graphs needs a CUDA --device, got {args.device!r}")
        if args.compile:
            raise ValueError("--cuda-graphs and --compile exclude each other: torch.compile captures its own graphs")
        if args.sync_bn:
            raise ValueError("--cuda-graphs does not capture nn.SyncBatchNorm's collectives: drop --sync-bn")
    rank, world_size = distributed_init(args.device)
    try:
        return _run(args, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world_size: int) -> dict[str, float]:
    device = torch.device(args.device)
    main_process = rank == 0
    torch.manual_seed(args.seed)

    root = args.data_path
    targets = {"masks": args.task == "mask", "label_offset": label_offset(vars(args))}
    train_set = CocoDetectionDataset(
        root / args.train_split,
        root / "annotations" / f"instances_{args.train_split}.json",
        train_transforms(args.image_size, tuple(args.scale_range)),
        **targets,
    )
    val_set = CocoDetectionDataset(
        root / args.val_split, root / "annotations" / f"instances_{args.val_split}.json", eval_transforms(),
        label_offset=targets["label_offset"],
    )  # fmt: skip
    label_map = train_set.label_map
    if val_set.label_map != label_map:
        raise ValueError(f"the {args.train_split} and {args.val_split} annotation files have different categories")
    model = detector_from_args(args_to_dict(args), len(label_map)).to(device)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last == "true" or (args.channels_last == "auto" and device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
    val_loader = DataLoader(
        val_set,
        batch_size=args.batch_size,
        sampler=ShardSampler(len(val_set), rank, world_size),
        num_workers=args.workers,
        collate_fn=collate,
    )
    output_dir = args.output_dir
    progress = main_process and not args.no_progress
    if main_process:
        prepare_output_dir(output_dir)
        if not args.test_only:
            print(describe_run(args, model, train_set, val_set, world_size), flush=True)

    if args.test_only:
        checkpoint = load_checkpoint(args.resume, model=args.model, num_classes=len(label_map), task=args.task)
        model.load_state_dict(checkpoint["model"])
        stats = evaluate(model, val_loader, device, label_map, output_dir, progress=progress)
        if main_process:
            print(format_stats(stats))
        return stats

    generator = torch.Generator()
    sampler = (
        DistributedSampler(train_set, shuffle=True, seed=args.seed)
        if world_size > 1
        else RandomSampler(train_set, generator=generator)
    )
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=generator,
    )
    if len(train_loader) < args.accum_steps:
        raise ValueError(
            f"the training set has {len(train_loader)} batches of {args.batch_size} per process, fewer than one "
            f"optimiser step of --accum-steps {args.accum_steps}"
        )
    global_batch = args.batch_size * world_size * args.accum_steps
    total_steps = args.epochs * (len(train_loader) // args.accum_steps)
    warmup_steps = (
        args.warmup_steps if args.warmup_steps is not None else default_warmup_steps(global_batch, total_steps)
    )
    peak_lr = args.lr if args.lr is not None else scaled_lr(global_batch)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=peak_lr, momentum=args.momentum)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype] if args.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, history = 0, []  # history: one metrics row per finished epoch, saved in every checkpoint
    log_file = output_dir / "metrics.jsonl"
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume, model=args.model, num_classes=len(label_map), task=args.task)
        if LabelMap.from_dict(checkpoint["label_map"]) != label_map:
            raise ValueError(f"checkpoint {args.resume} was trained on other categories than {args.train_split}")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"] + 1
        # Checkpoints before the metrics history: the rows of the log (whose last line may be torn) up to this epoch.
        history = checkpoint.get("metrics") or [
            r for r in read_jsonl_rows(log_file) if r.get("epoch", 1e9) < start_epoch
        ]

    if args.cuda_graphs:
        graph_detector(model, args.batch_size, amp_dtype=amp_dtype)
    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
    if args.compile:
        train_model = torch.compile(train_model, backend=args.compile)

    stats: dict[str, float] = {}
    for epoch in range(start_epoch, args.epochs):
        # Reseeding per epoch makes epoch e identical whether or not the run was resumed before it.
        torch.manual_seed(args.seed + epoch)
        generator.manual_seed(args.seed + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        start = time.perf_counter()
        row = {
            "epoch": epoch,
            **train_one_epoch(
                train_model,
                optimizer,
                lr_scheduler,
                train_loader,
                device,
                epoch=epoch,
                amp_dtype=amp_dtype,
                scaler=scaler,
                clip_norm=args.clip_norm,
                progress=progress,
                accum_steps=args.accum_steps,
                max_loss=args.max_loss,
            ),
        }
        bad = non_finite_tensors(model)  # every rank: no rank waits at a barrier for one that stopped
        if bad:
            raise TrainingDiverged(
                f"training diverged in epoch {epoch}: {len(bad)} weights and buffers are not finite "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was saved, the checkpoint of the "
                "epoch before is kept"
            )
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            stats = evaluate(model, val_loader, device, label_map, output_dir, progress=progress)
            row.update(stats)
        if not main_process:
            if world_size > 1:
                dist.barrier()  # wait for rank 0's checkpoint: a restart resumes every rank from it
            continue
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "args": args_to_dict(args),
                "label_map": label_map.to_dict(),
                "metrics": history,
            },
            output_dir / "checkpoint.pth",
        )
        write_jsonl_atomic(history, log_file)  # rewritten from the checkpoint's history: a kill loses no row
        plot_metrics(log_file, output_dir / "metrics.png")
        summary = ", ".join(f"{k} {row[k]:.3f}" for k in ("loss", "AP", "AP50", "segm_AP", "segm_AP50") if k in row)
        memory = f", {row['max_memory_mb']:.0f} MiB" if "max_memory_mb" in row else ""
        print(f"epoch {epoch}: {summary}, {row['images_per_s']:.1f} img/s{memory}, {row['seconds']:.0f} s", flush=True)
        if world_size > 1:
            dist.barrier()
    return stats


if __name__ == "__main__":
    try:
        main()
    except (TrainingDiverged, OSError) as error:  # a message, not a traceback: the user's to act on
        if isinstance(error, OSError) and error.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: {error}")
