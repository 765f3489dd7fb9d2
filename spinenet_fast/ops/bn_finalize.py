"""``bn_finalize``: per-channel [Σy; Σy²] (fp32) -> BatchNorm's folded ``scale``, ``shift``; running-stat update.

Equivalent to training-mode ``nn.BatchNorm2d`` split in two: with mean = Σy/n and biased var = Σy²/n − mean²,
``scale = weight / sqrt(var + eps)`` and ``shift = bias − mean·scale``, so that ``BN(y) = scale·y + shift``.
When y is later nearest-upsampled by ρ, its statistics are unchanged but its count is n·ρ²: the running
variance takes the unbiased variance of that upsampled count. Differentiable in the statistics, weight and bias.
The statistics are one (2, C) tensor, as the conv ops produce them: one buffer per BN (one fill, one all-reduce
under SyncBN, one gradient).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from . import backends
from .checks import describe
from .schema_types import TensorList

StatsReducer = Callable[[Tensor, int], tuple[Tensor, int]]


def check_bn_finalize_args(stats, count, weight, bias, eps) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the statistics describe one BN."""
    if not isinstance(stats, Tensor) or stats.dim() != 2 or stats.shape[0] != 2:
        raise TypeError(f"stats must be a (2, C) tensor [Σy; Σy²], got {describe(stats)}")
    if stats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"stats must be float32 (or float64), got {describe(stats)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or t.shape != stats.shape[1:] or t.device != stats.device:
            raise ValueError(
                f"{name} must be a tensor of shape {tuple(stats.shape[1:])} on {stats.device}, got {describe(t)}"
            )
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"count must be an int >= 2 (values per channel), got {count!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def bn_finalize_reference(stats, count, weight, bias, eps) -> list[Tensor]:
    """Plain PyTorch: ``[scale, shift, mean, var]`` in the statistics' dtype (fp32)."""
    mean = stats[0] / count
    var = (stats[1] / count - mean * mean).clamp_min(0)
    scale = weight.to(stats.dtype) * torch.rsqrt(var + eps)
    return [scale, bias.to(stats.dtype) - mean * scale, mean, var]


backends.register("bn_finalize", "reference", lambda *args: [])(bn_finalize_reference)


def _triton_reasons(vector: Tensor) -> list[str]:
    reasons = backends.triton_reasons(vector)
    return reasons + ([] if vector.dtype == torch.float32 else [f"statistics dtype {vector.dtype} is not float32"])


@backends.register("bn_finalize", "triton", lambda stats, *args: _triton_reasons(stats))
def _bn_finalize_triton(stats, count, weight, bias, eps) -> list[Tensor]:
    from spinenet_fast.kernels.bn_finalize import bn_finalize_forward

    return bn_finalize_forward(stats, count, weight, bias, eps)


@backends.register("bn_finalize", "cuda", lambda stats, *args: backends.extension_reasons(stats))
def _bn_finalize_extension(stats, count, weight, bias, eps) -> list[Tensor]:
    return torch.ops.spinenet_fast.ext_bn_finalize(stats[0], stats[1], count, weight, bias, eps)


@torch.library.custom_op("spinenet_fast::bn_finalize", mutates_args=())
def _bn_finalize_op(stats: Tensor, count: int, weight: Tensor, bias: Tensor, eps: float) -> TensorList:
    return backends.run("bn_finalize", stats.contiguous(), count, weight.contiguous(), bias.contiguous(), eps)


@_bn_finalize_op.register_fake
def _(stats, count, weight, bias, eps):
    return [stats.new_empty(stats.shape[1:]) for _ in range(4)]


def bn_finalize_backward_reference(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps):
    """``[d_stats = [dΣ; dΣ²], dγ, dβ]``: the chain rule through scale = γ·invstd, shift = β − mean·scale, mean = Σ/n,
    var = Σ²/n − mean², in plain PyTorch; ``d_mean``/``d_var`` may be None (no gradient)."""
    invstd = torch.rsqrt(var + eps)
    d_affine = d_scale - d_shift * mean
    d_var_total = -0.5 * weight.to(mean.dtype) * d_affine * invstd**3
    d_var_total = d_var_total if d_var is None else d_var_total + d_var
    d_mean_total = -d_shift * weight.to(mean.dtype) * invstd - 2 * mean * d_var_total
    d_mean_total = d_mean_total if d_mean is None else d_mean_total + d_mean
    d_weight, d_bias = (invstd * d_affine).to(weight.dtype), d_shift.to(bias.dtype, copy=True)
    return [torch.stack([d_mean_total, d_var_total]) / count, d_weight, d_bias]


backends.register("bn_finalize_backward", "reference", lambda *args: [])(bn_finalize_backward_reference)


@backends.register("bn_finalize_backward", "cuda", lambda d_scale, *args: backends.extension_reasons(d_scale))
def _bn_finalize_backward_extension(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps):
    d_stats, d_weight, d_bias = torch.ops.spinenet_fast.ext_bn_finalize_backward(
        d_scale, d_shift, d_mean, d_var, weight, mean, var, count, eps
    )
    # γ and β are fp32 like the statistics (autocast keeps parameters fp32): no cast then.
    return [d_stats, d_weight.to(weight.dtype), d_bias.to(bias.dtype)]


@backends.register("bn_finalize_backward", "triton", lambda d_scale, *args: _triton_reasons(d_scale))
def _bn_finalize_backward_triton(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps):
    from spinenet_fast.kernels.bn_finalize import bn_finalize_backward

    return bn_finalize_backward(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps)


