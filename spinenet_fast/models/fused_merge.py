"""The fused forward of a :class:`~spinenet_fast.models.resample.CrossScaleMerge`, built from the fused ops.

Per parent: squeeze 1×1 (+ Σ, Σ²) -> [3×3/s2 with the squeeze's BN + act as prologue (+ Σ, Σ²) -> BN + act +
max-pools (in training mode, the expand conv's prologue: ``pooled_conv1x1_bn``)] -> expand 1×1 with the previous BN
+ act as prologue (+ Σ, Σ²), run at the parent's resolution for upsampling connections -> one ``merge`` that applies
each expand BN, gathers every parent at its own resolution, adds the raw extra inputs and applies the activation. BN
in training mode finalises the statistics (running variance with the upsampled count) inside ``conv1x1_bn`` /
``conv3x3_bn``, whose backwards fold the BN's backward into their kernels; otherwise its running statistics become
the affine. ``nn.SyncBatchNorm`` inside a process group all-reduces each BN's (2, C) [Σ; Σ²] (and, in the backward,
the gradients they feed). Under autocast the activations run in the autocast dtype and the conv ops take the fp32
weights, rounding them as they load them; statistics, scales and shifts stay fp32.

A connection of one or two parents with its expand BNs in training mode (outside SyncBN) runs its expand convs,
their BNs (the max-pools before them) and the merge as one ``expand_merge`` after the squeezes (and stride-2 convs):
the expand outputs are recomputed where they are needed instead of stored (``ops/expand_merge.py``).
SpineNet-Mobile's connections likewise, their 1×1 convs as the expand convs: a same-level or upsampled parent
enters the op raw (no prologue), a downsampling one as its last depthwise stride-2 conv's raw output with that BN +
act as its prologue. Where the expand BNs normalise with running statistics (eval mode, frozen norms: inference, or
training with frozen norms), the expand convs, their affine maps and the merge are one ``expand_merge_affine``
likewise, forward and backward (a downsampling parent max-pooled first, ``bn_act_maxpool``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import (
    backends,
    bn_act_maxpool,
    conv1x1_bn,
    conv1x1_bn_pair,
    conv1x1_bn_stats,
    conv3x3_bn,
    conv3x3_bn_stats,
    expand_merge,
    expand_merge_affine_for_readers,
    merge_for_readers,
    pooled_conv1x1_bn,
)
from ..ops.bn_finalize import aligned, alignment_slack, stats_slots, take_stats
from ..ops.checks import is_dense
from ..ops.conv_bn import counter_view
from ..ops.expand_merge import workspace_size

# {norm layer: (scale, shift)} of norms that normalise with their running statistics (``running_affines``)
RunningAffines = dict[nn.Module, tuple[Tensor, Tensor]]


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with the statistics of its input (training mode, or no running statistics)."""
    return isinstance(bn, nn.modules.batchnorm._BatchNorm) and (bn.training or bn.running_mean is None)


