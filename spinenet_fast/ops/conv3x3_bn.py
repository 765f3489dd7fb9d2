"""``conv3x3_bn``: ``conv3x3_bn_stats`` and the training-mode BN of its output as one autograd op (``conv_bn``).

Equivalent to::

    y, stats = conv3x3_bn_stats(x, weight, scale, shift, activation, padding, stride=stride)
    out_scale, out_shift = bn_finalize(stats, pixels, bn_weight, bn_bias, eps=eps, running_mean=..., ...)

returning ``(y, out_scale, out_shift)`` — on Triton in one launch, the implicit GEMM's last program finalizing the
BN. Its backward is the 3×3 op's two implicit GEMMs, which compute the statistics' gradients from those of
``out_scale``/``out_shift`` as they load dy; the dgrad stores dγ, dβ.
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .activation import stats_dtype
from .checks import check_accumulator
from .conv3x3_bn_stats import (
    _conv3x3_backward_triton,
    _conv3x3_into_op,
    _conv_backward_triton_reasons,
    _library_backward_reasons,
    check_conv3x3_args,
    conv3x3_bn_stats_backward_library,
    conv3x3_bn_stats_backward_reference,
    pad_before,
    triton_conv3x3_forward,
)
from .conv_bn import (
    checked_bn_args,
    conv_bn_backward,
    conv_bn_forward,
    fake_conv_bn_backward,
    fake_train_forward,
    train_forward_implementations,
    with_bn_backward,
)
from .conv_common import fake_conv_outputs
from .op_spec import FUSED_FIRST, Backend

conv3x3_bn_backward_reference = with_bn_backward(conv3x3_bn_stats_backward_reference)
_conv3x3_bn_backward_library = with_bn_backward(conv3x3_bn_stats_backward_library)


def _triton_reasons(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, stride, d_bias_out,
                    input_grad, bn_weight, mean, var, *_):  # fmt: skip
    reasons = _conv_backward_triton_reasons(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding,
                                            stride)  # fmt: skip
    return reasons + backends.triton_reasons(bn_weight, mean, var)


def _backward_triton(
    dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, stride, d_bias_out, input_grad, bn_weight,
    mean, var, count, eps, d_affine_out, d_weight_out,
) -> list[Tensor]:  # fmt: skip
    bn = (bn_weight, mean, var, count, eps)
    return _conv3x3_backward_triton(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, stride,
                                    d_bias_out, bn, d_affine_out, d_weight_out, input_grad)  # fmt: skip


@op_spec.custom_op(
    "conv3x3_bn_backward",
    fake=lambda *args: fake_conv_bn_backward(*args, input_grad=args[12]),
    implementations={
        "reference": Backend(conv3x3_bn_backward_reference),
        "cuda": Backend(_conv3x3_bn_backward_library, _library_backward_reasons),
        "triton": Backend(_backward_triton, _triton_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("d_bias_out", "d_affine_out", "d_weight_out"),
)
def _conv3x3_bn_backward_op(
    dy: Tensor, d_scale: Tensor, d_shift: Tensor, y: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None,
    shift: Tensor | None, activation: str, padding: str, stride: int, d_bias_out: Tensor | None, input_grad: bool,
    bn_weight: Tensor, mean: Tensor, var: Tensor, count: int, eps: float, d_affine_out: Tensor | None,
    d_weight_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """As ``conv1x1_bn``'s backward op; the bias gradient added into ``d_bias_out`` where it is given; without
    ``input_grad`` (a conv without a prologue whose input needs no gradient: the stem's image) dx is not computed
    (an empty (0, 0, 0, 0) stand-in)."""


def _conv3x3_triton_train(x, weight, scale, shift, activation, padding, stride, bias, stats, finalize) -> Tensor:
    pad = pad_before(weight, stride, padding)
    return triton_conv3x3_forward(x, weight, scale, shift, activation, pad, stride, bias, stats, finalize)[0]


def _fake_train_forward(x, weight, scale, shift, activation, padding, stride, bias, stats, counter, count, bn_weight,
                        *_) -> tuple:  # fmt: skip
    y = fake_conv_outputs(x, weight, x.shape[2] // stride, x.shape[3] // stride)[0]
    return fake_train_forward(y, stats, bn_weight)


@op_spec.custom_op(
    "conv3x3_bn_forward",
    fake=_fake_train_forward,
    implementations=train_forward_implementations("conv3x3_bn_stats_into", 4, _conv3x3_triton_train),
    auto_order=FUSED_FIRST,
    mutates_args=("stats", "counter", "running_mean", "running_var", "batches"),
)
def _conv3x3_bn_forward_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str, stride: int,
    bias: Tensor | None, stats: Tensor, counter: Tensor, count: int, bn_weight: Tensor, bn_bias: Tensor, eps: float,
    running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, momentum: float, unbias: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The training forward, as ``conv1x1_bn``'s."""


class _Conv3x3BN(torch.autograd.Function):
    """A Function around the custom ops, as ``conv1x1_bn``'s."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, bn_weight, bn_bias, activation, padding, stride, bias, bias_grad,
                shares_grads, *bn):  # fmt: skip
        conv_args = (activation, padding, stride)
        return conv_bn_forward(ctx, _conv3x3_into_op, _conv3x3_bn_forward_op, conv_args, x, weight, scale, shift,
                               bn_weight, bn_bias, *bn, bias=(bias, bias_grad), shares_grads=shares_grads)  # fmt: skip

    @staticmethod
    def backward(ctx, dy, d_scale, d_shift):
        # x's gradient is computed where x needs one, or for the prologue's gradients
        saved = ctx.saved_tensors
        input_grad = ctx.needs_input_grad[0] or saved[3] is not None
        *grads, d_bias = conv_bn_backward(ctx, _conv3x3_bn_backward_op, dy, d_scale, d_shift, input_grad=input_grad,
                                          saved=saved)  # fmt: skip
        return *grads, None, None, None, d_bias, *(None,) * 14


def conv3x3_bn(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str = "identity",
    padding: str = "torch",
    *,
    stride: int,
    bn_weight: Tensor,
    bn_bias: Tensor,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float = 0.1,
    process_group=None,
    stats_buffer: Tensor | None = None,
    counter_buffer: Tensor | None = None,
    prologue_grad_buffer: Tensor | None = None,
    weight_grad_buffer: Tensor | None = None,
    bias: Tensor | None = None,
    bias_grad_buffer: Tensor | None = None,
    shared_grad_buffers: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, out_scale, out_shift)`` (see the module docstring and ``conv1x1_bn``'s); checks arguments first.
    ``bias``: the conv's (C_out,) bias (its gradient is Σ over pixels of y's, 0 up to rounding in training mode but
    computed); ``bias_grad_buffer``: a zeroed (C_out,) tensor of the statistics' dtype its gradient is added into,
    like ``weight_grad_buffer``. ``shared_grad_buffers``: the weight's and bias' gradients stay in those buffers,
    shared by several calls of one weight (the head's levels), and are returned as None: the caller hands the buffers
    to autograd once (``detection.fused_head.SharedParameter``)."""
    check_conv3x3_args(x, weight, scale, shift, activation, padding, stride, bias)
    pixels = x.shape[0] * (x.shape[2] // stride) * (x.shape[3] // stride)
    bn = checked_bn_args(
        x, weight, pixels, bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum,
        1, process_group, stats_buffer, counter_buffer, prologue_grad_buffer, weight_grad_buffer,
    )  # fmt: skip
    check_accumulator("bias_grad_buffer", bias_grad_buffer, (weight.shape[0],), stats_dtype(x), x.device)
    if bias_grad_buffer is not None and bias is None:
        raise ValueError("bias_grad_buffer was given for a conv without a bias")
    if shared_grad_buffers and (weight_grad_buffer is None or (bias is not None and bias_grad_buffer is None)):
        raise ValueError("shared_grad_buffers needs weight_grad_buffer (and bias_grad_buffer for a bias): the "
                         "gradients are left in them")  # fmt: skip
    return _Conv3x3BN.apply(x, weight, scale, shift, bn_weight, bn_bias, activation, padding, stride, bias,
                            bias_grad_buffer, shared_grad_buffers, *bn)  # fmt: skip