@torch.library.custom_op("spinenet_fast::bn_finalize_backward", mutates_args=())
def _bn_finalize_backward_op(
    d_scale: Tensor, d_shift: Tensor, d_mean: Tensor | None, d_var: Tensor | None, weight: Tensor, bias: Tensor,
    mean: Tensor, var: Tensor, count: int, eps: float,
) -> TensorList:  # fmt: skip
    vectors = [t if t is None else t.contiguous() for t in (d_scale, d_shift, d_mean, d_var, weight, bias)]
    return backends.run("bn_finalize_backward", *vectors, mean, var, count, eps)


@_bn_finalize_backward_op.register_fake
def _(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps):
    return [mean.new_empty((2, *mean.shape)), weight.new_empty(weight.shape), bias.new_empty(bias.shape)]


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # outputs without a gradient (mean, var) arrive as None: no zeros launched
    _, count, weight, bias, eps = inputs
    _, _, mean, var = output
    ctx.save_for_backward(weight, bias, mean, var)
    ctx.count, ctx.eps = count, eps


def _backward(ctx, grads):
    weight, bias, mean, var = ctx.saved_tensors
    d_scale, d_shift, d_mean, d_var = grads
    d_scale, d_shift = (torch.zeros_like(mean) if g is None else g for g in (d_scale, d_shift))
    d_stats, d_weight, d_bias = _bn_finalize_backward_op(
        d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, ctx.count, ctx.eps
    )
    return d_stats, None, d_weight, d_bias, None


_bn_finalize_op.register_autograd(_backward, setup_context=_setup_context)


def bn_running_update_reference(running_mean, running_var, batches, mean, var, momentum, unbias) -> None:
    """``running ← lerp(running, batch, momentum)`` in place, the batch variance multiplied by ``unbias``; the
    batch counter ``batches`` (empty: none) is incremented."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * unbias).to(running_var.dtype), momentum)
    batches.add_(1)


def _running_update_triton_reasons(running_mean, running_var, batches, mean, var, momentum, unbias) -> list[str]:
    reasons = _triton_reasons(mean)
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        reasons.append("the running statistics are not contiguous")
    return reasons


backends.register("bn_running_update", "reference", lambda *args: [])(bn_running_update_reference)


@backends.register("bn_running_update", "cuda", lambda running_mean, *args: backends.extension_reasons(running_mean))
def _bn_running_update_extension(running_mean, running_var, batches, mean, var, momentum, unbias) -> None:
    """The extension's one kernel for running statistics in the statistics' dtype (fp32 buffers, as BN keeps them
    under autocast); ATen's in-place ops for other buffers (a model cast to bf16, strided buffers)."""
    running = (running_mean, running_var)
    if all(t.dtype == mean.dtype and t.is_contiguous() for t in running) and batches.dtype == torch.long:
        torch.ops.spinenet_fast.ext_bn_running_update(*running, batches, mean, var, momentum, unbias)
    else:
        bn_running_update_reference(running_mean, running_var, batches, mean, var, momentum, unbias)


@backends.register("bn_running_update", "triton", _running_update_triton_reasons)
def _bn_running_update_triton(running_mean, running_var, batches, mean, var, momentum, unbias) -> None:
    from spinenet_fast.kernels.bn_finalize import bn_running_update

    bn_running_update(running_mean, running_var, batches, mean, var, momentum, unbias)


@torch.library.custom_op("spinenet_fast::bn_running_update", mutates_args=("running_mean", "running_var", "batches"))
def _bn_running_update_op(
    running_mean: Tensor, running_var: Tensor, batches: Tensor, mean: Tensor, var: Tensor, momentum: float,
    unbias: float,
) -> None:  # fmt: skip
    """One launch for both running statistics and the batch counter (eager: two lerps, the unbiasing, an add)."""
    args = (running_mean, running_var, batches, mean.contiguous(), var.contiguous(), momentum, unbias)
    backends.run("bn_running_update", *args)


@_bn_running_update_op.register_fake
def _(running_mean, running_var, batches, mean, var, momentum, unbias):
    return None


def bn_finalize(
    stats: Tensor,
    count: int,
    weight: Tensor,
    bias: Tensor,
    *,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float = 0.1,
    upsample_factor: int = 1,
    stats_reducer: StatsReducer | None = None,
) -> tuple[Tensor, Tensor]:
    """BN's ``(scale, shift)`` from ``stats`` = [Σy; Σy²] (2, C) of ``count`` values per channel; updates the
    running statistics (with ``running_mean``, ``running_var``) and adds 1 to ``num_batches_tracked`` (if given) in
    the same launch.

    ``stats_reducer(stats, count)`` is the SyncBN hook: it returns the statistics all-reduced over the
    process group before they are finalised. ``upsample_factor`` ρ: the normalised tensor is later
    upsampled ×ρ, so the running variance uses the unbiased variance of n·ρ² values.
    """
    if stats_reducer is not None:
        stats, count = stats_reducer(stats, count)
    check_bn_finalize_args(stats, count, weight, bias, eps)
    counter_ok = isinstance(num_batches_tracked, Tensor) and num_batches_tracked.dtype == torch.long
    if num_batches_tracked is not None and not (counter_ok and num_batches_tracked.numel() == 1):
        raise TypeError(f"num_batches_tracked must be a one-element int64 tensor, got {describe(num_batches_tracked)}")
    scale, shift, mean, var = _bn_finalize_op(stats, count, weight, bias, float(eps))
    if running_mean is not None and running_var is not None:
        n = count * upsample_factor**2
        batches = num_batches_tracked if num_batches_tracked is not None else mean.new_empty((0,), dtype=torch.long)
        with torch.no_grad():
            args = (running_mean, running_var, batches, mean.detach(), var.detach(), float(momentum), n / (n - 1))
            _bn_running_update_op(*args)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return scale, shift