class ConnectionWorkspace:
    """One zeroed buffer (the maths dtype: fp32, or float64 for float64 activations) for every accumulator of a
    connection's (or a block's) training-mode conv + BN ops — each BN's float64 statistics [Σ; Σ²] (a float64 view,
    ``take_stats``) and its finalize's program counter, each prologue's gradient [d_scale; d_shift] (the max-pools'
    included), each fp32 conv weight's gradient, and the merge backward's channel sums — handed out in slices, in the
    order the ops take them: one fill per merge (or block) instead of one per accumulator. ``sizes``: the slices'
    elements, in that order. ``norms``: the norm layers of the module's conv + norm layers, whose affine maps the
    workspace computes at once where they normalise with running statistics and ``affines`` (a model's,
    ``model_running_affines``) does not hold them (``running_affine``)."""

    def __init__(self, sizes: list[int], device: torch.device, dtype: torch.dtype, norms: list[nn.Module] = (),
                 affines: RunningAffines | None = None) -> None:  # fmt: skip
        self.buffer = torch.zeros(sum(sizes), device=device, dtype=dtype) if sizes else None
        self.offset, self.dtype = 0, dtype
        self.shared = affines if affines is not None else {}
        missing = [n for n in norms if not (uses_batch_statistics(n) or self.shared_affine(n))]
        self.affines = running_affines(missing, dtype)

    def shared_affine(self, bn: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``bn``'s map in the ``affines`` the workspace was handed, where it is there in the workspace's dtype."""
        affine = self.shared.get(bn)
        return affine if affine is not None and affine[0].dtype == self.dtype else None

    def running_affine(self, bn: nn.Module) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` of a norm that normalises with its running statistics: from the ``affines`` the
        workspace was handed (a model's, computed at once), or computed with the others of its ``norms`` (the
        module's: ``running_affines``), or alone where it was among neither."""
        affine = self.shared_affine(bn) or self.affines.get(bn)
        return affine if affine is not None else running_affines([bn], self.dtype)[bn]

    @classmethod
    def for_merge(cls, module, device: torch.device, dtype: torch.dtype, affines: RunningAffines | None = None
                  ) -> ConnectionWorkspace:  # fmt: skip
        """The workspace of a ``CrossScaleMerge``'s fused forward through ``merge`` (``fused_merge_forward``)."""
        sizes, norms = [], []  # elements; the norm layers
        for resample in module.resamples:
            # the max-pools' affine gradients are the pooled conv's prologue's
            layers = [*expand_input_layers(resample), (resample.expand, True)]
            sizes += [size for layer, has_prologue in layers for size in cls.layer_sizes(layer, has_prologue, dtype)]
            norms += [layer.bn for layer, _ in layers]
            if pools_apart(resample) and takes_grad_buffers(resample.down.conv, resample.down.bn):
                sizes.append(2 * resample.down.conv.out_channels)  # the separate max-pool op's affine gradients
        if sizes and len(module.resamples) <= 2:  # the merge backward's (3, C) channel sums
            sizes.append(3 * module.resamples[0].expand.conv.out_channels)
        return cls(sizes, device, dtype, norms, affines)

    @classmethod
    def for_mobile_merge(cls, module, device: torch.device, dtype: torch.dtype,
                         affines: RunningAffines | None = None) -> ConnectionWorkspace:  # fmt: skip
        """The workspace of a SpineNet-Mobile ``MobileMerge``'s fused forward (``fused_mobile_merge_forward``)."""
        layers = [layer for resample in module.resamples for layer in mobile_layers(resample)]
        sizes = [size for layer, has_prologue in layers for size in cls.layer_sizes(layer, has_prologue, dtype)]
        if sizes and len(module.resamples) <= 2:  # the merge backward's (3, C) channel sums
            sizes.append(3 * module.resamples[0].conv.conv.out_channels)
        return cls(sizes, device, dtype, [layer.bn for layer, _ in layers], affines)

    @classmethod
    def layer_sizes(cls, layer, has_prologue: bool, dtype: torch.dtype) -> list[int]:
        """The slices one conv + BN layer (``.conv``, ``.bn``) takes through ``conv_then_bn``: in training mode its
        statistics and the finalize's counter; then, where its backward may run (``takes_grad_buffers``), its
        prologue's gradients and an fp32 weight's gradient."""
        if not takes_grad_buffers(layer.conv, layer.bn):
            return []
        sizes = [stats_slots(layer.conv.out_channels, dtype), 1] if uses_batch_statistics(layer.bn) else []
        sizes += [2 * layer.conv.in_channels] if has_prologue else []
        return sizes + ([layer.conv.weight.numel()] if cls.holds_weight_grad(layer.conv.weight, dtype) else [])

    @staticmethod
    def holds_weight_grad(weight: Tensor, dtype: torch.dtype) -> bool:
        """Whether the buffer (of ``dtype``) holds the gradient of ``weight``: a dense fp32 weight that needs one."""
        return weight.requires_grad and weight.dtype == dtype == torch.float32 and is_dense(weight)

    def take_weight_grad(self, weight: Tensor) -> Tensor | None:
        """The next ``weight.numel()`` elements laid out as ``weight`` (its strides: autograd then keeps it as the
        parameter's gradient, no copy), where ``holds_weight_grad``."""
        if self.buffer is None or not self.holds_weight_grad(weight, self.buffer.dtype):
            return None
        start, self.offset = self.offset, self.offset + weight.numel()  # the buffer is its storage's from element 0
        return self.buffer.as_strided(weight.shape, weight.stride(), start)

    def take_counter(self) -> Tensor | None:
        """The next element as a zeroed integer counter (``conv_bn.counter_view``; None without a buffer)."""
        return None if self.buffer is None else counter_view(self.take(1, rows=1).view(1))

    def take_stats(self, channels: int) -> Tensor | None:
        """The next BN's float64 (2, channels) statistics (``bn_finalize.take_stats``; None without a buffer)."""
        if self.buffer is None:
            return None
        stats, self.offset = take_stats(self.buffer, self.offset, channels)
        return stats

    def take_aligned(self, elements: int) -> Tensor | None:
        """The next ``elements`` from an 8-byte boundary (a 1-D slice that holds float64 statistics itself: an
        ``expand_merge`` workspace; its size reserves ``alignment_slack`` more); None without a buffer."""
        if self.buffer is None:
            return None
        self.offset = aligned(self.offset, self.buffer.dtype)
        return self.take(elements, rows=1).view(-1)

    def take(self, channels: int, rows: int = 2) -> Tensor | None:
        """The next (rows, channels) slice (None without a buffer: no training-mode BN)."""
        if self.buffer is None:
            return None
        view = self.buffer[self.offset : self.offset + rows * channels].view(rows, channels)
        self.offset += rows * channels
        return view


def takes_grad_buffers(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether a conv + norm layer takes the accumulators of its backward from its module's workspace: always in
    training mode (its BN's statistics are in the same fill); with running statistics where a backward may run —
    gradients on and a parameter of the layer requiring one (else nothing is filled: an inference forward)."""
    if uses_batch_statistics(bn):
        return True
    return torch.is_grad_enabled() and any(p.requires_grad for m in (conv, bn) for p in m.parameters())


def expand_layer(resample) -> nn.Module:
    """The 1×1 conv + BN layer that gives a parent the block's width: SpineNet's expand, SpineNet-Mobile's conv."""
    return resample.expand if hasattr(resample, "squeeze") else resample.conv


def expand_input_layers(resample) -> list[tuple[nn.Module, bool]]:
    """The conv + BN layers before a parent's expand conv, each with whether the previous BN + act is its prologue:
    SpineNet's squeeze (and stride-2 conv), SpineNet-Mobile's depthwise stride-2 convs (none for a same-level or
    upsampled parent)."""
    if hasattr(resample, "squeeze"):
        return [(resample.squeeze, False)] + ([(resample.down, True)] if resample.down is not None else [])
    return mobile_layers(resample)[:-1]


def expanding_layers(module) -> list[nn.Module] | None:
    """The expand conv + BN layer (``.conv``, ``.bn``: ``expand_layer``) of each parent of a ``CrossScaleMerge`` or
    ``MobileMerge`` that runs as one ``expand_merge``: one or two parents, every expand BN normalising with batch
    statistics outside a SyncBN group and updating its running statistics and counter alike; else None."""
    if len(module.resamples) > 2:
        return None
    layers = [expand_layer(resample) for resample in module.resamples]
    bns = [layer.bn for layer in layers]
    if not all(uses_batch_statistics(bn) and sync_group(bn) is None for bn in bns):
        return None
    updates = {(bn.training and bn.track_running_stats, bn.momentum is None, bn.running_mean is None) for bn in bns}
    return layers if len(updates) == 1 else None


def affine_expanding_layers(module) -> list[nn.Module] | None:
    """The expand conv + norm layer of each parent of a ``CrossScaleMerge`` or ``MobileMerge`` that runs as one
    ``expand_merge_affine``: one or two parents, every expand norm normalising with its running statistics (eval
    mode, frozen norms); else None."""
    if len(module.resamples) > 2:
        return None
    layers = [expand_layer(resample) for resample in module.resamples]
    return None if any(uses_batch_statistics(layer.bn) for layer in layers) else layers


def may_differentiate(module, feats: list[Tensor]) -> bool:
    """Whether a backward may run through a merge module's forward: gradients on, and one of its inputs or
    parameters requiring one."""
    if not torch.is_grad_enabled():
        return False
    inputs = [feats[i] for i in (*module.parent_ids, *module.extra_ids)]
    return any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())


def expand_merge_size(layers: list[nn.Module], dtype: torch.dtype) -> int:
    """The elements of the ``dtype`` ``expand_merge`` workspace of these expand layers (``expanding_layers``)."""
    return workspace_size(layers[0].conv.out_channels, [layer.conv.in_channels for layer in layers], dtype)


def batch_bn_kwargs(bn: nn.Module) -> dict | None:
    """The keyword arguments of ``conv1x1_bn`` / ``conv3x3_bn`` that make them ``bn`` in training mode (batch
    statistics, running statistics and counter updated as ``nn.BatchNorm2d`` does), or None where ``bn`` normalises
    with its running statistics."""
    if not uses_batch_statistics(bn):
        return None
    momentum = bn.momentum
    update = bn.training and bn.track_running_stats
    counter = bn.num_batches_tracked if update else None  # incremented by the finalize
    if update and momentum is None:  # cumulative moving average, as nn.BatchNorm2d (reads the counter on the host)
        bn.num_batches_tracked.add_(1)
        momentum, counter = 1.0 / float(bn.num_batches_tracked), None
    return dict(
        eps=bn.eps, running_mean=bn.running_mean if update else None, running_var=bn.running_var if update else None,
        num_batches_tracked=counter, momentum=momentum,
    )  # fmt: skip


def running_affines(norms: list[nn.Module], dtype: torch.dtype) -> RunningAffines:
    """``{norm: (scale, shift)}`` (in the statistics' ``dtype``: fp32, or float64) of norms that normalise with their
    running statistics: scale = γ·rsqrt(var + eps), shift = β − mean·scale (γ = 1, β = 0 without an affine), all
    norms at once — four launches (foreach ops) however many norms, not five per norm; differentiable in γ, β, the
    backward two launches for all of them (``_RunningAffines``)."""
    if not norms:
        return {}
    parameters = [t for n in norms for t in running_parameters(n, dtype)]  # per norm: γ, β, mean, var
    maps = _RunningAffines.apply([float(n.eps) for n in norms], *parameters)
    return {norm: (maps[2 * i], maps[2 * i + 1]) for i, norm in enumerate(norms)}


class _RunningAffines(torch.autograd.Function):
    """The maps of ``running_affines`` from per norm (γ, β, running mean, running variance): forward four foreach
    launches, backward two (dγ = (d_scale − mean·d_shift)·rsqrt(var + eps), dβ = d_shift, for every norm at once),
    where autograd's formulas for the foreach ops take several launches per norm."""

    @staticmethod
    def forward(ctx, eps: list[float], *parameters: Tensor) -> tuple[Tensor, ...]:
        weights, biases, means, variances = (parameters[k::4] for k in range(4))
        inverse_std = torch._foreach_rsqrt(torch._foreach_add(variances, eps))
        scales = torch._foreach_mul(weights, inverse_std)
        shifts = torch._foreach_addcmul(biases, means, scales, value=-1)
        ctx.save_for_backward(*means, *inverse_std)
        return tuple(t for pair in zip(scales, shifts) for t in pair)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        count = len(saved) // 2
        means, inverse_std = saved[:count], saved[count:]
        wanted = [any(ctx.needs_input_grad[1 + 4 * i : 3 + 4 * i]) for i in range(count)]
        d_weights, d_biases = [None] * count, [None] * count
        chosen = [i for i in range(count) if wanted[i]]
        if chosen:
            d_scales, d_shifts = [grads[2 * i] for i in chosen], [grads[2 * i + 1] for i in chosen]
            folded = torch._foreach_addcmul(d_scales, [means[i] for i in chosen], d_shifts, value=-1)
            torch._foreach_mul_(folded, [inverse_std[i] for i in chosen])
            for i, d_weight, d_shift in zip(chosen, folded, d_shifts):
                d_weights[i], d_biases[i] = d_weight, d_shift
        return None, *(g for i in range(count) for g in (d_weights[i], d_biases[i], None, None))


def modules_running_affines(modules: list[nn.Module], x: Tensor) -> RunningAffines | None:
    """For a forward of images x through a model's ``FusedSetting`` modules (its ``fusable_modules()``): the affine
    maps of all the norms of those that run fused which normalise with their running statistics (eval mode, frozen
    norms), computed at once — four launches per forward rather than four per module (``running_affines``); None
    where none runs fused."""
    fused = [m for m in modules if m.runs_fused(x)]
    if not fused:
        return None
    norms = [n for m in fused for n in m.norm_layers() if not uses_batch_statistics(n)]
    return running_affines(norms, torch.promote_types(compute_dtype(x), torch.float32))


def running_parameters(norm: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(γ, β, running mean, running variance)`` of a norm in ``dtype`` (γ = 1, β = 0 without an affine)."""
    weight = norm.weight.to(dtype) if norm.weight is not None else torch.ones_like(norm.running_var, dtype=dtype)
    bias = norm.bias.to(dtype) if norm.bias is not None else torch.zeros_like(norm.running_mean, dtype=dtype)
    return weight, bias, norm.running_mean.to(dtype), norm.running_var.to(dtype)


def pools_apart(resample) -> bool:
    """Whether a connection's max-pools run as their own op: its expand BN normalises with running statistics (in
    training mode the pools are the prologue of the expand conv, ``pooled_conv1x1_bn``)."""
    return resample.down is not None and len(resample.pools) > 0 and not uses_batch_statistics(resample.expand.bn)


def conv_then_bn(x: Tensor, conv: nn.Module, bn: nn.Module, scale, shift, activation: str,
                 workspace: ConnectionWorkspace, *, upsample_factor=1, padding: str | None = None,
                 num_pools: int = 0, stride: int = 2, shared=None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, scale, shift)``: the conv (1×1, or 3×3 of ``stride`` with a ``padding`` and no ``num_pools``) of
    act(scale·x + shift) (of x without them) and its BN's affine map; in training mode one ``conv1x1_bn`` /
    ``conv3x3_bn``, whose backward folds the BN's. ``num_pools``: the 1×1 conv of that many 3×3/s2 max-pools
    (``padding``) of act(scale·x + shift), one ``pooled_conv1x1_bn`` (training mode only). A 3×3 conv may have a
    bias; ``shared`` (3×3): the conv's weight and bias as several calls share them
    (``detection.fused_head.SharedConv``), their gradients left in its buffers."""
    weight = gemm_weight(conv.weight if shared is None else shared.weight, x.dtype)
    bias = {} if padding is None else {"bias": conv.bias if shared is None else shared.bias}
    act = activation if scale is not None else "identity"
    conv_args = (act,) if padding is None else (act, padding)
    kwargs = batch_bn_kwargs(bn)
    if kwargs is None:
        conv_stats = conv1x1_bn_stats if padding is None else conv3x3_bn_stats
        window = {} if padding is None else {"stride": stride}
        buffers = {}
        if shared is None and takes_grad_buffers(conv, bn):  # (the slices ``layer_sizes`` counts)
            buffers = dict(prologue_grad_buffer=workspace.take(x.shape[1]) if scale is not None else None,
                           weight_grad_buffer=workspace.take_weight_grad(conv.weight))  # fmt: skip
        y, _ = conv_stats(x, weight, scale, shift, *conv_args, **window, **bias, statistics=False, **buffers)
        return (y, *workspace.running_affine(bn))
    weight_grad = workspace.take_weight_grad(conv.weight) if shared is None else shared.weight_grad
    bn_args = training_bn_args(conv, bn, kwargs, workspace, weight_grad)
    bn_args["prologue_grad_buffer"] = workspace.take(x.shape[1]) if scale is not None else None
    if num_pools:
        return pooled_conv1x1_bn(x, weight, scale, shift, activation, num_pools, padding, **bn_args)
    if padding is not None:
        if shared is not None and shared.weight_grad is not None:
            bias.update(bias_grad_buffer=shared.bias_grad, shared_grad_buffers=True)
        return conv3x3_bn(x, weight, scale, shift, *conv_args, stride=stride, **bn_args, **bias)
    return conv1x1_bn(x, weight, scale, shift, *conv_args, **bn_args, upsample_factor=upsample_factor)


def training_bn_args(conv: nn.Module, bn: nn.Module, kwargs: dict, workspace: ConnectionWorkspace,
                     weight_grad: Tensor | None) -> dict:  # fmt: skip
    """A training-mode conv + BN op's BN keyword arguments (``batch_bn_kwargs``'s ``kwargs``), its statistics and
    counter taken from the workspace; ``weight_grad``: the buffer dW is added into, or None."""
    return dict(bn_weight=bn.weight, bn_bias=bn.bias, **kwargs, process_group=sync_group(bn),
                stats_buffer=workspace.take_stats(conv.out_channels), counter_buffer=workspace.take_counter(),
                weight_grad_buffer=weight_grad)  # fmt: skip


def conv_pair_then_bn(x: Tensor, layer_a: nn.Module, layer_b: nn.Module,
                      workspace: ConnectionWorkspace) -> tuple[Tensor, ...]:  # fmt: skip
    """``(y_a, scale_a, shift_a, y_b, scale_b, shift_b)``: two training-mode 1×1 conv + BN layers (``.conv``, ``.bn``)
    of x as one ``conv1x1_bn_pair`` (its backward one launch that stores x's gradient once)."""
    layers = (layer_a, layer_b)
    bns = [
        training_bn_args(layer.conv, layer.bn, batch_bn_kwargs(layer.bn), workspace, grad)
        for layer, grad in zip(layers, [workspace.take_weight_grad(layer.conv.weight) for layer in layers])
    ]
    weights = [gemm_weight(layer.conv.weight, x.dtype) for layer in layers]
    return conv1x1_bn_pair(x, *weights, bn_a=bns[0], bn_b=bns[1])


def sync_group(bn: nn.Module):
    """The process group a ``nn.SyncBatchNorm`` synchronises over (None outside one, or for a group of one)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def gemm_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A conv's weight as the conv ops take it for activations of ``dtype``: an fp32 master weight as
    is under autocast (the kernels round it as they load it and accumulate its gradient in fp32: no cast launched in
    either pass), any other weight cast to ``dtype``."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    return weight if low_precision and weight.dtype == torch.float32 else weight.to(dtype)


def fused_expand_input(resample, x: Tensor, activation: str, padding: str, workspace: ConnectionWorkspace
                       ) -> tuple:  # fmt: skip
    """One parent's input to its expand conv inside ``expand_merge`` (``expand_input_layers`` run in turn, each with
    the previous BN + act as its prologue) and the last BN's scale and shift (the expand's prologue): SpineNet's
    squeeze output h (before its BN), or for a downsampling parent the stride-2 3×3 conv's of act(BN(h));
    SpineNet-Mobile's last depthwise stride-2 conv's, or the raw parent (no prologue: None, None)."""
    scale = shift = None
    for layer, _ in expand_input_layers(resample):
        three_by_three = layer.conv.kernel_size[0] == 3
        x, scale, shift = conv_then_bn(x, layer.conv, layer.bn, scale, shift, activation, workspace,
                                       padding=padding if three_by_three else None)  # fmt: skip
    return x, scale, shift


def pooled_expand_input(resample, x: Tensor, activation: str, padding: str, workspace: ConnectionWorkspace
                        ) -> tuple:  # fmt: skip
    """``fused_expand_input``, then a downsampling parent's max-pools (``bn_act_maxpool``: its BN + act applied, no
    prologue left; their affine gradients in the workspace where ``takes_grad_buffers``): a parent's input to
    ``expand_merge_affine``."""
    h, scale, shift = fused_expand_input(resample, x, activation, padding, workspace)
    if not getattr(resample, "pools", None):
        return h, scale, shift
    buffer = workspace.take(h.shape[1]) if takes_grad_buffers(resample.down.conv, resample.down.bn) else None
    return max_pooled(h, scale, shift, activation, len(resample.pools), padding, buffer), None, None


def max_pooled(y: Tensor, scale, shift, activation: str, num_pools: int, padding: str,
               affine_grad_buffer: Tensor | None = None) -> Tensor:  # fmt: skip
    """``bn_act_maxpool`` inside a fused module: it has no Triton kernel, so under a forced Triton backend it runs on
    the backend ``auto`` takes."""
    with backends.auto_where_unimplemented("bn_act_maxpool"):
        return bn_act_maxpool(y, scale, shift, activation, num_pools, padding, affine_grad_buffer=affine_grad_buffer)


def fused_resample(resample, x: Tensor, activation: str, padding: str, workspace: ConnectionWorkspace) -> tuple:
    """One parent's low-resolution expand output y (before its BN), that BN's scale and shift, and its ratio ρ."""
    squeeze, expand = resample.squeeze, resample.expand
    y, scale, shift = conv_then_bn(x, squeeze.conv, squeeze.bn, None, None, activation, workspace)
    ratio = resample.upsample_factor
    if resample.down is not None:
        y, scale, shift = conv_then_bn(y, resample.down.conv, resample.down.bn, scale, shift, activation, workspace,
                                       padding=padding)  # fmt: skip
        if pools_apart(resample):
            buffer = workspace.take(y.shape[1]) if takes_grad_buffers(resample.down.conv, resample.down.bn) else None
            y = max_pooled(y, scale, shift, activation, len(resample.pools), padding, affine_grad_buffer=buffer)
            scale = shift = None
        elif len(resample.pools):
            y, scale, shift = conv_then_bn(y, expand.conv, expand.bn, scale, shift, activation, workspace,
                                           padding=padding, num_pools=len(resample.pools))  # fmt: skip
            return y, scale, shift, ratio
    y, scale, shift = conv_then_bn(y, expand.conv, expand.bn, scale, shift, activation, workspace,
                                   upsample_factor=ratio)  # fmt: skip
    return y, scale, shift, ratio


def mobile_layers(resample) -> list[tuple[nn.Module, bool]]:
    """A SpineNet-Mobile connection's conv + BN layers in order, each with whether the previous BN + act is its
    prologue: the depthwise stride-2 convs (the first reads the raw parent), then the 1×1 conv."""
    layers = [*resample.down, resample.conv]
    return [(layer, k > 0) for k, layer in enumerate(layers)]


def fused_mobile_resample(resample, x: Tensor, activation: str, padding: str, workspace: ConnectionWorkspace
                          ) -> tuple:  # fmt: skip
    """One SpineNet-Mobile parent's 1×1 conv output y (before its BN; at the parent's resolution when upsampling),
    that BN's scale and shift, and its ratio ρ."""
    x, scale, shift = fused_expand_input(resample, x, activation, padding, workspace)
    y, scale, shift = conv_then_bn(x, resample.conv.conv, resample.conv.bn, scale, shift, activation, workspace,
                                   upsample_factor=resample.upsample_factor)  # fmt: skip
    return y, scale, shift, resample.upsample_factor


