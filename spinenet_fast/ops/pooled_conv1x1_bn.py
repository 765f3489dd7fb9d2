"""``pooled_conv1x1_bn``: ``bn_act_maxpool`` then ``conv1x1_bn`` as one autograd op — the expand conv of a
downsampling connection with max-pools. Equivalent to::

    pooled = bn_act_maxpool(x, scale, shift, activation, num_pools, padding)
    y, out_scale, out_shift = conv1x1_bn(pooled, weight, bn_weight=..., ...)

x: (N, C_in, H, W), H and W multiples of 2^num_pools, the raw output of the previous conv, whose BN is
``scale``/``shift`` (fp32 (C_in,), required); y: (N, C_out, H/2^L, W/2^L) channels_last. On Triton the training
forward is one launch: the 1×1 GEMM's prologue max-pools as it loads (``kernels/maxpool_prologue.py``), the programs
of its first output-channel tile store the pooled tensor and its route for the backward, and its last program
finalizes the BN. Elsewhere the max-pool op and the 1×1 conv + BN run in turn. The backward is ``conv1x1_bn``'s on
the pooled tensor, then the max-pools' one-pass gather, which adds [d_scale; d_shift] into ``prologue_grad_buffer``.
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .bn_act_maxpool import _maxpool_backward_into_op, check_pool_input
from .conv1x1_bn import _conv1x1_bn_backward_op
from .conv1x1_bn_stats import _triton_reasons, check_conv1x1_args
from .conv_bn import (
    checked_bn_args,
    conv_bn_backward,
    conv_bn_forward,
    fake_train_forward,
    train_forward_implementations,
)
from .conv_common import CHANNELS_LAST
from .op_spec import FUSED_FIRST, Backend
from .padding import spatial_padding


def _composed(backend: str) -> Backend:
    """``backend``'s pooled conv as its max-pool op (with the route) then its 1×1 conv."""

    def run(x, weight, scale, shift, activation, num_pools, padding, stats) -> tuple[Tensor, Tensor, Tensor]:
        pooled, route = backends.implementation("bn_act_maxpool", backend)(x, scale, shift, activation, num_pools,
                                                                          padding, True)  # fmt: skip
        y = backends.implementation("conv1x1_bn_stats_into", backend)(pooled, weight, None, None, "identity", stats)
        return y, pooled, route

    def reasons(x, weight, scale, shift, activation, num_pools, padding, stats) -> list[str]:
        by_backend = backends.reasons_by_backend
        pool = by_backend("bn_act_maxpool", x, scale, shift, activation, num_pools, padding, True)[backend]
        return pool + by_backend("conv1x1_bn_stats_into", x, weight, None, None, "identity", stats)[backend]

    return Backend(run, reasons)


def _triton_forward(x, weight, scale, shift, activation, num_pools, padding, stats, finalize=None) -> tuple:
    from spinenet_fast.kernels.conv1x1 import pooled_conv1x1_bn_stats_forward

    before = spatial_padding(3, 2, padding)[0]
    y, _, pooled, route = pooled_conv1x1_bn_stats_forward(x, weight, scale, shift, activation, num_pools, before,
                                                          stats, finalize, True)  # fmt: skip
    return y, pooled, route


