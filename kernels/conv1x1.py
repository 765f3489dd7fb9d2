"""Triton GEMM for 1×1 convolutions with a BN-affine + activation prologue and a Σy, Σy² epilogue.

``y[p, o] = Σ_k act(scale[k]·x[p, k] + shift[k]) · W[o, k]`` over pixels p = (n, h, w). x and y are (N, C, H, W)
addressed through their strides (channels_last is the fast layout); W is (C_out, C_in). Accumulation is fp32;
fp32 inputs use IEEE fp32 dot products (no TF32). Each program adds its share of Σy and Σy² (of the stored values)
to one zeroed (2, C_out) buffer (``epilogue.add_tile_moments``). With ``POOLS`` > 0 the prologue also max-pools
(``maxpool_prologue``): x is then the (N, C_in, H0, W0) input of ``POOLS`` chained 3×3/s2 max-pools of
act(scale·x + shift), y is at 1/2^POOLS of its resolution, and the programs of the first output-channel tile store
the pooled tensor and its route (NHWC).
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, apply_activation
from .bn_finalize import Finalize, finalize_when_last
from .epilogue import statistics_buffer, store_tile_and_channel_stats
from .gemm_config import gemm_launch_config
from .maxpool_prologue import pooled_operand


@triton.jit
def _conv1x1_fwd_kernel(
    y_ptr, stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr, bn_var_ptr,
    running_mean_ptr, running_var_ptr, batches_ptr, count, eps, momentum, unbias, x_ptr, w_ptr, scale_ptr, shift_ptr,
    pooled_ptr, route_ptr, P, K, N_OUT, HW, W_IMG, H0, W0,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sw_o, sw_k,
    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, POOLS: tl.constexpr, POOL_PAD: tl.constexpr,
    STORE_POOLED: tl.constexpr, FP32_DOT: tl.constexpr, STATS: tl.constexpr,
    FINALIZE: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M pixels) × (BLOCK_N output channels) tile of y, with ``STATS`` adding its channel sums to the
    stats."""
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
    x_row = n * sx_n + h * sx_h + w * sx_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (p < P)[:, None] & (k < K)[None, :]
        if POOLS > 0:  # always with an affine
            a = pooled_operand(x_ptr, pooled_ptr, route_ptr, p, n, h, w, k, x_mask, K, sx_n, sx_c, sx_h, sx_w, H0, W0,
                               scale_ptr, shift_ptr, ACT, POOLS, POOL_PAD, STORE_POOLED)  # fmt: skip
        else:
            a = tl.load(x_ptr + x_row[:, None] + k[None, :] * sx_c, mask=x_mask, other=0.0)
            if HAS_PROLOGUE:
                scale = tl.load(scale_ptr + k, mask=k < K, other=0.0)
                shift = tl.load(shift_ptr + k, mask=k < K, other=0.0)
                a = apply_activation(a.to(tl.float32) * scale[None, :] + shift[None, :], ACT)
                a = tl.where(x_mask, a, 0.0)  # act(shift) is not 0: re-zero the padding after the prologue
        b = tl.load(w_ptr + o[None, :] * sw_o + k[:, None] * sw_k, mask=(k < K)[:, None] & (o < N_OUT)[None, :],
                    other=0.0)  # fmt: skip
        # Both operands in the storage dtype (an fp32 master weight is rounded as autocast would), whichever dot.
        a, b = a.to(x_ptr.dtype.element_ty), b.to(x_ptr.dtype.element_ty)
        if FP32_DOT:  # fp32 storage, or bf16 under the interpreter: products of bf16 values are exact
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    store_tile_and_channel_stats(y_ptr, stats_ptr, acc, n * sy_n + h * sy_h + w * sy_w, p < P, o, sy_c, N_OUT,
                                 STATS)  # fmt: skip
    if FINALIZE:  # the BN of y, in the last program to add its statistics
        finalize_when_last(stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr,
                           bn_var_ptr, running_mean_ptr, running_var_ptr, batches_ptr, N_OUT, count, eps, momentum,
                           unbias, HAS_RUNNING, HAS_COUNTER, BLOCK_N)  # fmt: skip


