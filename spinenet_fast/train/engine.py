"""One training epoch, (distributed) evaluation to files, optimiser parameter groups and process-group set-up."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from tqdm import tqdm

from ..data.coco import LabelMap
from ..eval.coco_eval import all_stats, predict


def distributed_init(device: str) -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1; returns ``(rank, world_size)``.

    The group's keys live under a prefix per elastic attempt (``TORCHELASTIC_RESTART_COUNT``): after a
    restart, the agent's store still holds the failed attempt's connection keys, and reading those makes
    gloo connect to dead peers.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    backend = "nccl" if device.startswith("cuda") else "gloo"
    rank = int(os.environ["RANK"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store)  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"spinenet_fast/attempt{attempt}", store), rank=rank,
                            world_size=world_size)  # fmt: skip
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world_size


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, …`` of a dataset: every image exactly once across ranks (no padding,
    unlike ``DistributedSampler``), for distributed evaluation."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; none on BN parameters and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainingDiverged(FloatingPointError):
    """The loss or the weights left the finite range (or the loss passed ``--max-loss``): nothing is saved."""


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
    accum_steps: int = 1,
    max_loss: float = float("inf"),
) -> dict[str, float]:
    """Train for one pass over ``data_loader``, one optimiser step per ``accum_steps`` batches (a trailing
    incomplete group is skipped). Returns the mean losses over all ranks' images, the images/s of all ranks,
    the last LR and, on a GPU, this rank's peak memory in MiB. Raises :class:`TrainingDiverged` before the backward
    of a batch whose loss is not finite or above ``max_loss``."""
    model.train()
    sums: dict[str, float] = {}
    num_images, start = 0, time.perf_counter()
    usable = len(data_loader) // accum_steps * accum_steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(data_loader, desc=f"epoch {epoch}", total=usable, disable=not progress, leave=False)
    for index, (images, targets) in enumerate(bar):
        if index == usable:
            break
        # Plain tensors: torchvision's tv_tensors subclasses cost a __torch_function__ per op and break tracing.
        images = [image.as_subclass(torch.Tensor).to(device, non_blocking=True) for image in images]
        targets = [{k: v.as_subclass(torch.Tensor).to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]  # fmt: skip
        step_now = (index + 1) % accum_steps == 0
        # DDP all-reduces gradients only on the batch that completes an accumulation group.
        no_sync = model.no_sync() if not step_now and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = model(images, targets)
            loss = sum(losses.values())
            # One device sync per batch: every logged value at once, checked before the weights change.
            values = dict(zip(("loss", *losses), torch.stack([loss, *losses.values()]).detach().float().tolist()))
            if not values["loss"] <= max_loss:  # NaN too
                losses_text = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}, batch {index} (after {lr_scheduler.last_epoch} optimiser "
                    f"steps): {losses_text} (--max-loss {max_loss:g}); lower --lr or raise --warmup-steps"
                )
            scaler.scale(loss / accum_steps).backward()
        if step_now:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(images)
        num_images += len(images)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    elapsed = time.perf_counter() - start
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [num_images], dtype=torch.float64)
    if is_distributed():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    means = {key: value / max(totals[-1].item(), 1) for key, value in zip(keys, totals[:-1].tolist())}
    row = {**means, "images_per_s": totals[-1].item() / elapsed, "lr": optimizer.param_groups[0]["lr"]}
    if device.type == "cuda":
        row["max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def evaluate(
    model, data_loader, device: torch.device, label_map: LabelMap, output_dir: Path, *, progress: bool = True
) -> dict[str, float]:
    """Predict the loader's images, write ``coco_results.json`` and ``coco_stats.json``; returns the 12 box stats (and
    the 12 mask stats ``segm_AP`` … of a detector that predicts masks). The dataset's ``label_offset`` is undone.

        In a process group every rank predicts its shard of the loader (a :class:`ShardSampler`), rank 0 gathers
        the results, evaluates and writes; the other ranks return ``{}``.
    """
    dataset = data_loader.dataset
    results = predict(model, data_loader, device, label_map, label_offset=dataset.label_offset, progress=progress)
    if is_distributed():
        shards = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(results, shards, dst=0)
        if dist.get_rank() != 0:
            return {}
        results = [row for shard in shards for row in shard]
    stats = all_stats(dataset.coco, results)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "coco_results.json").write_text(json.dumps(results))
    (output_dir / "coco_stats.json").write_text(json.dumps(stats, indent=2))
    return stats
