"""Triton implicit GEMM for K×K convolutions (``KSIZE`` 3, or 7: SpineNet's stem) of stride 1 or 2 with a BN-affine
+ activation prologue and Σy, Σy².

``y[n, o, i, j] = b[o] + Σ_{c, kh, kw} act(scale[c]·x[n, c, s·i + kh − pad, s·j + kw − pad] + shift[c])·W[o, c, kh,
kw]`` (s = ``STRIDE``; b the optional bias) where taps outside the input contribute 0 (zero padding *after* the
prologue, as the eager conv pads its activated input). ``PAD`` is the top/left padding: K // 2, or for stride 2 in
``"tf_same"`` (K − 2) // 2 (whose extra bottom/right row is the same out-of-range zero). Tensors are (N, C, H, W)
through their strides.
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, apply_activation
from .bn_finalize import Finalize, finalize_when_last
from .epilogue import statistics_buffer, store_tile_and_channel_stats
from .gemm_config import gemm_launch_config, narrow_block


@triton.jit
def conv3x3_tile(
    pid_m, pid_n, y_ptr, stats_ptr, x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, P, C_IN, N_OUT, H_IN, W_IN, HW_OUT,
    W_OUT, sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sw_o, sw_c, sw_h, sw_w,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels) × (BLOCK_N output channels) tile of y, with ``STATS`` adding its channel sums to
    the (2, N_OUT) stats."""
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n, i, j = p // HW_OUT, (p % HW_OUT) // W_OUT, p % W_OUT
    y_rows = n * sy_n + i * sy_h + j * sy_w
    h0, w0 = STRIDE * i - PAD, STRIDE * j - PAD  # the window's top-left input pixel
    x_corner = n * sx_n + h0 * sx_h + w0 * sx_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(KSIZE * KSIZE):
        kh, kw = tap // KSIZE, tap % KSIZE
        h, w = h0 + kh, w0 + kw
        inside = (p < P) & (h >= 0) & (h < H_IN) & (w >= 0) & (w < W_IN)
        x_row = x_corner + kh * sx_h + kw * sx_w
        for c0 in range(0, C_IN, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            x_mask = inside[:, None] & (c < C_IN)[None, :]
            a = tl.load(x_ptr + x_row[:, None] + c[None, :] * sx_c, mask=x_mask, other=0.0)
            if HAS_PROLOGUE:
                scale = tl.load(scale_ptr + c, mask=c < C_IN, other=0.0)
                shift = tl.load(shift_ptr + c, mask=c < C_IN, other=0.0)
                a = apply_activation(a.to(tl.float32) * scale[None, :] + shift[None, :], ACT)
                a = tl.where(x_mask, a, 0.0)  # padding and channel tail are zeros of the activated input
            b = tl.load(w_ptr + o[None, :] * sw_o + c[:, None] * sw_c + kh * sw_h + kw * sw_w,
                        mask=(c < C_IN)[:, None] & (o < N_OUT)[None, :], other=0.0)  # fmt: skip
            # Both operands in the storage dtype (an fp32 master weight is rounded as autocast would), whichever dot.
            a, b = a.to(x_ptr.dtype.element_ty), b.to(x_ptr.dtype.element_ty)
            if FP32_DOT:  # fp32 storage, or bf16 under the interpreter: products of bf16 values are exact
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b)
    if HAS_BIAS:  # rounded to the storage dtype as autocast rounds it; added before the one rounding of y
        bias = tl.load(bias_ptr + o, mask=o < N_OUT, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += bias[None, :]
    store_tile_and_channel_stats(y_ptr, stats_ptr, acc, y_rows, p < P, o, sy_c, N_OUT, STATS)


@triton.jit
def _conv3x3_fwd_kernel(
    y_ptr, stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr, bn_var_ptr,
    running_mean_ptr, running_var_ptr, batches_ptr, count, eps, momentum, unbias, x_ptr, w_ptr, bias_ptr, scale_ptr,
    shift_ptr, P, C_IN, N_OUT, H_IN, W_IN, HW_OUT, W_OUT,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sw_o, sw_c, sw_h, sw_w,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, STATS: tl.constexpr, FINALIZE: tl.constexpr,
    HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One tile of y (``conv3x3_tile``), with ``STATS`` adding its channel sums to the stats."""
    conv3x3_tile(tl.program_id(0), tl.program_id(1), y_ptr, stats_ptr, x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, P,
                 C_IN, N_OUT, H_IN, W_IN, HW_OUT, W_OUT, sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sw_o, sw_c,
                 sw_h, sw_w, KSIZE, STRIDE, PAD, HAS_PROLOGUE, ACT, HAS_BIAS, FP32_DOT, STATS, BLOCK_M, BLOCK_N,
                 BLOCK_K)  # fmt: skip
    if FINALIZE:  # the BN of y, in the last program to add its statistics
        finalize_when_last(stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr,
                           bn_var_ptr, running_mean_ptr, running_var_ptr, batches_ptr, N_OUT, count, eps, momentum,
                           unbias, HAS_RUNNING, HAS_COUNTER, BLOCK_N)  # fmt: skip


def conv3x3_bn_stats_forward(x, weight, scale, shift, activation, pad_before, stride, bias=None, stats=None,
                             finalize: Finalize | None = None, *, statistics: bool = True) -> list:  # fmt: skip
    """Returns ``[y (N, C_out, H/stride, W/stride) channels_last in x's dtype, [Σy; Σy²] (2, C_out) float64]``, y
    with the (C_out,) ``bias`` added where one is given; the statistics are added into ``stats`` (a zeroed contiguous
    float64 (or fp32) (2, C_out) buffer) where it is given, and the BN of y is finalized in the launch's last program
    where ``finalize`` is given (``bn_finalize.Finalize``). Without ``statistics`` none are taken (no fill, no
    atomics): an empty (0,) float64 tensor stands in for them."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    y = torch.empty(
        (n, c_out, h // stride, w // stride), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    config = gemm_launch_config(x.dtype, _conv3x3_fwd_kernel)
    if config["FP32_DOT"] and (stride == 1 or not statistics):  # no software pipelining: at 2-4 stages fp32
        config["num_stages"] = 1  # stride-1 variants spill (sm_90), as does the 7×7 stride-2 one without statistics
    config["BLOCK_K"] = narrow_block(c_in, config["BLOCK_K"])
    grid = (triton.cdiv(y.numel() // c_out, config["BLOCK_M"]), triton.cdiv(c_out, config["BLOCK_N"]))
    stats = statistics_buffer(stats, c_out, x.device, statistics)
    stats_arg = stats if statistics else y  # a pointer never dereferenced without statistics
    bn_args, bn_constexprs = Finalize.absent_args(stats_arg) if finalize is None else finalize.launch_args()
    has_prologue = scale is not None
    if has_prologue:  # (C,) vectors are addressed densely
        scale, shift = scale.contiguous(), shift.contiguous()
    _conv3x3_fwd_kernel[grid](
        y, stats_arg, *bn_args, x, weight, weight if bias is None else bias.contiguous(),
        scale if has_prologue else weight, shift if has_prologue else weight,
        y.numel() // c_out, c_in, c_out, h, w, y.shape[2] * y.shape[3], y.shape[3], *x.stride(), *y.stride(),
        *weight.stride(), KSIZE=weight.shape[-1], STRIDE=stride, PAD=pad_before, HAS_PROLOGUE=has_prologue,
        ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None, STATS=statistics, **bn_constexprs, **config,
    )  # fmt: skip
    return [y, stats]
