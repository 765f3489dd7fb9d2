"""``bn_finalize``: per-channel Σy, Σy² (fp32) -> BatchNorm's folded ``scale``, ``shift``; running-stat update.

Equivalent to training-mode ``nn.BatchNorm2d`` split in two: with mean = Σy/n and biased var = Σy²/n − mean²,
``scale = weight / sqrt(var + eps)`` and ``shift = bias − mean·scale``, so that ``BN(y) = scale·y + shift``.
When y is later nearest-upsampled by ρ, its statistics are unchanged but its count is n·ρ²: the running
variance takes the unbiased variance of that upsampled count. Differentiable in Σy, Σy², weight and bias.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from . import backends
from .checks import describe
from .schema_types import TensorList

StatsReducer = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, int]]


def check_bn_finalize_args(sums, sumsq, count, weight, bias, eps) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the statistics describe one BN."""
    for name, t in (("sums", sums), ("sumsq", sumsq)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be a 1-D float32 (or float64) tensor, got {describe(t)}")
    for name, t in (("sumsq", sumsq), ("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or t.shape != sums.shape or t.device != sums.device:
            raise ValueError(
                f"{name} must be a tensor of shape {tuple(sums.shape)} on {sums.device}, got {describe(t)}"
            )
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"count must be an int >= 2 (values per channel), got {count!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def bn_finalize_reference(sums, sumsq, count, weight, bias, eps) -> list[Tensor]:
    """Plain PyTorch: ``[scale, shift, mean, var]`` in the statistics' dtype (fp32)."""
    mean = sums / count
    var = (sumsq / count - mean * mean).clamp_min(0)
    scale = weight.to(sums.dtype) * torch.rsqrt(var + eps)
    return [scale, bias.to(sums.dtype) - mean * scale, mean, var]


backends.register("bn_finalize", "reference", lambda *args: [])(bn_finalize_reference)


@backends.register("bn_finalize", "triton", lambda sums, *args: backends.triton_reasons(sums))
def _bn_finalize_triton(sums, sumsq, count, weight, bias, eps) -> list[Tensor]:
    from spinenet_fast.kernels.bn_finalize import bn_finalize_forward

    return bn_finalize_forward(sums, sumsq, count, weight, bias, eps)


@backends.register("bn_finalize", "cuda", lambda sums, *args: backends.extension_reasons(sums))
def _bn_finalize_extension(sums, sumsq, count, weight, bias, eps) -> list[Tensor]:
    return torch.ops.spinenet_fast.ext_bn_finalize(sums, sumsq, count, weight, bias, eps)


@torch.library.custom_op("spinenet_fast::bn_finalize", mutates_args=())
def _bn_finalize_op(sums: Tensor, sumsq: Tensor, count: int, weight: Tensor, bias: Tensor, eps: float) -> TensorList:
    args = (sums.contiguous(), sumsq.contiguous(), count, weight.contiguous(), bias.contiguous(), eps)
    return backends.run("bn_finalize", *args)


@_bn_finalize_op.register_fake
def _(sums, sumsq, count, weight, bias, eps):
    return [sums.new_empty(sums.shape) for _ in range(4)]


def _setup_context(ctx, inputs, output):
    _, _, count, weight, _, eps = inputs
    scale, _, mean, var = output
    ctx.save_for_backward(weight, mean, var, scale)
    ctx.count, ctx.eps = count, eps


def _backward(ctx, grads):
    """Chain rule through scale = γ·invstd, shift = β − mean·scale, mean = Σ/n, var = Σ²/n − mean²."""
    weight, mean, var, scale = ctx.saved_tensors
    d_scale, d_shift, d_mean, d_var = (torch.zeros_like(mean) if g is None else g for g in grads)
    invstd = torch.rsqrt(var + ctx.eps)
    d_invstd = weight.float() * (d_scale - d_shift * mean)
    d_var_total = d_var - 0.5 * d_invstd * invstd**3
    d_mean_total = d_mean - d_shift * scale - 2 * mean * d_var_total
    d_weight = (invstd * (d_scale - d_shift * mean)).to(weight.dtype)
    return d_mean_total / ctx.count, d_var_total / ctx.count, None, d_weight, d_shift.clone(), None


_bn_finalize_op.register_autograd(_backward, setup_context=_setup_context)


def bn_finalize(
    sums: Tensor,
    sumsq: Tensor,
    count: int,
    weight: Tensor,
    bias: Tensor,
    *,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    upsample_factor: int = 1,
    stats_reducer: StatsReducer | None = None,
) -> tuple[Tensor, Tensor]:
    """BN's ``(scale, shift)`` from per-channel statistics of ``count`` values each; updates running stats.

    ``stats_reducer(sums, sumsq, count)`` is the SyncBN hook: it returns the statistics all-reduced over the
    process group before they are finalised. ``upsample_factor`` ρ: the normalised tensor is later
    upsampled ×ρ, so the running variance uses the unbiased variance of n·ρ² values.
    """
    if stats_reducer is not None:
        sums, sumsq, count = stats_reducer(sums, sumsq, count)
    check_bn_finalize_args(sums, sumsq, count, weight, bias, eps)
    scale, shift, mean, var = _bn_finalize_op(sums, sumsq, count, weight, bias, float(eps))
    if running_mean is not None and running_var is not None:
        n = count * upsample_factor**2
        with torch.no_grad():
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            running_var.lerp_((var.detach() * n / (n - 1)).to(running_var.dtype), momentum)
    return scale, shift
