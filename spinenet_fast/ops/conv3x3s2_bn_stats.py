"""``conv3x3s2_bn_stats``: ``y = conv3x3/s2(act(scale·x + shift))`` plus fp32 [Σy; Σy²] (2, C_out) — equivalent to::

    F.conv2d(F.pad(act(scale[:, None, None] * x + shift[:, None, None]), pads), weight, stride=2)

``weight`` is in x's dtype, or the fp32 master weight of a bf16/fp16 x (rounded to x's dtype as it is used, as
autocast rounds it). ``padding`` is ``"torch"`` (1 each side) or ``"tf_same"`` (0 before, 1 after), for inputs whose H
and W are even. Tensors are (N, C, H, W), any memory format; outputs are channels_last.
The reference materialises the activation and runs ATen's conv in fp32 maths: the CPU path and the test oracle. The
op runs as a Triton implicit GEMM with the prologue and statistics fused, or (``cuda``) as cuDNN on the materialised
input in the storage dtype (fused_ops.md §3: benchmark both, keep the faster). Its backward recomputes the
activation (not the conv): two Triton implicit GEMMs (dgrad, wgrad) with BN's and the prologue's backward inside
them, or (``cuda``) ATen's conv backward between the elementwise steps.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .checks import describe
from .conv_common import (
    accumulating,
    check_stride2_input,
    conv_outputs,
    fake_conv_grads,
    fake_conv_outputs,
    fill_output_grads,
    folded_output_grad,
    prologue_backward,
    prologue_forward,
)
from .padding import crop_window, pad_window, spatial_padding
from .schema_types import TensorList


def check_conv3x3s2_args(x, weight, scale, shift, activation, padding) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one 3×3/s2 conv."""
    check_stride2_input("x", x, scale, shift, activation, padding)
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else (x.dtype,)
    if not isinstance(weight, Tensor) or weight.shape[1:] != (x.shape[1], 3, 3) or weight.dtype not in allowed:
        expected = " or ".join(map(str, allowed))
        raise ValueError(f"weight must be a {expected} (C_out, {x.shape[1]}, 3, 3) tensor, got {describe(weight)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device} like x, got {weight.device}")


def conv3x3s2_bn_stats_reference(x, weight, scale, shift, activation, padding) -> list[Tensor]:
    """``[y, [Σy; Σy²]]`` with ATen's conv on the materialised activation (fp32 maths)."""
    a = prologue_forward(x, scale, shift, activation)
    return conv_outputs(F.conv2d(pad_window(a, padding, 0.0), weight.to(x.dtype).to(a.dtype), stride=2), x)


def _conv_input(a: Tensor, padding: str) -> tuple[Tensor, list[int]]:
    """The conv's input and its ``padding`` argument: symmetric padding is the conv's own (no padded copy);
    TF ``SAME``'s asymmetric padding is materialised."""
    before, after = spatial_padding(3, 2, padding)
    return (a, [before, before]) if before == after else (pad_window(a, padding, 0.0), [0, 0])


def conv3x3s2_bn_stats_library(x, weight, scale, shift, activation, padding) -> list[Tensor]:
    """cuDNN (ATen's conv) on the materialised activation in x's dtype; statistics of the stored y."""
    a, pads = _conv_input(prologue_forward(x, scale, shift, activation).to(x.dtype), padding)
    return conv_outputs(F.conv2d(a, weight.to(x.dtype), stride=2, padding=pads), x)


backends.register("conv3x3s2_bn_stats", "reference", lambda *args: [])(conv3x3s2_bn_stats_reference)
backends.register("conv3x3s2_bn_stats", "cuda", lambda x, *args: backends.library_reasons(x))(
    conv3x3s2_bn_stats_library
)
# Until a GPU benchmark decides between the implicit GEMM and cuDNN on a materialised input (fused_ops.md §3).
backends.set_auto_order("conv3x3s2_bn_stats", ("triton", "cuda", "reference"))