def _fake_outputs(x: Tensor, weight: Tensor, num_pools: int) -> tuple[Tensor, Tensor, Tensor]:
    n, c, h, w = x.shape[0], x.shape[1], x.shape[2] >> num_pools, x.shape[3] >> num_pools
    y = torch.empty((n, weight.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
    pooled = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
    route = torch.empty((n, c, h, w), dtype=torch.int32, device=x.device, memory_format=CHANNELS_LAST)
    return y, pooled, route


@op_spec.custom_op(
    "pooled_conv1x1_bn_stats_into",
    fake=lambda x, weight, scale, shift, activation, num_pools, *_: _fake_outputs(x, weight, num_pools),
    implementations={
        "reference": _composed("reference"),
        "cuda": _composed("cuda"),
        "triton": Backend(_triton_forward, lambda *args: _triton_reasons(*args[:5])),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("stats",),
)
def _pooled_into_op(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, activation: str, num_pools: int, padding: str,
    stats: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, pooled, route)``, [Σy; Σy²] added into ``stats``."""


def _fake_forward(x, weight, scale, shift, activation, num_pools, padding, stats, counter, count, bn_weight, *_):
    y, pooled, route = _fake_outputs(x, weight, num_pools)
    y, *bn = fake_train_forward(y, stats, bn_weight)
    return y, pooled, route, *bn


@op_spec.custom_op(
    "pooled_conv1x1_bn_forward",
    fake=_fake_forward,
    implementations=train_forward_implementations("pooled_conv1x1_bn_stats_into", 3, _triton_forward),
    auto_order=FUSED_FIRST,
    mutates_args=("stats", "counter", "running_mean", "running_var", "batches"),
)
def _pooled_forward_op(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, activation: str, num_pools: int, padding: str,
    stats: Tensor, counter: Tensor, count: int, bn_weight: Tensor, bn_bias: Tensor, eps: float,
    running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, momentum: float, unbias: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The training forward: ``(y, pooled, route, out_scale, out_shift, mean, var)``, statistics added into
    ``stats``, the running statistics and ``batches`` updated."""


class _PooledConv1x1BN(torch.autograd.Function):
    """A Function around the custom ops, as ``conv1x1_bn``'s; saves the pooled tensor and its route."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, bn_weight, bn_bias, activation, num_pools, padding, *bn):
        outputs = conv_bn_forward(ctx, _pooled_into_op, _pooled_forward_op, (activation, num_pools, padding), x,
                                  weight, scale, shift, bn_weight, bn_bias, *bn, side_outputs=2)  # fmt: skip
        ctx.conv_args, ctx.pools = ("identity",), (activation, num_pools, padding)  # the GEMM's input is pooled
        return outputs

    @staticmethod
    def backward(ctx, dy, d_scale, d_shift):
        saved = ctx.saved_tensors
        _, x, _, scale, shift, *_, pooled, route = saved
        affine_grad, ctx.prologue_grad = ctx.prologue_grad, None
        d_pooled, d_weight, _, _, d_gamma, d_beta = conv_bn_backward(
            ctx, _conv1x1_bn_backward_op, dy, d_scale, d_shift, conv_input=(pooled, None, None), saved=saved
        )
        if affine_grad is None:
            affine_grad = torch.zeros((2, x.shape[1]), dtype=scale.dtype, device=x.device)
        with backends.auto_where_unimplemented("bn_act_maxpool_backward_into"):
            dx = _maxpool_backward_into_op(d_pooled, x, route, scale, shift, *ctx.pools, affine_grad)
        return dx, d_weight, *affine_grad.unbind(), d_gamma, d_beta, *(None,) * 15


def pooled_conv1x1_bn(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    activation: str,
    num_pools: int,
    padding: str = "torch",
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
    """``(y, out_scale, out_shift)`` of the 1×1 conv + training-mode BN of ``num_pools`` max-pools of
    act(scale·x + shift) (see the module docstring); keyword arguments as ``conv1x1_bn``'s, ``prologue_grad_buffer``
    receiving the max-pools' [d_scale; d_shift]. Checks arguments first."""
    check_pool_input("x", x, scale, shift, activation, num_pools, padding)
    if scale is None:
        raise ValueError("pooled_conv1x1_bn needs scale and shift (the BN of the max-pools' input), got None")
    check_conv1x1_args(x, weight, scale, shift, activation)
    pixels = x.shape[0] * (x.shape[2] >> num_pools) * (x.shape[3] >> num_pools)
    bn = checked_bn_args(
        x, weight, pixels, bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum,
        upsample_factor, process_group, stats_buffer, counter_buffer, prologue_grad_buffer, weight_grad_buffer,
    )  # fmt: skip
    return _PooledConv1x1BN.apply(x, weight, scale, shift, bn_weight, bn_bias, activation, num_pools, padding, *bn)