def fused_mobile_merge_forward(module, feats: list[Tensor], activation: str, padding: str,
                               affines: RunningAffines | None = None) -> Tensor:  # fmt: skip
    """A SpineNet-Mobile ``MobileMerge``'s output from the fused ops: per parent, each depthwise 3×3/s2 conv + BN
    (``conv3x3_bn`` with a depthwise weight; from the second on with the previous BN + act as its prologue), then the
    1×1 conv + BN (``conv1x1_bn``; for an upsampling parent at the parent's resolution), then one ``merge`` that
    applies each parent's BN, gathers the upsampled parents, adds the raw extra inputs and the activation — or,
    where ``expanding_layers`` allows, the 1×1 convs, their BNs and the merge as one ``expand_merge``. Same
    parameters, buffers and result as its eager forward. ``affines``: its running-statistics norms' maps where
    already computed."""
    layers = expanding_layers(module)
    if layers is not None:
        return expanded_parents(module, feats, activation, padding, 1, layers, affines)[0]
    layers = affine_expanding_layers(module)
    if layers is not None:
        return affine_expanded_parents(module, feats, activation, padding, 1, layers, affines)[0]
    return merge_resampled_parents(module, feats, activation, padding, 1, ConnectionWorkspace.for_mobile_merge,
                                   fused_mobile_resample, affines)[0]  # fmt: skip


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the fused path stores activations in: autocast's where it is on for x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def fused_merge_forward(module, feats: list[Tensor], activation: str, padding: str, readers: int = 1,
                        affines: RunningAffines | None = None) -> tuple[Tensor, ...]:  # fmt: skip
    """``module``'s output from the fused ops, once per reader (``merge_for_readers``); same parameters, buffers
    and result as its eager forward. ``affines``: its running-statistics norms' maps where already computed."""
    layers = expanding_layers(module)
    if layers is not None:
        return expanded_parents(module, feats, activation, padding, readers, layers, affines)
    layers = affine_expanding_layers(module)
    if layers is not None:
        return affine_expanded_parents(module, feats, activation, padding, readers, layers, affines)
    return merge_resampled_parents(module, feats, activation, padding, readers, ConnectionWorkspace.for_merge,
                                   fused_resample, affines)  # fmt: skip