def _conv_triton_reasons(x, weight, scale, shift, activation, padding) -> list[str]:
    reasons = backends.triton_reasons(x, weight, scale, shift)
    if x.dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


@backends.register("conv3x3s2_bn_stats", "triton", _conv_triton_reasons)
def _conv3x3s2_triton(x, weight, scale, shift, activation, padding) -> list[Tensor]:
    from spinenet_fast.kernels.conv3x3s2 import conv3x3s2_bn_stats_forward

    return conv3x3s2_bn_stats_forward(x, weight, scale, shift, activation, spatial_padding(3, 2, padding)[0])


# conv3x3s2_bn_stats_into: as conv1x1_bn_stats_into, for conv3x3s2_bn.
backends.register("conv3x3s2_bn_stats_into", "reference", lambda *args: [])(accumulating(conv3x3s2_bn_stats_reference))
backends.register("conv3x3s2_bn_stats_into", "cuda", lambda x, *args: backends.library_reasons(x))(
    accumulating(conv3x3s2_bn_stats_library)
)
backends.set_auto_order("conv3x3s2_bn_stats_into", ("triton", "cuda", "reference"))


@backends.register("conv3x3s2_bn_stats_into", "triton", lambda *args: _conv_triton_reasons(*args[:-1]))
def _conv3x3s2_into_triton(x, weight, scale, shift, activation, padding, stats) -> Tensor:
    from spinenet_fast.kernels.conv3x3s2 import conv3x3s2_bn_stats_forward

    pad_before = spatial_padding(3, 2, padding)[0]
    return conv3x3s2_bn_stats_forward(x, weight, scale, shift, activation, pad_before, stats)[0]


@torch.library.custom_op("spinenet_fast::conv3x3s2_bn_stats_into", mutates_args=("stats",))
def _conv3x3s2_into_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str,
    stats: Tensor,
) -> Tensor:  # fmt: skip
    return backends.run("conv3x3s2_bn_stats_into", x, weight, scale, shift, activation, padding, stats)


@_conv3x3s2_into_op.register_fake
def _(x, weight, scale, shift, activation, padding, stats):
    return fake_conv_outputs(x, weight, x.shape[2] // 2, x.shape[3] // 2)[0]


def _library_conv_backward(grad: Tensor, a: Tensor, weight: Tensor, padding: str) -> tuple[Tensor, Tensor]:
    """ATen's (cuDNN's) 3×3/s2 conv backward: ``(d_a, d_weight)`` for the unpadded activation a, in a's dtype;
    d_weight laid out as ``weight`` (ATen follows a channels_last a; the parameter's gradient takes the weight's
    strides in any case, so the copy is the one autograd would make)."""
    a, pads = _conv_input(a, padding)
    d_a, d_w, _ = torch.ops.aten.convolution_backward(
        grad, a, weight.to(a.dtype), None, [2, 2], pads, [1, 1], False, [0, 0], 1, [True, True, False]
    )
    if d_w.stride() != weight.stride():
        d_w = torch.empty_like(weight, dtype=d_w.dtype).copy_(d_w)
    return (d_a if pads[0] else crop_window(d_a, padding)), d_w


def conv3x3s2_bn_stats_backward_reference(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding):
    """``[dx, d_weight, (d_affine)]``, d_affine = [d_scale; d_shift] (2, C_in): statistics' gradients folded into dy
    (with the saved y, the tensor the statistics were taken of), then ATen's conv backward, in fp32 maths."""
    a = prologue_forward(x, scale, shift, activation)
    dtype = a.dtype
    grad = folded_output_grad(dy, d_sum, d_sumsq, y, dtype)
    d_a, d_w = _library_conv_backward(grad, a, weight.to(x.dtype), padding)  # the weight rounded as the forward's
    dx, *d_affine = prologue_backward(d_a, x, scale, shift, activation)
    return [dx, d_w.to(weight.dtype), torch.stack(d_affine)] if d_affine else [dx, d_w.to(weight.dtype)]


def _conv3x3s2_backward_triton(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, bn=None,
                               d_affine=None, d_weight=None):  # fmt: skip
    """The Triton dgrad and wgrad implicit GEMMs in one launch (``kernels/conv3x3s2_backward.py``); ``bn``
    (``conv3x3s2_bn``): d_sum, d_sumsq are the gradients of the BN's scale and shift, [dγ; dβ] appended;
    ``d_affine``/``d_weight``: zeroed buffers the prologue's gradients / dW are added into (then not returned)."""
    from spinenet_fast.kernels.conv3x3s2_backward import conv3x3s2_bn_stats_backward

    pad_before = spatial_padding(3, 2, padding)[0]
    return conv3x3s2_bn_stats_backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, pad_before, bn,
                                       d_affine, d_weight)  # fmt: skip


