"""The fused forward of :class:`~spinenet_fast.detection.head.SpineNetRetinaNetHead`'s towers and predictors.

A tower layer is one 3×3 conv with a bias, shared by the five levels, then that level's BN and the activation. Fused,
the levels are packed as one ragged batch (N, S, C) (one copy of the features) and each tower layer is one
``conv3x3_bn_levels`` for all levels — one launch per pass on Triton: the bias in its epilogue, each level's
statistics in its own segment and its BN finalised by that level's last program; the backward one dgrad + wgrad
launch that folds each level's BN and adds every level's weight and bias gradients into one — whose prologue is each
level's previous BN + act, so no normalised or activated tensor is written. A predictor is one ``conv3x3_levels``
whose prologue is the last tower BN + act, and whose packed (N, S, A·V) output viewed as (N, S·A, V) is torchvision's
anchor order: no concatenation. BN with running statistics (eval mode) becomes the next conv's prologue affine.

Towers whose BNs that path does not take (a process group, a cumulative moving average, training and eval modes mixed,
more than five levels) run level by level: each (layer, level) one ``conv3x3_bn``, the five levels' backward launches
adding the weight and bias gradients into one zeroed fp32 buffer handed to autograd once by :class:`SharedParameter`,
a predictor one ``conv3x3_bn_stats`` per level and one concatenation per output. Activations are NCHW of any memory
format; under autocast they run in the autocast dtype with the fp32 parameters rounded as the kernels load them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.fused_merge import (
    ConnectionWorkspace,
    batch_bn_kwargs,
    compute_dtype,
    conv_then_bn,
    gemm_weight,
    running_parameters,
    sync_group,
    uses_batch_statistics,
)
from ..ops import conv3x3_bn_levels, conv3x3_bn_stats, conv3x3_levels, pack_levels
from ..ops.bn_finalize import stats_slots
from ..ops.conv3x3_levels import MAX_LEVELS, levels_stats_size
from .anchors import flatten_per_anchor


class SharedParameter(torch.autograd.Function):
    """``parameter`` passed on (a view) to the convs of several levels that add its gradient into ``buffer`` and
    return none (``conv3x3_bn(shared_grad_buffers=True)``): its gradient is the buffer, once all of them ran. A
    second backward through the same graph (``retain_graph``) has the convs return their own gradients, passed on."""

    @staticmethod
    def forward(ctx, parameter: Tensor, buffer: Tensor) -> Tensor:
        ctx.buffer = buffer  # mutated by the backward ops: not saved (its version changes)
        ctx.set_materialize_grads(False)  # the convs pass None: no zeros filled, none added
        return parameter.view_as(parameter)

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        buffer, ctx.buffer = ctx.buffer, None
        if buffer is None:
            return grad, None
        return (buffer if grad is None else buffer + grad), None


@dataclass
class SharedConv:
    """A tower layer's conv as its five levels' ``conv3x3_bn`` calls take it: weight and bias (views through
    :class:`SharedParameter` where their gradients share buffers) and the buffers, or None."""

    weight: Tensor
    bias: Tensor | None
    weight_grad: Tensor | None = None
    bias_grad: Tensor | None = None

    @classmethod
    def of(cls, conv: nn.Conv2d, workspace: ConnectionWorkspace, batch_statistics: bool) -> SharedConv:
        """Share the gradient buffers where every level's BN uses batch statistics (``batch_statistics``), the
        workspace holds the weight's gradient (a dense fp32 weight) and the bias is fp32 or absent."""
        bias = conv.bias
        if not batch_statistics or SharedConv.buffer_elements(conv, workspace.dtype) == 0:
            return cls(conv.weight, bias)
        weight_grad = workspace.take_weight_grad(conv.weight)
        bias_grad = None if bias is None else workspace.take(bias.numel(), rows=1)[0]
        weight = SharedParameter.apply(conv.weight, weight_grad)
        return cls(weight, None if bias is None else SharedParameter.apply(bias, bias_grad), weight_grad, bias_grad)

    @staticmethod
    def buffer_elements(conv: nn.Conv2d, dtype: torch.dtype) -> int:
        """The workspace elements :meth:`of` takes for ``conv``."""
        if not ConnectionWorkspace.holds_weight_grad(conv.weight, dtype):
            return 0
        if conv.bias is not None and not _holds_bias_grad(conv.bias):
            return 0
        return conv.weight.numel() + (0 if conv.bias is None else conv.bias.numel())