def conv1x1_bn_stats_forward(x, weight, scale, shift, activation, stats=None, finalize: Finalize | None = None, *,
                             statistics: bool = True):  # fmt: skip
    """Returns ``[y (N, C_out, H, W) channels_last in x's dtype, [Σy; Σy²] (2, C_out) float64]``; the statistics are
    added into ``stats`` (a zeroed contiguous float64 (or fp32) (2, C_out) buffer) where it is given, and the BN of y
    is finalized in the launch's last program where ``finalize`` is given (``bn_finalize.Finalize``). Without
    ``statistics`` none are taken (no fill, no atomics): an empty (0,) float64 tensor stands in for them."""
    y, stats, _, _ = _launch(x, weight, scale, shift, activation, stats, finalize, 0, 0, False, statistics)
    return [y, stats]


def pooled_conv1x1_bn_stats_forward(x, weight, scale, shift, activation, num_pools, pool_padding_before, stats,
                                    finalize: Finalize | None, with_pooled: bool):  # fmt: skip
    """The 1×1 conv of ``num_pools`` 3×3/s2 max-pools of act(scale·x + shift) (x (N, C_in, H0, W0), H0 and W0
    multiples of 2^num_pools; the pools padded ``pool_padding_before`` before): ``(y, stats, pooled, route)`` as
    :func:`conv1x1_bn_stats_forward`, with the pooled tensor (x's dtype) and its route (int32), both (N, C_in, H, W)
    channels_last, stored where ``with_pooled`` (else empty)."""
    return _launch(x, weight, scale, shift, activation, stats, finalize, num_pools, pool_padding_before, with_pooled)


def _launch(x, weight, scale, shift, activation, stats, finalize, pools, pool_pad, with_pooled, statistics=True):
    n, k, h0, w0 = x.shape
    h, w = h0 >> pools, w0 >> pools
    c_out = weight.shape[0]
    w2d = weight.reshape(c_out, k)
    y = torch.empty((n, c_out, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pooled_shape, layout = ((n, k, h, w), torch.channels_last) if with_pooled else ((0,), torch.contiguous_format)
    pooled = torch.empty(pooled_shape, dtype=x.dtype, device=x.device, memory_format=layout)
    route = torch.empty(pooled_shape, dtype=torch.int32, device=x.device, memory_format=layout)
    config = gemm_launch_config(x.dtype, _conv1x1_fwd_kernel)
    grid = (triton.cdiv(n * h * w, config["BLOCK_M"]), triton.cdiv(c_out, config["BLOCK_N"]))
    stats = statistics_buffer(stats, c_out, x.device, statistics)
    stats_arg = stats if statistics else y  # a pointer never dereferenced without statistics
    bn_args, bn_constexprs = Finalize.absent_args(stats_arg) if finalize is None else finalize.launch_args()
    has_prologue = scale is not None
    if has_prologue:  # (C,) vectors are addressed densely
        scale, shift = scale.contiguous(), shift.contiguous()
    _conv1x1_fwd_kernel[grid](
        y, stats_arg, *bn_args, x, w2d, scale if has_prologue else w2d, shift if has_prologue else w2d,
        pooled if with_pooled else y, route if with_pooled else stats, n * h * w, k, c_out, h * w, w, h0, w0,
        *x.stride(), *y.stride(), *w2d.stride(), HAS_PROLOGUE=has_prologue, ACT=ACTIVATION_CODES[activation],
        POOLS=pools, POOL_PAD=pool_pad, STORE_POOLED=with_pooled, STATS=statistics, **bn_constexprs, **config,
    )  # fmt: skip
    return y, stats, pooled, route