def merge_resampled_parents(module, feats: list[Tensor], activation: str, padding: str, readers: int, workspace_for,
                            resample_parent, affines: RunningAffines | None = None) -> tuple[Tensor, ...]:  # fmt: skip
    """The fused forward of a merge module (SpineNet's or SpineNet-Mobile's): its workspace
    (``workspace_for(module, device, statistics dtype, affines)``), each parent through ``resample_parent(resample, x,
    activation, padding, workspace) -> (y, scale, shift, ratio)``, the raw extras summed, then one
    ``merge_for_readers``."""
    dtype = compute_dtype(feats[module.parent_ids[0]])
    workspace = workspace_for(module, feats[module.parent_ids[0]].device, torch.promote_types(dtype, torch.float32),
                              affines)  # fmt: skip
    parents, scales, shifts, ratios = [], [], [], []
    for resample, i in zip(module.resamples, module.parent_ids):
        y, scale, shift, ratio = resample_parent(resample, feats[i].to(dtype), activation, padding, workspace)
        parents.append(y)
        scales.append(scale)
        shifts.append(shift)
        ratios.append(ratio)
    extra = summed_extras(module, feats, dtype)
    sums_buffer = workspace.take(parents[0].shape[1], rows=3) if len(parents) <= 2 else None
    return merge_for_readers(parents, scales, shifts, ratios, extra, activation, readers=readers,
                             sums_buffer=sums_buffer)  # fmt: skip


