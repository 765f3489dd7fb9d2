"""``conv1x1_bn``: ``conv1x1_bn_stats`` and the training-mode BN of its output as one autograd op (``conv_bn``).

Equivalent to::

    y, stats = conv1x1_bn_stats(x, weight, scale, shift, activation)
    out_scale, out_shift = bn_finalize(stats, pixels, bn_weight, bn_bias, eps=eps, running_mean=..., ...)

returning ``(y, out_scale, out_shift)`` — on Triton in one launch, the GEMM's last program finalizing the BN. Its
backward is the 1×1 op's two GEMMs, which compute the statistics' gradients from those of ``out_scale``/``out_shift``
as they load dy; the dgrad stores dγ, dβ.
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .conv1x1_bn_stats import (
    _conv1x1_into_op,
    _triton_backward_reasons,
    check_conv1x1_args,
    conv1x1_bn_stats_backward_reference,
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

conv1x1_bn_backward_reference = with_bn_backward(conv1x1_bn_stats_backward_reference)


def _triton_reasons(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, bn_weight, mean, var, *_):
    reasons = _triton_backward_reasons(dy, d_scale, d_shift, y, x, weight, scale, shift, activation)
    return reasons + backends.triton_reasons(bn_weight, mean, var)


def _backward_triton(
    dy, d_scale, d_shift, y, x, weight, scale, shift, activation, bn_weight, mean, var, count, eps, d_affine_out,
    d_weight_out,
) -> list[Tensor]:  # fmt: skip
    from spinenet_fast.kernels.conv1x1_backward import conv1x1_bn_stats_backward

    bn = (bn_weight, mean, var, count, eps)
    weight_grad = None if d_weight_out is None else d_weight_out.view(weight.shape[:2])
    return conv1x1_bn_stats_backward(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, bn, d_affine_out,
                                     weight_grad)  # fmt: skip


@op_spec.custom_op(
    "conv1x1_bn_backward",
    fake=fake_conv_bn_backward,
    implementations={
        "reference": Backend(conv1x1_bn_backward_reference),
        # As for conv1x1_bn_stats: the cuda backend's backward is ATen's GEMMs around the elementwise steps.
        "cuda": Backend(conv1x1_bn_backward_reference, lambda dy, *args: backends.library_reasons(dy)),
        "triton": Backend(_backward_triton, _triton_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("d_affine_out", "d_weight_out"),
)
def _conv1x1_bn_backward_op(
    dy: Tensor, d_scale: Tensor, d_shift: Tensor, y: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None,
    shift: Tensor | None, activation: str, bn_weight: Tensor, mean: Tensor, var: Tensor, count: int, eps: float,
    d_affine_out: Tensor | None, d_weight_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dW, [dγ; dβ])``; the prologue's gradients added into ``d_affine_out``, and dW into ``d_weight_out`` where
    given (a zeroed buffer of the weight's shape and dtype; the dW returned is then an empty stand-in). ``y``: the
    forward's output for these x, W, scale and shift (see ``conv1x1_bn_stats_backward``)."""


def _conv1x1_triton_train(x, weight, scale, shift, activation, stats, finalize) -> Tensor:
    from spinenet_fast.kernels.conv1x1 import conv1x1_bn_stats_forward

    return conv1x1_bn_stats_forward(x, weight, scale, shift, activation, stats, finalize)[0]


@op_spec.custom_op(
    "conv1x1_bn_forward",
    fake=lambda x, weight, scale, shift, activation, stats, counter, count, bn_weight, *_: fake_train_forward(
        fake_conv_outputs(x, weight, x.shape[2], x.shape[3])[0], stats, bn_weight
    ),
    implementations=train_forward_implementations("conv1x1_bn_stats_into", 1, _conv1x1_triton_train),
    auto_order=FUSED_FIRST,
    mutates_args=("stats", "counter", "running_mean", "running_var", "batches"),
)
def _conv1x1_bn_forward_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, stats: Tensor,
    counter: Tensor, count: int, bn_weight: Tensor, bn_bias: Tensor, eps: float, running_mean: Tensor | None,
    running_var: Tensor | None, batches: Tensor | None, momentum: float, unbias: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The training forward: ``(y, out_scale, out_shift, mean, var)``, statistics added into ``stats``, the running
    statistics and ``batches`` updated."""


class _Conv1x1BN(torch.autograd.Function):
    """A Function around the custom ops: the finalize mutates the running statistics, so no custom op's autograd
    formula can hold both."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, bn_weight, bn_bias, activation, *bn):
        return conv_bn_forward(ctx, _conv1x1_into_op, _conv1x1_bn_forward_op, (activation,), x, weight,
                               scale, shift, bn_weight, bn_bias, *bn)  # fmt: skip

    @staticmethod
    def backward(ctx, dy, d_scale, d_shift):
        return *conv_bn_backward(ctx, _conv1x1_bn_backward_op, dy, d_scale, d_shift), *(None,) * 13


def conv1x1_bn(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str = "identity",
    *,
    bn_weight: Tensor,
    bn_bias: Tensor,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float = 0.1,
    upsample_factor: int = 1,
    process_group=None,
    stats_buffer: Tensor | None = None,
    counter_buffer: Tensor | None = None,
    prologue_grad_buffer: Tensor | None = None,
    weight_grad_buffer: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, out_scale, out_shift)`` (see the module docstring); checks arguments first. The running statistics are
    updated where both are given, ``num_batches_tracked`` incremented where given; ``upsample_factor`` ρ: the normalised
    y is later upsampled ×ρ, so the running variance is the unbiased one of n·ρ² values. ``stats_buffer``: a zeroed
    contiguous float64 (2, C_out) tensor the statistics are added into (a slice of one buffer that
    several ops share, zeroed by one fill); None: the op allocates and zeroes its own. ``counter_buffer``: a zeroed
    one-element int32 tensor (int64 for float64 activations) the conv's programs count themselves on, so that the last
    one finalizes the BN (a slice of the same buffer, viewed as an integer); None: allocated with the statistics, or
    zeroed alone if ``stats_buffer`` is given. ``prologue_grad_buffer``: a zeroed (2, C_in) tensor the (first)
    backward adds the prologue's [d_scale; d_shift] into, like ``stats_buffer``."""
    check_conv1x1_args(x, weight, scale, shift, activation)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bn = checked_bn_args(
        x, weight, pixels, bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum,
        upsample_factor, process_group, stats_buffer, counter_buffer, prologue_grad_buffer, weight_grad_buffer,
    )  # fmt: skip
    return _Conv1x1BN.apply(x, weight, scale, shift, bn_weight, bn_bias, activation, *bn)
