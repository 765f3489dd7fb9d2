"""One training epoch, evaluation to files, optimiser parameter groups and process-group set-up."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.coco import LabelMap
from ..eval.coco_eval import coco_stats, predict


def distributed_init(device: str) -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1; returns ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world_size


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; none on BN parameters and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_one_epoch(
    model,
    optimizer,
    lr_scheduler,
    data_loader,
    device: torch.device,
    *,
    epoch: int,
    amp_dtype: torch.dtype | None,
    scaler,
    clip_norm: float,
    progress: bool,
) -> dict[str, float]:
    """Train for one pass over ``data_loader``; returns mean losses, images/s and the last LR."""
    model.train()
    sums: dict[str, float] = {}
    num_images, start = 0, time.perf_counter()
    bar = tqdm(data_loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for images, targets in bar:
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        # One device sync per step: every logged value at once, checked before the weights change.
        values = dict(zip(("loss", *losses), torch.stack([loss, *losses.values()]).detach().float().tolist()))
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is not finite at epoch {epoch}: {values}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(images)
        num_images += len(images)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    elapsed = time.perf_counter() - start
    means = {key: value / max(num_images, 1) for key, value in sums.items()}
    return {**means, "images_per_s": num_images / elapsed, "lr": optimizer.param_groups[0]["lr"]}


def evaluate(
    model, data_loader, device: torch.device, label_map: LabelMap, output_dir: Path, *, progress: bool = True
) -> dict[str, float]:
    """Predict the loader's images, write ``coco_results.json`` and ``coco_stats.json``; returns the 12 stats."""
    results = predict(model, data_loader, device, label_map, progress=progress)
    stats = coco_stats(data_loader.dataset.coco, results)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "coco_results.json").write_text(json.dumps(results))
    (output_dir / "coco_stats.json").write_text(json.dumps(stats, indent=2))
    return stats