def summed_extras(module, feats: list[Tensor], dtype: torch.dtype) -> Tensor | None:
    """The sum of a merge module's raw extra inputs in ``dtype`` (None without any)."""
    extra = None
    for j in module.extra_ids:
        extra = feats[j].to(dtype) if extra is None else extra + feats[j].to(dtype)
    return extra


def expand_input_sizes(module, dtype: torch.dtype) -> tuple[list[tuple[nn.Module, bool]], list[int]]:
    """The conv + BN layers before a connection's expand convs (``expand_input_layers``, every parent's in turn) and
    the workspace slices (of ``dtype``) they take, a downsampling parent's max-pools' after its layers where they run
    apart (``pools_apart``: ``pooled_expand_input``)."""
    layers, sizes = [], []
    for resample in module.resamples:
        parent_layers = expand_input_layers(resample)
        layers += parent_layers
        sizes += [size for layer, prologue in parent_layers
                  for size in ConnectionWorkspace.layer_sizes(layer, prologue, dtype)]  # fmt: skip
        apart = hasattr(resample, "squeeze") and pools_apart(resample)  # (SpineNet-Mobile's have no max-pools)
        if apart and takes_grad_buffers(resample.down.conv, resample.down.bn):
            sizes.append(2 * resample.down.conv.out_channels)  # the max-pools' affine gradients
    return layers, sizes


