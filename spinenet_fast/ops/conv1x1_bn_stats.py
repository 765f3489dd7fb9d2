"""``conv1x1_bn_stats``: a 1×1 convolution with an optional BN-affine + activation prologue and BN statistics.

Equivalent to::

    a = act(scale[:, None, None] * x + shift[:, None, None]) if scale is not None else x
    y = F.conv2d(a, weight); (y, torch.stack([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))]))

x: (N, C_in, H, W) any memory format; weight: (C_out, C_in, 1, 1) in x's dtype, or the fp32 master weight of a
bf16/fp16 x (rounded to x's dtype as it is loaded, as autocast rounds it, with its gradient accumulated in fp32 and
no cast launched either way); scale, shift: (C_in,) fp32 or None.
Returns y (N, C_out, H, W) channels_last in x's dtype and float64 stats = [Σy; Σy²] (2, C_out) for ``bn_finalize``,
so BN never writes a normalised copy: the consumer applies ``scale·y + shift`` while loading.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, op_spec
from .activation import ACTIVATIONS
from .checks import check_buffers_without_statistics, check_statistics_flag, describe
from .conv_common import (
    accumulating,
    added_into_buffers,
    check_affine_prologue,
    check_grad_buffers,
    conv_outputs,
    fake_backward_into,
    fake_conv_grads,
    fake_conv_outputs,
    fill_output_grads,
    folded_output_grad,
    into_buffers_backward,
    into_buffers_forward,
    prologue_backward,
    prologue_forward,
)
from .op_spec import FUSED_FIRST, Backend, kernel
from .schema_types import TensorList


def check_conv1x1_args(x, weight, scale, shift, activation) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one 1×1 conv."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"x must be a floating (N, C, H, W) tensor, got {describe(x)}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f"weight must have shape (C_out, {x.shape[1]}, 1, 1), got {describe(weight)}")
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else (x.dtype,)
    if weight.dtype not in allowed or weight.device != x.device:
        expected = " or ".join(map(str, allowed))
        raise TypeError(f"weight must be {expected} on {x.device} like x, got {weight.dtype} on {weight.device}")
    check_affine_prologue(x, scale, shift)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def conv1x1_bn_stats_reference(x, weight, scale, shift, activation, statistics=True) -> list[Tensor]:
    """Plain PyTorch, fp32 maths (float64 stays float64): ``[y, [Σy; Σy²]]``."""
    a = prologue_forward(x, scale, shift, activation)
    return conv_outputs(F.conv2d(a, weight.to(x.dtype).to(a.dtype)), x, statistics)


def conv1x1_bn_stats_backward_reference(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation) -> list[Tensor]:
    """``[dx, d_weight, (d_affine)]``, d_affine = [d_scale; d_shift] (2, C_in): the statistics' gradients fold into
    dy, then two GEMMs."""
    a = prologue_forward(x, scale, shift, activation)
    dtype = a.dtype
    grad = folded_output_grad(dy, d_sum, d_sumsq, y, dtype)
    c_out, c_in = weight.shape[:2]
    grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, c_out)
    d_weight = (grad_rows.t() @ a.permute(0, 2, 3, 1).reshape(-1, c_in)).view_as(weight).to(weight.dtype)
    d_a = F.conv2d(grad, weight.to(x.dtype).to(dtype).transpose(0, 1))
    dx, *d_affine = prologue_backward(d_a, x, scale, shift, activation)
    return [dx, d_weight, torch.stack(d_affine)] if d_affine else [dx, d_weight]


def conv1x1_bn_stats_library(x, weight, scale, shift, activation, statistics=True) -> list[Tensor]:
    """The unfused library path (ATen's conv: cuBLAS/cuDNN on a GPU) in x's dtype, statistics of the stored y."""
    y = F.conv2d(prologue_forward(x, scale, shift, activation).to(x.dtype), weight.to(x.dtype))
    return conv_outputs(y, x, statistics)


def _triton_reasons(x, weight, scale, shift, activation, *_) -> list[str]:
    reasons = backends.triton_reasons(x, weight, scale, shift)
    if x.dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


def _triton_backward_reasons(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation) -> list[str]:
    return _triton_reasons(x, weight, scale, shift, activation) + backends.triton_reasons(dy, d_sum, d_sumsq, y)


def _library_reasons(x, *args) -> list[str]:
    return backends.library_reasons(x)


def _triton_forward(x, weight, scale, shift, activation, statistics=True) -> list[Tensor]:
    from spinenet_fast.kernels.conv1x1 import conv1x1_bn_stats_forward

    return conv1x1_bn_stats_forward(x, weight, scale, shift, activation, statistics=statistics)


def _into_triton(x, weight, scale, shift, activation, stats) -> Tensor:
    from spinenet_fast.kernels.conv1x1 import conv1x1_bn_stats_forward

    return conv1x1_bn_stats_forward(x, weight, scale, shift, activation, stats)[0]


def _fake(x, weight, scale, shift, activation, statistics=True):
    return fake_conv_outputs(x, weight, x.shape[2], x.shape[3], statistics)


@op_spec.custom_op(
    "conv1x1_bn_stats",
    fake=_fake,
    implementations={
        "reference": Backend(conv1x1_bn_stats_reference),
        "cuda": Backend(conv1x1_bn_stats_library, _library_reasons),
        "triton": Backend(_triton_forward, _triton_reasons),
    },
    auto_order=FUSED_FIRST,  # the fused prologue/epilogue first
)
def _conv1x1_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, statistics: bool = True
) -> tuple[Tensor, Tensor]:
    """``(y, [Σy; Σy²])`` (without ``statistics``: ``(y, no_statistics)``)."""


@op_spec.custom_op(
    "conv1x1_bn_stats_into",
    fake=lambda *args: _fake(*args[:-1])[0],
    implementations={
        "reference": Backend(accumulating(conv1x1_bn_stats_reference)),
        "cuda": Backend(accumulating(conv1x1_bn_stats_library), _library_reasons),
        "triton": Backend(_into_triton, lambda *args: _triton_reasons(*args[:-1])),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("stats",),
)
def _conv1x1_into_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, stats: Tensor
) -> Tensor:
    """The same op adding its statistics into a caller's zeroed ``stats`` (y only), so that several ops share one
    fill (``conv1x1_bn`` inside a connection)."""


@op_spec.custom_op(
    "conv1x1_bn_stats_backward",
    fake=lambda dy, d_sum, d_sumsq, y, x, weight, scale, *_: fake_conv_grads(x, weight, scale),
    implementations={
        "reference": Backend(conv1x1_bn_stats_backward_reference),
        # ATen's GEMMs (cuBLAS on a GPU) around the elementwise steps, as fused_ops.md §3 allows.
        "cuda": Backend(conv1x1_bn_stats_backward_reference, _library_reasons),
        "triton": Backend(kernel("conv1x1_backward", "conv1x1_bn_stats_backward"), _triton_backward_reasons),
    },
    auto_order=FUSED_FIRST,
)
def _conv1x1_backward_op(
    dy: Tensor, d_sum: Tensor | None, d_sumsq: Tensor | None, y: Tensor, x: Tensor, weight: Tensor,
    scale: Tensor | None, shift: Tensor | None, activation: str,
) -> TensorList:  # fmt: skip
    """``[dx, dW, ([d_scale; d_shift])]``. ``y`` must be the forward's output for these x, W, scale and shift: the
    Triton kernel recomputes it where every input channel fits one tile, instead of reading it. ``d_sum``,
    ``d_sumsq`` None: the statistics have no gradient, and y is not read."""


def _triton_backward_into_reasons(dy, x, weight, scale, shift, activation, *_) -> list[str]:
    return _triton_reasons(x, weight, scale, shift, activation) + backends.triton_reasons(dy)


def _backward_into_triton(dy, x, weight, scale, shift, activation, d_affine_out, d_weight_out):
    from spinenet_fast.kernels.conv1x1_backward import conv1x1_bn_stats_backward

    weight_grad = None if d_weight_out is None else d_weight_out.view(weight.shape[:2])
    dx, d_weight = conv1x1_bn_stats_backward(dy, None, None, dy, x, weight, scale, shift, activation, None,
                                             d_affine_out, weight_grad)  # fmt: skip
    return dx, d_weight


@op_spec.custom_op(
    "conv1x1_bn_stats_backward_into",
    fake=fake_backward_into,
    implementations={
        "reference": Backend(added_into_buffers(conv1x1_bn_stats_backward_reference)),
        "cuda": Backend(added_into_buffers(conv1x1_bn_stats_backward_reference), lambda dy, x, *_: _library_reasons(x)),
        "triton": Backend(_backward_into_triton, _triton_backward_into_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("d_affine_out", "d_weight_out"),
)
def _conv1x1_backward_into_op(
    dy: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str,
    d_affine_out: Tensor | None, d_weight_out: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The backward of the op without statistics (none to differentiate: y is neither saved nor read) into the
    caller's zeroed buffers: ``(dx, dW)``, the prologue's [d_scale; d_shift] added into ``d_affine_out`` (given
    wherever there is a prologue), dW into ``d_weight_out`` where given (dW then an empty stand-in)."""


class _Conv1x1IntoBuffers(torch.autograd.Function):
    """``conv1x1_bn_stats(statistics=False)`` whose backward adds the prologue's gradients and dW into the caller's
    zeroed buffers (slices of one fill that several ops share) instead of filling its own."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, activation, prologue_grad, weight_grad):
        ctx.activation = activation
        return into_buffers_forward(ctx, _conv1x1_op, (activation, False), x, weight, scale, shift, prologue_grad,
                                    weight_grad)  # fmt: skip

    @staticmethod
    def backward(ctx, dy):
        return *into_buffers_backward(ctx, _conv1x1_backward_into_op, (ctx.activation,), dy), None, None, None


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # None for an output without a gradient: zeros only where a kernel needs them
    x, weight, scale, shift, activation = inputs[:5]  # (a trailing default argument may be left out)
    ctx.has_prologue, ctx.activation = scale is not None, activation
    ctx.save_for_backward(output[0], x, weight, *((scale, shift) if scale is not None else ()))


def _backward(ctx, dy, d_stats):
    y, x, weight, *affine = ctx.saved_tensors
    scale, shift = affine if ctx.has_prologue else (None, None)
    dy, d_sum, d_sumsq = fill_output_grads(dy, d_stats, y.shape, x)
    grads = _conv1x1_backward_op(dy, d_sum, d_sumsq, y, x, weight, scale, shift, ctx.activation)
    return (*grads[:2], *(grads[2].unbind() if ctx.has_prologue else (None, None)), None, None)


_conv1x1_op.register_autograd(_backward, setup_context=_setup_context)


def conv1x1_bn_stats(
    x: Tensor, weight: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, activation: str = "identity",
    *, statistics: bool = True, prologue_grad_buffer: Tensor | None = None, weight_grad_buffer: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Fused 1×1 conv with prologue and statistics epilogue (see the module docstring); checks arguments first.
    ``statistics=False`` (a conv whose BN normalises with running statistics, or one without BN) takes none:
    ``(y, None)``, no fill, no reductions, and its backward neither reads y nor fills a gradient for them. Then
    ``prologue_grad_buffer`` (a zeroed (2, C_in) tensor of x's statistics dtype) and ``weight_grad_buffer`` (a zeroed
    float32 tensor laid out as the dense fp32 weight) may be given: the first backward adds the prologue's
    [d_scale; d_shift] and dW into them (slices of one fill that several ops share) rather than filling its own."""
    check_conv1x1_args(x, weight, scale, shift, activation)
    check_statistics_flag(statistics)
    if prologue_grad_buffer is not None or weight_grad_buffer is not None:
        check_buffers_without_statistics(statistics)
        check_grad_buffers(x, weight, scale, prologue_grad_buffer, weight_grad_buffer)
        y = _Conv1x1IntoBuffers.apply(x, weight, scale, shift, activation, prologue_grad_buffer, weight_grad_buffer)
        return y, None
    y, stats = _conv1x1_op(x, weight, scale, shift, activation, statistics)
    return y, stats if statistics else None