def _conv_backward_triton_reasons(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding) -> list[str]:
    return _conv_triton_reasons(x, weight, scale, shift, activation, padding) + backends.triton_reasons(dy, y)


backends.register("conv3x3s2_bn_stats_backward", "reference", lambda *args: [])(conv3x3s2_bn_stats_backward_reference)
backends.register("conv3x3s2_bn_stats_backward", "cuda", lambda dy, *args: backends.library_reasons(dy))(
    conv3x3s2_bn_stats_backward_reference
)
backends.register("conv3x3s2_bn_stats_backward", "triton", _conv_backward_triton_reasons)(_conv3x3s2_backward_triton)
backends.set_auto_order("conv3x3s2_bn_stats_backward", ("triton", "cuda", "reference"))


@torch.library.custom_op("spinenet_fast::conv3x3s2_bn_stats", mutates_args=())
def _conv3x3s2_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str
) -> tuple[Tensor, Tensor]:
    args = (x, weight, scale, shift, activation, padding)
    return tuple(backends.run("conv3x3s2_bn_stats", *args))


@_conv3x3s2_op.register_fake
def _(x, weight, scale, shift, activation, padding):
    return fake_conv_outputs(x, weight, x.shape[2] // 2, x.shape[3] // 2)


@torch.library.custom_op("spinenet_fast::conv3x3s2_bn_stats_backward", mutates_args=())
def _conv3x3s2_backward_op(
    dy: Tensor, d_sum: Tensor, d_sumsq: Tensor, y: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None,
    shift: Tensor | None, activation: str, padding: str,
) -> TensorList:  # fmt: skip
    args = (dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding)
    return backends.run("conv3x3s2_bn_stats_backward", *args)


@_conv3x3s2_backward_op.register_fake
def _(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding):
    return fake_conv_grads(x, weight, scale)


def _conv_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # None for an output without a gradient: zeros only where a kernel needs them
    x, weight, scale, shift, activation, padding = inputs
    ctx.has_prologue, ctx.activation, ctx.padding = scale is not None, activation, padding
    ctx.save_for_backward(output[0], x, weight, *((scale, shift) if scale is not None else ()))


def _conv_backward(ctx, dy, d_stats):
    y, x, weight, *affine = ctx.saved_tensors
    scale, shift = affine if ctx.has_prologue else (None, None)
    dy, d_sum, d_sumsq = fill_output_grads(dy, d_stats, y.shape, x)
    grads = _conv3x3s2_backward_op(dy, d_sum, d_sumsq, y, x, weight, scale, shift, ctx.activation, ctx.padding)
    return (*grads[:2], *(grads[2].unbind() if ctx.has_prologue else (None, None)), None, None)


_conv3x3s2_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def conv3x3s2_bn_stats(
    x: Tensor, weight: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, activation: str = "identity",
    padding: str = "torch",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """3×3 stride-2 conv of ``act(scale·x + shift)`` with BN statistics (see the module docstring)."""
    check_conv3x3s2_args(x, weight, scale, shift, activation, padding)
    return _conv3x3s2_op(x, weight, scale, shift, activation, padding)