def expand_inputs_of(module, feats: list[Tensor], dtype: torch.dtype, activation: str, padding: str,
                     workspace: ConnectionWorkspace, expand_input) -> tuple[list, list, list]:  # fmt: skip
    """``(parents, scales, shifts)``: each parent of ``module`` (in ``dtype``) through ``expand_input(resample, x,
    activation, padding, workspace) -> (h, scale, shift)``, the input of the connection's expand-and-merge op."""
    parents, scales, shifts = [], [], []
    for resample, i in zip(module.resamples, module.parent_ids):
        h, scale, shift = expand_input(resample, feats[i].to(dtype), activation, padding, workspace)
        parents.append(h)
        scales.append(scale)
        shifts.append(shift)
    return parents, scales, shifts


def expanded_parents(module, feats: list[Tensor], activation: str, padding: str, readers: int,
                     layers: list[nn.Module], affines: RunningAffines | None = None) -> tuple[Tensor, ...]:  # fmt: skip
    """A ``CrossScaleMerge`` or ``MobileMerge`` that runs as one ``expand_merge`` (``expanding_layers``): each
    parent's layers before its expand conv (``fused_expand_input``), then the op (with the parents' max-pools) — one
    zeroed workspace for all of them."""
    dtype = compute_dtype(feats[module.parent_ids[0]])
    stats_dtype = torch.promote_types(dtype, torch.float32)
    input_layers, inputs = expand_input_sizes(module, stats_dtype)
    size = expand_merge_size(layers, stats_dtype)
    workspace = ConnectionWorkspace([*inputs, size + alignment_slack(stats_dtype)], feats[module.parent_ids[0]].device,
                                    stats_dtype, [layer.bn for layer, _ in input_layers], affines)  # fmt: skip
    parents, scales, shifts = expand_inputs_of(module, feats, dtype, activation, padding, workspace,
                                               fused_expand_input)  # fmt: skip
    bn_kwargs = [batch_bn_kwargs(layer.bn) for layer in layers]
    ratios = [resample.upsample_factor for resample in module.resamples]
    optional = lambda key: [kw[key] for kw in bn_kwargs] if bn_kwargs[0][key] is not None else None  # noqa: E731
    return expand_merge(
        parents, scales, shifts, [gemm_weight(layer.conv.weight, dtype) for layer in layers], ratios,
        summed_extras(module, feats, dtype), activation, bn_weights=[layer.bn.weight for layer in layers],
        bn_biases=[layer.bn.bias for layer in layers], eps=[kw["eps"] for kw in bn_kwargs],
        running_means=optional("running_mean"), running_vars=optional("running_var"),
        num_batches_tracked=optional("num_batches_tracked"), momentums=[kw["momentum"] for kw in bn_kwargs],
        pools=[len(getattr(r, "pools", None) or ()) for r in module.resamples], padding=padding,
        readers=readers, workspace=workspace.take_aligned(size),
    )  # fmt: skip


