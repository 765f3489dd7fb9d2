"""The fused forward of a :class:`~spinenet_fast.models.resample.CrossScaleMerge`, built from the fused ops.

Per parent: squeeze 1×1 (+ Σ, Σ²) -> [3×3/s2 with the squeeze's BN + act as prologue (+ Σ, Σ²) -> BN + act +
max-pools] -> expand 1×1 with the previous BN + act as prologue (+ Σ, Σ²), run at the parent's resolution for
upsampling connections -> one ``merge`` that applies each expand BN, gathers every parent at its own
resolution, adds the raw extra inputs and applies the activation. BN in training mode finalises the
statistics (running variance with the upsampled count); otherwise its running statistics become the affine.
``nn.SyncBatchNorm`` inside a process group all-reduces each BN's (2, C) [Σ; Σ²] (one differentiable
all-reduce, so the backward reductions are all-reduced too). Under autocast the activations run in the autocast
dtype and the conv ops take the fp32 weights, rounding them as they load them; statistics, scales and shifts stay
fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import Tensor, nn

from ..ops import bn_act_maxpool, bn_finalize, conv1x1_bn_stats, conv3x3s2_bn_stats, merge


def bn_affine(bn: nn.Module, stats: Tensor, count: int, upsample_factor: int) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` (fp32) such that ``bn(y) == scale·y + shift`` for the y these statistics came from."""
    batch_stats = isinstance(bn, nn.modules.batchnorm._BatchNorm) and (bn.training or bn.running_mean is None)
    if not batch_stats:
        scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        return scale, bn.bias.float() - bn.running_mean.float() * scale
    momentum = bn.momentum
    update = bn.training and bn.track_running_stats
    counter = bn.num_batches_tracked if update else None  # incremented by the running-statistics update
    if update and momentum is None:  # cumulative moving average, as nn.BatchNorm2d (reads the counter on the host)
        bn.num_batches_tracked.add_(1)
        momentum, counter = 1.0 / float(bn.num_batches_tracked), None
    return bn_finalize(
        stats, count, bn.weight, bn.bias, eps=bn.eps,
        running_mean=bn.running_mean if update else None, running_var=bn.running_var if update else None,
        num_batches_tracked=counter, momentum=momentum, upsample_factor=upsample_factor,
        stats_reducer=sync_stats_reducer(bn),
    )  # fmt: skip


def sync_stats_reducer(bn: nn.Module):
    """SyncBN's statistics hook: the (2, C) [Σ; Σ²] summed over ``bn``'s process group (``None`` outside one).

    Every rank is assumed to hold the same number of values per channel (DDP's equal per-rank batches at a
    fixed training size), so the count is scaled, not all-reduced: no host synchronisation per BN.
    """
    if not (isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return None

    def reduce(stats: Tensor, count: int) -> tuple[Tensor, int]:
        return dist_functional.all_reduce(stats, group=group), count * world_size

    return reduce


def _pixels(t: Tensor) -> int:
    return t.shape[0] * t.shape[2] * t.shape[3]


def gemm_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A conv's weight as the conv ops take it for activations of ``dtype``: an fp32 master weight as
    is under autocast (the kernels round it as they load it and accumulate its gradient in fp32: no cast launched in
    either pass), any other weight cast to ``dtype``."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    return weight if low_precision and weight.dtype == torch.float32 else weight.to(dtype)


def fused_resample(resample, x: Tensor, activation: str, padding: str) -> tuple[Tensor, Tensor, Tensor, int]:
    """One parent's low-resolution expand output y (before its BN), that BN's scale and shift, and its ratio ρ."""
    squeeze, expand = resample.squeeze, resample.expand
    y, stats = conv1x1_bn_stats(x, gemm_weight(squeeze.conv.weight, x.dtype))
    scale, shift = bn_affine(squeeze.bn, stats, _pixels(y), 1)
    ratio = resample.upsample_factor
    if resample.down is not None:
        weight = gemm_weight(resample.down.conv.weight, x.dtype)
        y, stats = conv3x3s2_bn_stats(y, weight, scale, shift, activation, padding)
        scale, shift = bn_affine(resample.down.bn, stats, _pixels(y), 1)
        if len(resample.pools):
            y = bn_act_maxpool(y, scale, shift, activation, len(resample.pools), padding)
            scale = shift = None
    y, stats = conv1x1_bn_stats(
        y, gemm_weight(expand.conv.weight, x.dtype), scale, shift, activation if scale is not None else "identity"
    )
    scale, shift = bn_affine(expand.bn, stats, _pixels(y), ratio)
    return y, scale, shift, ratio


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the fused path stores activations in: autocast's where it is on for x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def fused_merge_forward(module, feats: list[Tensor], activation: str, padding: str) -> Tensor:
    """``module``'s output from the fused ops; same parameters, buffers and result as its eager forward."""
    dtype = compute_dtype(feats[module.parent_ids[0]])
    parents, scales, shifts, ratios = [], [], [], []
    for resample, i in zip(module.resamples, module.parent_ids):
        y, scale, shift, ratio = fused_resample(resample, feats[i].to(dtype), activation, padding)
        parents.append(y)
        scales.append(scale)
        shifts.append(shift)
        ratios.append(ratio)
    extra = None
    for j in module.extra_ids:
        extra = feats[j].to(dtype) if extra is None else extra + feats[j].to(dtype)
    return merge(parents, scales, shifts, ratios, extra, activation)
