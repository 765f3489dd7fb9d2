"""``conv3x3s2_bn``: ``conv3x3s2_bn_stats`` and the training-mode BN of its output as one autograd op (``conv_bn``).

Equivalent to::

    y, stats = conv3x3s2_bn_stats(x, weight, scale, shift, activation, padding)
    out_scale, out_shift = bn_finalize(stats, pixels, bn_weight, bn_bias, eps=eps, running_mean=..., ...)

returning ``(y, out_scale, out_shift)`` — on Triton in one launch, the implicit GEMM's last program finalizing the
BN. Its backward is the 3×3 op's two implicit GEMMs, which compute the statistics' gradients from those of
``out_scale``/``out_shift`` as they load dy; the dgrad stores dγ, dβ.
"""

import torch
from torch import Tensor

from . import backends
from .conv3x3s2_bn_stats import (
    _conv3x3s2_backward_triton,
    _conv3x3s2_into_op,
    _conv_backward_triton_reasons,
    check_conv3x3s2_args,
    conv3x3s2_bn_stats_backward_reference,
)
from .conv_bn import (
    checked_bn_args,
    conv_bn_backward,
    conv_bn_forward,
    fake_train_forward,
    train_forward_backends,
    with_bn_backward,
)
from .conv_common import fake_conv_grads, fake_conv_outputs
from .padding import spatial_padding

conv3x3s2_bn_backward_reference = with_bn_backward(conv3x3s2_bn_stats_backward_reference)


def _triton_reasons(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, bn_weight, mean, var, *_):
    reasons = _conv_backward_triton_reasons(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding)
    return reasons + backends.triton_reasons(bn_weight, mean, var)


backends.register("conv3x3s2_bn_backward", "reference", lambda *args: [])(conv3x3s2_bn_backward_reference)
backends.register("conv3x3s2_bn_backward", "cuda", lambda dy, *args: backends.library_reasons(dy))(
    conv3x3s2_bn_backward_reference
)
backends.set_auto_order("conv3x3s2_bn_backward", ("triton", "cuda", "reference"))


@backends.register("conv3x3s2_bn_backward", "triton", _triton_reasons)
def _conv3x3s2_bn_backward_triton(
    dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, bn_weight, mean, var, count, eps,
    d_affine_out, d_weight_out,
) -> list[Tensor]:  # fmt: skip
    bn = (bn_weight, mean, var, count, eps)
    return _conv3x3s2_backward_triton(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, bn,
                                      d_affine_out, d_weight_out)  # fmt: skip


@torch.library.custom_op("spinenet_fast::conv3x3s2_bn_backward", mutates_args=("d_affine_out", "d_weight_out"))
def _conv3x3s2_bn_backward_op(
    dy: Tensor, d_scale: Tensor, d_shift: Tensor, y: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None,
    shift: Tensor | None, activation: str, padding: str, bn_weight: Tensor, mean: Tensor, var: Tensor, count: int,
    eps: float, d_affine_out: Tensor | None, d_weight_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """As ``conv1x1_bn``'s backward op."""
    args = (dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, bn_weight, mean, var, count, eps)
    return tuple(backends.run("conv3x3s2_bn_backward", *args, d_affine_out, d_weight_out))


@_conv3x3s2_bn_backward_op.register_fake
def _(dy, d_scale, d_shift, y, x, weight, scale, shift, activation, padding, bn_weight, mean, var, count, eps,
      d_affine_out, d_weight_out):  # fmt: skip
    dx, d_weight = fake_conv_grads(x, weight, None)
    return dx, d_weight if d_weight_out is None else d_weight.new_empty(0), bn_weight.new_empty((2, *bn_weight.shape))


def _conv3x3s2_triton_train(x, weight, scale, shift, activation, padding, stats, finalize) -> Tensor:
    from spinenet_fast.kernels.conv3x3s2 import conv3x3s2_bn_stats_forward

    pad_before = spatial_padding(3, 2, padding)[0]
    return conv3x3s2_bn_stats_forward(x, weight, scale, shift, activation, pad_before, stats, finalize)[0]


train_forward_backends("conv3x3s2_bn_forward", "conv3x3s2_bn_stats_into", 2, _conv3x3s2_triton_train)


@torch.library.custom_op(
    "spinenet_fast::conv3x3s2_bn_forward", mutates_args=("stats", "counter", "running_mean", "running_var", "batches")
)
def _conv3x3s2_bn_forward_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str,
    stats: Tensor, counter: Tensor, count: int, bn_weight: Tensor, bn_bias: Tensor, eps: float,
    running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, momentum: float, unbias: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The training forward, as ``conv1x1_bn``'s."""
    args = (x, weight, scale, shift, activation, padding, stats, counter, count, bn_weight, bn_bias, eps,
            running_mean, running_var, batches, momentum, unbias)  # fmt: skip
    return tuple(backends.run("conv3x3s2_bn_forward", *args))


@_conv3x3s2_bn_forward_op.register_fake
def _(x, weight, scale, shift, activation, padding, stats, *_):
    return fake_train_forward(fake_conv_outputs(x, weight, x.shape[2] // 2, x.shape[3] // 2)[0], stats)


class _Conv3x3s2BN(torch.autograd.Function):
    """A Function around the custom ops, as ``conv1x1_bn``'s."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, bn_weight, bn_bias, activation, padding, *bn):
        conv_args = (activation, padding)
        return conv_bn_forward(ctx, _conv3x3s2_into_op, _conv3x3s2_bn_forward_op, conv_args, x,
                               weight, scale, shift, bn_weight, bn_bias, *bn)  # fmt: skip

    @staticmethod
    def backward(ctx, dy, d_scale, d_shift):
        return *conv_bn_backward(ctx, _conv3x3s2_bn_backward_op, dy, d_scale, d_shift), *(None,) * 14


def conv3x3s2_bn(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str = "identity",
    padding: str = "torch",
    *,
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, out_scale, out_shift)`` (see the module docstring and ``conv1x1_bn``'s); checks arguments first."""
    check_conv3x3s2_args(x, weight, scale, shift, activation, padding)
    pixels = x.shape[0] * (x.shape[2] // 2) * (x.shape[3] // 2)
    bn = checked_bn_args(
        x, weight, pixels, bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum,
        1, process_group, stats_buffer, counter_buffer, prologue_grad_buffer, weight_grad_buffer,
    )  # fmt: skip
    return _Conv3x3s2BN.apply(x, weight, scale, shift, bn_weight, bn_bias, activation, padding, *bn)