def affine_expanded_parents(module, feats: list[Tensor], activation: str, padding: str, readers: int,
                            layers: list[nn.Module], affines: RunningAffines | None = None
                            ) -> tuple[Tensor, ...]:  # fmt: skip
    """A ``CrossScaleMerge`` or ``MobileMerge`` that runs as one ``expand_merge_affine`` (``affine_expanding_layers``),
    once per reader: each parent's layers before its expand conv (``fused_expand_input``; a downsampling parent's
    max-pools after them, ``bn_act_maxpool``), then the op with the expand norms' running-statistics maps — where a
    backward may run, one zeroed workspace for all of them (the op's accumulators its last slice)."""
    dtype = compute_dtype(feats[module.parent_ids[0]])
    stats_dtype = torch.promote_types(dtype, torch.float32)
    input_layers, sizes = expand_input_sizes(module, stats_dtype)
    norms = [*(layer.bn for layer, _ in input_layers), *(layer.bn for layer in layers)]
    channels, squeezed = layers[0].conv.out_channels, [layer.conv.in_channels for layer in layers]
    op_size = workspace_size(channels, squeezed, stats_dtype, statistics=False)
    backward = may_differentiate(module, feats)
    workspace = ConnectionWorkspace(sizes + ([op_size] if backward else []), feats[module.parent_ids[0]].device,
                                    stats_dtype, norms, affines)  # fmt: skip
    parents, scales, shifts = expand_inputs_of(module, feats, dtype, activation, padding, workspace,
                                               pooled_expand_input)  # fmt: skip
    maps = [workspace.running_affine(layer.bn) for layer in layers]
    return expand_merge_affine_for_readers(
        parents, scales, shifts, [gemm_weight(layer.conv.weight, dtype) for layer in layers],
        [resample.upsample_factor for resample in module.resamples], summed_extras(module, feats, dtype), activation,
        bn_scales=[scale for scale, _ in maps], bn_shifts=[shift for _, shift in maps], readers=readers,
        workspace=workspace.take(op_size, rows=1).view(-1) if backward else None,
    )  # fmt: skip