def _holds_bias_grad(bias: Tensor) -> bool:
    return bias.requires_grad and bias.dtype == torch.float32


def fusable_head(head) -> bool:
    """Whether the head's convs are plain 3×3 convs (not separable) and every norm of its towers a BN the fused ops
    implement (``nn.BatchNorm2d`` and subclasses)."""
    towers = (head.class_tower, head.box_tower)
    norms = [norm for tower in towers for level in tower.norms for norm in level]
    return not getattr(head, "separable", False) and all(isinstance(n, nn.modules.batchnorm._BatchNorm) for n in norms)


def _workspace_elements(tower, num_levels: int, channels: int, dtype: torch.dtype) -> int:
    """The zeroed elements a tower's training-mode layers take: per layer its shared gradient buffers, and per level
    the BN's statistics and counter and (after the first layer) the prologue's gradients."""
    total = 0
    for k, conv in enumerate(tower.convs):
        batch_levels = sum(uses_batch_statistics(tower.norms[level][k]) for level in range(num_levels))
        total += batch_levels * (stats_slots(channels, dtype) + 1 + 2 * channels * (k > 0))
        total += SharedConv.buffer_elements(conv, dtype) if _batch_statistics(tower, k, num_levels) else 0
    return total


def _batch_statistics(tower, k: int, num_levels: int) -> bool:
    return all(uses_batch_statistics(tower.norms[level][k]) for level in range(num_levels))


def tower_forward(tower, features: list[Tensor], activation: str) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
    """Per level ``(y, scale, shift)``: the last layer's raw conv output (N, C, H, W) channels_last and its BN's
    affine map (fp32), so that the tower's output is ``act(scale·y + shift)``."""
    stats_dtype = torch.promote_types(features[0].dtype, torch.float32)
    elements = _workspace_elements(tower, len(features), features[0].shape[1], stats_dtype)
    workspace = ConnectionWorkspace(
        [elements] if elements else [], features[0].device, stats_dtype, [n for level in tower.norms for n in level]
    )
    levels = [(x, None, None) for x in features]
    for k, conv in enumerate(tower.convs):
        shared = SharedConv.of(conv, workspace, _batch_statistics(tower, k, len(features)))
        norms = [tower.norms[level][k] for level in range(len(levels))]
        levels = [
            conv_then_bn(x, conv, norm, scale, shift, activation, workspace, padding="torch", stride=1, shared=shared)
            for norm, (x, scale, shift) in zip(norms, levels)
        ]
    return levels


def predictor_forward(predictor: nn.Conv2d, y: Tensor, scale, shift, activation: str, values_per_anchor: int) -> Tensor:
    """``predictor(act(scale·y + shift))`` as (N, H·W·A, V) in torchvision's anchor order (a view of the conv's
    channels_last output)."""
    out, _ = conv3x3_bn_stats(y, gemm_weight(predictor.weight, y.dtype), scale, shift, activation, "torch", stride=1,
                              bias=predictor.bias, statistics=False)  # fmt: skip
    return flatten_per_anchor(out, values_per_anchor)


def fused_head_forward(head, features: list[Tensor]) -> dict[str, Tensor]:
    """``head(features)`` from the fused ops: same parameters, buffers and result as the eager forward. Each tower
    layer and predictor runs on all levels at once (``levels_forward``) where every BN of a tower is alike (batch
    statistics, no process group, a momentum; or running statistics); otherwise level by level."""
    dtype = compute_dtype(features[0])
    features = [x.to(dtype) for x in features]
    towers = (("cls_logits", head.class_tower, head.class_predictor, head.num_classes),
              ("bbox_regression", head.box_tower, head.box_predictor, 4))  # fmt: skip
    if len(features) <= MAX_LEVELS and all(levels_mode(tower, len(features)) for _, tower, _, _ in towers):
        return levels_forward(head, features, towers)
    outputs = {}
    for name, tower, predictor, values in towers:
        levels = tower_forward(tower, features, head.activation)
        outputs[name] = torch.cat(
            [predictor_forward(predictor, y, scale, shift, head.activation, values) for y, scale, shift in levels], 1
        )
    return outputs


