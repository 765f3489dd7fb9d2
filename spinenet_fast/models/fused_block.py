"""The fused forward of a :class:`~spinenet_fast.models.blocks.Bottleneck` or
:class:`~spinenet_fast.models.blocks.Residual` block, built from the fused ops.

Bottleneck: 1×1 (+ Σ, Σ²) -> 3×3/s1 with the previous BN + act as its prologue (+ Σ, Σ²) -> 1×1 likewise; residual:
3×3/s1 -> 3×3/s1 likewise; a projection shortcut is a 1×1 (+ Σ, Σ²) of the block input. Each conv + training-mode BN
is one ``conv1x1_bn`` / ``conv3x3_bn`` (the BN finalised in the GEMM's last program, its backward folded into the
conv's backward kernels), so no normalised or activated tensor is written between the convs. The block output —
last BN, shortcut BN (or the identity input), stochastic depth, residual add, activation — is one ``merge`` of
same-resolution parents; stochastic depth (training mode, drop rate > 0) is its ``row_scale`` on the last BN's term,
drawn as torchvision's ``StochasticDepth(mode="row")`` draws it (same random numbers as the eager block).
Activations are NCHW tensors of any memory format; the fused convs return channels_last. The block's input comes
as one tensor or as one per reader (main path, shortcut: ``merge_for_readers``), and its output goes out as one per
reader of it. A bottleneck's first conv and projection shortcut (training mode) are one ``conv1x1_bn_pair``: its
input then has one reader (``input_readers``), the pair's backward storing both convs' input gradient summed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import merge_for_readers
from ..ops.activation import stats_dtype
from ..ops.merge import sums_rows
from .fused_merge import (
    ConnectionWorkspace,
    RunningAffines,
    compute_dtype,
    conv_pair_then_bn,
    conv_then_bn,
    uses_batch_statistics,
)


def block_convs(block) -> list:
    """The block's conv + BN layers along its main path, in order (``ConvNorm``)."""
    return [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])


def block_layers(block) -> list:
    """The block's conv + BN layers: its main path's, then its projection shortcut where it has one."""
    return block_convs(block) + ([block.shortcut] if block.shortcut is not None else [])


def pairs_input_convs(block) -> bool:
    """Whether the fused block runs its first conv and its projection shortcut, both 1×1 of its input with
    batch-statistics BNs, as one ``conv1x1_bn_pair`` (whose backward stores the input's gradient once)."""
    shortcut = block.shortcut
    return (
        shortcut is not None
        and block.conv1.conv.kernel_size == (1, 1)
        and uses_batch_statistics(block.conv1.bn)
        and uses_batch_statistics(shortcut.bn)
    )


def input_readers(block) -> int:
    """How many copies of its input the fused block takes (``merge_for_readers``): one where its input convs are a
    pair, else two (main path, shortcut)."""
    return 1 if pairs_input_convs(block) else 2


def row_scale(drop_path, like: Tensor) -> Tensor | None:
    """The (N,) per-sample factors ``drop_path`` (torchvision's ``StochasticDepth(mode="row")``) would multiply a
    branch like ``like`` (N, C, H, W) by in this call — kept samples 1/(1 - p), dropped ones 0, from the same Bernoulli
    draws in the same dtype — in the merge's statistics dtype; None where it is the identity (eval mode, p = 0)."""
    if not (drop_path.training and drop_path.p > 0):
        return None
    survival = 1.0 - drop_path.p
    noise = torch.empty((like.shape[0],), dtype=like.dtype, device=like.device).bernoulli_(survival)
    factors = torch.empty_like(noise, dtype=stats_dtype(like))
    return torch.div(noise, survival, out=factors)  # divided in like's dtype, as torchvision does, then widened


def fused_block_forward(block, x: Tensor | tuple[Tensor, Tensor], activation: str, padding: str,
                        readers: int = 1, affines: RunningAffines | None = None) -> tuple[Tensor, ...]:  # fmt: skip
    """``block(x)`` from the fused ops, once per reader (``merge_for_readers``): same parameters, buffers and result
    as the block's eager forward. x: (N, C_in, H, W), or its ``input_readers(block)`` copies (main path, shortcut;
    or one) -> ``readers`` × (N, C_out, H, W) channels_last. ``affines``: its running-statistics norms' maps where
    already computed."""
    x, x_shortcut = (x[0], x[-1]) if isinstance(x, tuple) else (x, x)
    dtype = compute_dtype(x)
    x, x_shortcut = x.to(dtype), x_shortcut.to(dtype)
    factors = row_scale(block.drop_path, x)  # the convs draw no random numbers: the same draws as eager's
    convs = block_convs(block)
    layers = [(layer, i > 0) for i, layer in enumerate(convs)]
    layers += [(block.shortcut, False)] if block.shortcut is not None else []
    stats_dtype = torch.promote_types(dtype, torch.float32)
    sizes = [
        size for layer, prologue in layers for size in ConnectionWorkspace.layer_sizes(layer, prologue, stats_dtype)
    ]
    if sizes:  # the merge backward's channel sums
        sizes.append(sums_rows(2, factors is not None) * convs[-1].conv.out_channels)
    workspace = ConnectionWorkspace(sizes, x.device, stats_dtype, [layer.bn for layer, _ in layers], affines)
    paired = pairs_input_convs(block)
    y, scale, shift = x, None, None
    if paired:
        y, scale, shift, *short = conv_pair_then_bn(x, block.conv1, block.shortcut, workspace)
    for layer in convs[1:] if paired else convs:
        three_by_three = layer.conv.kernel_size[0] == 3
        y, scale, shift = conv_then_bn(y, layer.conv, layer.bn, scale, shift, activation, workspace,
                                       padding=padding if three_by_three else None, stride=1)  # fmt: skip
    parents, scales, shifts, extra = [y], [scale], [shift], x_shortcut
    if block.shortcut is not None:
        shortcut = block.shortcut
        y_short, scale_short, shift_short = (
            short if paired else conv_then_bn(x_shortcut, shortcut.conv, shortcut.bn, None, None, activation, workspace)
        )
        parents.append(y_short)
        scales.append(scale_short)
        shifts.append(shift_short)
        extra = None
    sums_buffer = workspace.take(parents[0].shape[1], rows=sums_rows(2, factors is not None)) if sizes else None
    return merge_for_readers(parents, scales, shifts, [1] * len(parents), extra, activation, readers=readers,
                             row_scale=factors, sums_buffer=sums_buffer)  # fmt: skip
