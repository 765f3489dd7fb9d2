"""``conv1x1_bn_stats``: a 1×1 convolution with an optional BN-affine + activation prologue and BN statistics.

Equivalent to::

    a = act(scale[:, None, None] * x + shift[:, None, None]) if scale is not None else x
    y = F.conv2d(a, weight); (y, y.sum((0, 2, 3)), (y * y).sum((0, 2, 3)))

x: (N, C_in, H, W) any memory format; weight: (C_out, C_in, 1, 1); scale, shift: (C_in,) fp32 or None.
Returns y (N, C_out, H, W) channels_last in x's dtype and fp32 Σy, Σy² (C_out,) for the next ``bn_finalize``,
so BN never writes a normalised copy: the consumer applies ``scale·y + shift`` while loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .activation import ACTIVATIONS, activation_forward, activation_grad, stats_dtype

CHANNELS_LAST = torch.channels_last


def check_conv1x1_args(x, weight, scale, shift, activation) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one 1×1 conv."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"x must be a floating (N, C, H, W) tensor, got {_describe(x)}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f"weight must have shape (C_out, {x.shape[1]}, 1, 1), got {_describe(weight)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must be {x.dtype} on {x.device} like x, got {weight.dtype} on {weight.device}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (the prologue's BN affine) or both be None")
    for name, vector in (("scale", scale), ("shift", shift)):
        if vector is not None and (vector.shape != (x.shape[1],) or vector.dtype != stats_dtype(x)
                                   or vector.device != x.device):  # fmt: skip
            expected = f"{str(stats_dtype(x))[6:]} ({x.shape[1]},) tensor on {x.device}"
            raise ValueError(f"{name} must be a {expected}, got {_describe(vector)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__


def _prologue(x, scale, shift, activation, dtype) -> tuple[Tensor, Tensor | None]:
    """(a, pre): the GEMM's input act(scale·x + shift) in ``dtype``, and pre (None without a prologue)."""
    if scale is None:
        return x.to(dtype), None
    pre = x.to(dtype) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    return activation_forward(pre, activation), pre


def conv1x1_bn_stats_reference(x, weight, scale, shift, activation) -> list[Tensor]:
    """Plain PyTorch, fp32 maths (float64 stays float64): ``[y, Σy, Σy²]``."""
    dtype = stats_dtype(x)
    a, _ = _prologue(x, scale, shift, activation, dtype)
    y = F.conv2d(a, weight.to(dtype))
    sums, sumsq = y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))
    return [y.to(x.dtype).contiguous(memory_format=CHANNELS_LAST), sums, sumsq]


def conv1x1_bn_stats_backward_reference(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation) -> list[Tensor]:
    """``[dx, d_weight, (d_scale, d_shift)]``: the statistics' gradients fold into dy, then two GEMMs."""
    dtype = stats_dtype(x)
    grad = dy.to(dtype) + d_sum.to(dtype).view(1, -1, 1, 1) + 2 * y.to(dtype) * d_sumsq.to(dtype).view(1, -1, 1, 1)
    a, pre = _prologue(x, scale, shift, activation, dtype)
    c_out, c_in = weight.shape[:2]
    grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, c_out)
    d_weight = (grad_rows.t() @ a.permute(0, 2, 3, 1).reshape(-1, c_in)).view_as(weight).to(weight.dtype)
    d_a = F.conv2d(grad, weight.to(dtype).transpose(0, 1))
    if pre is None:
        return [d_a.to(x.dtype).contiguous(memory_format=CHANNELS_LAST), d_weight]
    d_pre = d_a * activation_grad(pre, activation)
    dx = (d_pre * scale.to(dtype).view(1, -1, 1, 1)).to(x.dtype).contiguous(memory_format=CHANNELS_LAST)
    d_scale = (d_pre * x.to(dtype)).sum((0, 2, 3)).to(scale.dtype)
    return [dx, d_weight, d_scale, d_pre.sum((0, 2, 3)).to(shift.dtype)]


def _triton_reasons(x, weight, scale, shift, activation) -> list[str]:
    reasons = backends.triton_reasons(x, weight, scale, shift)
    if x.dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


backends.register("conv1x1_bn_stats", "reference", lambda *args: [])(conv1x1_bn_stats_reference)


@backends.register("conv1x1_bn_stats", "triton", _triton_reasons)
def _conv1x1_triton(x, weight, scale, shift, activation) -> list[Tensor]:
    from spinenet_fast.kernels.conv1x1 import conv1x1_bn_stats_forward

    return conv1x1_bn_stats_forward(x, weight, scale, shift, activation)


@torch.library.custom_op("spinenet_fast::conv1x1_bn_stats", mutates_args=())
def _conv1x1_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    args = (x, weight, scale, shift, activation)
    return tuple(backends.select("conv1x1_bn_stats", *args)(*args))


@_conv1x1_op.register_fake
def _(x, weight, scale, shift, activation):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
    vector_dtype = stats_dtype(x)
    return y, x.new_empty(weight.shape[:1], dtype=vector_dtype), x.new_empty(weight.shape[:1], dtype=vector_dtype)


@torch.library.custom_op("spinenet_fast::conv1x1_bn_stats_backward", mutates_args=())
def _conv1x1_backward_op(
    dy: Tensor, d_sum: Tensor, d_sumsq: Tensor, y: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None,
    shift: Tensor | None, activation: str,
) -> list[Tensor]:  # fmt: skip
    # One implementation for every backend: ATen GEMMs (cuBLAS on a GPU), as fused_ops.md §3 allows.
    return conv1x1_bn_stats_backward_reference(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation)


@_conv1x1_backward_op.register_fake
def _(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation):
    grads = [torch.empty_like(x, memory_format=CHANNELS_LAST), torch.empty_like(weight)]
    return grads + ([torch.empty_like(scale), torch.empty_like(shift)] if scale is not None else [])


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, activation = inputs
    ctx.has_prologue, ctx.activation = scale is not None, activation
    ctx.save_for_backward(output[0], x, weight, *((scale, shift) if scale is not None else ()))


def _backward(ctx, dy, d_sum, d_sumsq):
    y, x, weight, *affine = ctx.saved_tensors
    scale, shift = affine if ctx.has_prologue else (None, None)
    zeros = torch.zeros(weight.shape[0], dtype=stats_dtype(x), device=x.device)
    dy = torch.zeros_like(y) if dy is None else dy
    d_sum = zeros if d_sum is None else d_sum
    d_sumsq = zeros if d_sumsq is None else d_sumsq
    grads = _conv1x1_backward_op(dy, d_sum, d_sumsq, y, x, weight, scale, shift, ctx.activation)
    return (*grads[:2], *(grads[2:] if ctx.has_prologue else (None, None)), None)


_conv1x1_op.register_autograd(_backward, setup_context=_setup_context)


def conv1x1_bn_stats(
    x: Tensor, weight: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, activation: str = "identity"
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused 1×1 conv with prologue and statistics epilogue (see the module docstring); checks arguments first."""
    check_conv1x1_args(x, weight, scale, shift, activation)
    return _conv1x1_op(x, weight, scale, shift, activation)