def levels_mode(tower, num_levels: int) -> str | None:
    """``"batch"`` where every BN of the tower normalises with batch statistics outside a process group and has a
    momentum and the same eps and momentum as the other levels' BN of its layer, ``"running"`` where every BN uses
    its running statistics, else None (the towers then run level by level)."""
    norms = [tower.norms[level][k] for k in range(len(tower.convs)) for level in range(num_levels)]
    if all(not uses_batch_statistics(n) for n in norms):
        return "running"
    if not all(uses_batch_statistics(n) and sync_group(n) is None and n.momentum is not None for n in norms):
        return None
    layers = [[tower.norms[level][k] for level in range(num_levels)] for k in range(len(tower.convs))]
    alike = all(len({(n.eps, n.momentum, n.track_running_stats) for n in layer}) == 1 for layer in layers)
    return "batch" if alike else None


def stacked_running_affines(norms: list[nn.Module], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, each (len(norms), C) in ``dtype``: the affine maps of norms of one width that normalise
    with their running statistics (``fused_merge.running_affines``' maps, row by row), stacked — eight launches
    (four stacks, four elementwise) however many norms."""
    weight, bias, mean, var = (torch.stack(rows) for rows in zip(*(running_parameters(n, dtype) for n in norms)))
    epsilons = [float(n.eps) for n in norms]
    alike = len(set(epsilons)) == 1  # else one per row
    eps = epsilons[0] if alike else torch.tensor(epsilons, dtype=dtype, device=var.device).view(-1, 1)
    scale = weight * torch.rsqrt(var + eps)
    return scale, torch.addcmul(bias, mean, scale, value=-1)


def levels_forward(head, features: list[Tensor], towers) -> dict[str, Tensor]:
    """The towers and predictors with every level in one launch per layer (``conv3x3_bn_levels`` /
    ``conv3x3_levels`` on the levels packed as one (N, S, C) tensor: one copy of the features); each predictor's
    packed (N, S, A·V) output viewed as (N, S·A, V) is torchvision's anchor order."""
    sizes = [(x.shape[2], x.shape[3]) for x in features]
    packed = pack_levels(features)
    stats_dtype = torch.promote_types(packed.dtype, torch.float32)
    outputs = {}
    # the running-statistics towers' norms, layer by layer and level by level: their maps stacked, computed at once
    running_towers = [tower for _, tower, _, _ in towers if levels_mode(tower, len(sizes)) == "running"]
    stacked = [
        tower.norms[level][k]
        for tower in running_towers
        for k in range(len(tower.convs))
        for level in range(len(sizes))
    ]
    rows_per_layer = len(sizes)
    # each layer's (L, C) rows as one split per map: its backward is one concatenation, not a slice and an add per layer
    maps = [m.split(rows_per_layer) for m in stacked_running_affines(stacked, stats_dtype)] if stacked else None
    for name, tower, predictor, values in towers:
        y, scale, shift = packed, None, None
        batch = tower not in running_towers  # (every tower here is "batch" or "running": ``levels_mode``)
        per_layer = levels_stats_size(len(sizes), predictor.in_channels, stats_dtype)
        elements = per_layer * len(tower.convs) if batch else 0  # each layer's statistics and counters: one fill
        workspace = torch.zeros(elements, dtype=stats_dtype, device=packed.device) if batch else None
        for k, conv in enumerate(tower.convs):
            norms = [tower.norms[level][k] for level in range(len(sizes))]
            weight = gemm_weight(conv.weight, y.dtype)
            act = head.activation if scale is not None else "identity"
            if batch:
                bn = [batch_bn_kwargs(norm) for norm in norms]
                running = bn[0]["running_mean"] is not None
                y, scale, shift = conv3x3_bn_levels(
                    y, sizes, weight, conv.bias, scale, shift, act, bn_weights=[n.weight for n in norms],
                    bn_biases=[n.bias for n in norms], eps=bn[0]["eps"], momentum=bn[0]["momentum"],
                    running_means=[b["running_mean"] for b in bn] if running else None,
                    running_vars=[b["running_var"] for b in bn] if running else None,
                    num_batches_tracked=[b["num_batches_tracked"] for b in bn] if bn[0]["num_batches_tracked"]
                    is not None else None, stats_buffer=workspace[k * per_layer : (k + 1) * per_layer],
                )  # fmt: skip
            else:  # this layer's rows of the stacked maps
                y = conv3x3_levels(y, sizes, weight, conv.bias, scale, shift, act)
                layer = stacked.index(tower.norms[0][k]) // rows_per_layer
                scale, shift = maps[0][layer], maps[1][layer]
        out = conv3x3_levels(y, sizes, gemm_weight(predictor.weight, y.dtype), predictor.bias, scale, shift,
                             head.activation)  # fmt: skip
        outputs[name] = out.view(out.shape[0], -1, values)
    return outputs
