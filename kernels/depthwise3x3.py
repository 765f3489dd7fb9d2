"""Triton kernels of the depthwise 3×3 conv (stride 1 or 2) with a BN-affine + activation prologue and Σy, Σy²:
the ``conv3x3_bn_stats`` / ``conv3x3_bn`` ops for a (C, 1, 3, 3) weight (SpineNet-Mobile's resampling chain).

``y[n, c, i, j] = b[c] + Σ_{kh, kw} act(scale[c]·x[n, c, s·i + kh − pad, s·j + kw − pad] + shift[c])·W[c, 0, kh, kw]``
with zero padding after the prologue, as the dense kernel (``conv3x3``). No reduction over channels: a tile is
(BLOCK_M pixels) × (BLOCK_C channels) of elementwise products over the 9 taps, operands rounded to the storage dtype
(as the eager conv's are), fp32 accumulation, no dot.

Backward, one launch (the dgrad's programs first, then the wgrad's), with g = dy + dΣ + 2·y·dΣ² folded as dy and y
are loaded (``bn_grad.output_grad_tile``) and a = act(scale·x + shift) recomputed from the saved raw x:

- dgrad: ``d_a[n, c, h, w] = Σ_{kh, kw} g[n, c, i, j]·W[c, 0, kh, kw]`` over the taps that reach (h, w), per stride
  parity class as in the dense kernel; its epilogue is the prologue's backward (``gemm_backward.store_input_grad``).
- wgrad: ``dW[c, 0, kh, kw] = Σ_{n, i, j} g·a`` over pixel chunks, the nine taps of a channel block in one program
  (and Σ g for the bias), added atomically into a zeroed fp32 dW.

Tensors are (N, C, H, W) through their strides; y and dx are channels_last.
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, apply_activation
from .bn_finalize import Finalize, finalize_when_last
from .bn_grad import output_grad_tile, store_bn_param_grads
from .epilogue import statistics_buffer, store_tile_and_channel_stats
from .gemm_backward import backward_buffers, prologue_tile, store_input_grad, wgrad_split

BLOCK_M, BLOCK_C, NUM_WARPS = 64, 32, 4  # pixels × channels per program
# The register cap (PTX .maxnreg), stated: left to its own heuristic ptxas (12.9, 13.0) caps some backward variants
# at 128 registers and spills 4–20 bytes, and a bf16 stride-2 forward (SpineNet-Mobile's shapes) at 168; with the cap
# stated none spills. A cap below what the stride-1 backward variants need (168) spills hundreds of bytes. The fp32
# backward runs 8 warps: at 4, a stride-2 variant outgrew 255 registers and spilled 12 bytes.
MAX_REGISTERS = 255
FP32_BACKWARD_WARPS = 8


@triton.jit
def _tap_weight(w_ptr, c, c_mask, tap, sw_c, sw_h, sw_w, storage: tl.constexpr):
    """W[c, 0, tap // 3, tap % 3] rounded to the ``storage`` dtype, as fp32 (BLOCK_C,)."""
    w = tl.load(w_ptr + c * sw_c + (tap // 3) * sw_h + (tap % 3) * sw_w, mask=c_mask, other=0.0)
    return w.to(storage).to(tl.float32)


@triton.jit
def _depthwise3x3_fwd_kernel(
    y_ptr, stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr, bn_var_ptr,
    running_mean_ptr, running_var_ptr, batches_ptr, count, eps, momentum, unbias, x_ptr, w_ptr, bias_ptr, scale_ptr,
    shift_ptr, P, C, H_IN, W_IN, HW_OUT, W_OUT,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sw_c, sw_h, sw_w,
    STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STATS: tl.constexpr, FINALIZE: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels) × (BLOCK_C channels) tile of y, with ``STATS`` adding its channel sums to the
    stats."""
    storage: tl.constexpr = x_ptr.dtype.element_ty
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n, i, j = p // HW_OUT, (p % HW_OUT) // W_OUT, p % W_OUT
    h0, w0 = STRIDE * i - PAD, STRIDE * j - PAD  # the window's top-left input pixel
    if HAS_PROLOGUE:
        scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for tap in range(9):  # not unrolled: nine taps' loads in flight spill fp16 variants (sm_90, 4 warps)
        h, w = h0 + tap // 3, w0 + tap % 3
        mask = ((p < P) & (h >= 0) & (h < H_IN) & (w >= 0) & (w < W_IN))[:, None] & c_mask[None, :]
        a = tl.load(x_ptr + (n * sx_n + h * sx_h + w * sx_w)[:, None] + c[None, :] * sx_c, mask=mask, other=0.0)
        if HAS_PROLOGUE:  # padding and channel tail are zeros of the activated input
            a = tl.where(mask, apply_activation(a.to(tl.float32) * scale + shift, ACT), 0.0)
        acc += a.to(storage).to(tl.float32) * _tap_weight(w_ptr, c, c_mask, tap, sw_c, sw_h, sw_w, storage)[None, :]
    if HAS_BIAS:  # rounded to the storage dtype as autocast rounds it; added before the one rounding of y
        acc += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(storage).to(tl.float32)[None, :]
    store_tile_and_channel_stats(y_ptr, stats_ptr, acc, n * sy_n + i * sy_h + j * sy_w, p < P, c, sy_c, C, STATS)
    if FINALIZE:  # the BN of y, in the last program to add its statistics
        finalize_when_last(stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr,
                           bn_var_ptr, running_mean_ptr, running_var_ptr, batches_ptr, C, count, eps, momentum,
                           unbias, HAS_RUNNING, HAS_COUNTER, BLOCK_C)  # fmt: skip


def depthwise3x3_bn_stats_forward(x, weight, scale, shift, activation, pad_before, stride, bias=None, stats=None,
                                  finalize: Finalize | None = None, *, statistics: bool = True) -> list:  # fmt: skip
    """As ``conv3x3.conv3x3_bn_stats_forward`` for a depthwise (C, 1, 3, 3) ``weight``: ``[y (N, C, H/stride,
    W/stride) channels_last in x's dtype, [Σy; Σy²] (2, C) float64]`` (without ``statistics``: an empty stand-in)."""
    n, c, h, w = x.shape
    y = torch.empty((n, c, h // stride, w // stride), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = y.numel() // c
    grid = (triton.cdiv(pixels, BLOCK_M), triton.cdiv(c, BLOCK_C))
    stats = statistics_buffer(stats, c, x.device, statistics)
    stats_arg = stats if statistics else y  # a pointer never dereferenced without statistics
    bn_args, bn_constexprs = Finalize.absent_args(stats_arg) if finalize is None else finalize.launch_args()
    has_prologue = scale is not None
    if has_prologue:  # (C,) vectors are addressed densely
        scale, shift = scale.contiguous(), shift.contiguous()
    _depthwise3x3_fwd_kernel[grid](
        y, stats_arg, *bn_args, x, weight, weight if bias is None else bias.contiguous(),
        scale if has_prologue else weight, shift if has_prologue else weight, pixels, c, h, w,
        y.shape[2] * y.shape[3], y.shape[3], *x.stride(), *y.stride(), weight.stride(0), weight.stride(2),
        weight.stride(3), STRIDE=stride, PAD=pad_before, HAS_PROLOGUE=has_prologue, ACT=ACTIVATION_CODES[activation],
        HAS_BIAS=bias is not None, STATS=statistics, **bn_constexprs, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
        num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )  # fmt: skip
    return [y, stats]


@triton.jit
def _dgrad_tile(
    parity, pid_m, pid_c, dx_ptr, dscale_ptr, dshift_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr,
    gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C, HW_OUT, W_OUT, H_OUT,
    sdx_n, sdx_c, sdx_h, sdx_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    sw_c, sw_h, sw_w,
    STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, FROM_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M input pixels of parity class ``parity``) × (BLOCK_C channels) tile of dx, and its share of
    d_scale, d_shift; with ``FROM_AFFINE`` tile (0, 0, 0) stores the BN's dγ, dβ."""
    if FROM_AFFINE:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if (parity == 0) & (pid_m == 0) & (pid_c == 0):
            for c0 in range(0, C, BLOCK_C):
                k = c0 + tl.arange(0, BLOCK_C)
                store_bn_param_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count,
                                     eps, k, k < C)  # fmt: skip
    parity_h, parity_w = parity // STRIDE, parity % STRIDE
    q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n, u, v = q // HW_OUT, (q % HW_OUT) // W_OUT, q % W_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for tap in tl.static_range(9):
        # h = s·u + parity_h is reached from output row i = u + (parity_h + PAD − kh)/s where that is an integer.
        reach_h = parity_h + PAD - tap // 3
        reach_w = parity_w + PAD - tap % 3
        if (reach_h % STRIDE == 0) & (reach_w % STRIDE == 0):
            i = u + reach_h // STRIDE
            j = v + reach_w // STRIDE
            valid = (q < P) & (i >= 0) & (i < H_OUT) & (j >= 0) & (j < W_OUT)
            g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                                 n * sdy_n + i * sdy_h + j * sdy_w, n * sy_n + i * sy_h + j * sy_w, c, c_mask,
                                 valid[:, None] & c_mask[None, :], sdy_c, sy_c, True, FROM_AFFINE)  # fmt: skip
            acc += g * _tap_weight(w_ptr, c, c_mask, tap, sw_c, sw_h, sw_w, x_ptr.dtype.element_ty)[None, :]
    h, w = STRIDE * u + parity_h, STRIDE * v + parity_w
    store_input_grad(acc, dx_ptr, n * sdx_n + h * sdx_h + w * sdx_w, sdx_c, x_ptr, n * sx_n + h * sx_h + w * sx_w, sx_c,
                     scale_ptr, shift_ptr, dscale_ptr, dshift_ptr, c, (q < P)[:, None] & c_mask[None, :], C,
                     HAS_PROLOGUE, ACT)  # fmt: skip


@triton.jit
def _wgrad_tile(
    chunk, pid_c, dw_ptr, dbias_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr,
    x_ptr, scale_ptr, shift_ptr, P, C, H_IN, W_IN, HW_OUT, W_OUT, PIXELS_PER_PROGRAM,
    sdw_c, sdw_h, sdw_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The nine taps of dW for BLOCK_C channels over one chunk of output pixels (rows of a (16, BLOCK_C)
    accumulator), added to dW; with ``HAS_BIAS`` Σ_p g added to d_bias."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    taps = tl.arange(0, 16)
    acc = tl.zeros((16, BLOCK_C), tl.float32)
    first = chunk * PIXELS_PER_PROGRAM
    for p0 in range(first, first + PIXELS_PER_PROGRAM, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        n, i, j = p // HW_OUT, (p % HW_OUT) // W_OUT, p % W_OUT
        g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                             n * sdy_n + i * sdy_h + j * sdy_w, n * sy_n + i * sy_h + j * sy_w, c, c_mask,
                             (p < P)[:, None] & c_mask[None, :], sdy_c, sy_c, True, FROM_AFFINE)  # fmt: skip
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + c, tl.sum(g, axis=0), mask=c_mask)
        for tap in tl.static_range(9):
            h, w = STRIDE * i + tap // 3 - PAD, STRIDE * j + tap % 3 - PAD
            inside = (p < P) & (h >= 0) & (h < H_IN) & (w >= 0) & (w < W_IN)
            a = prologue_tile(x_ptr, n * sx_n + h * sx_h + w * sx_w, c, sx_c, inside[:, None] & c_mask[None, :],
                              scale_ptr, shift_ptr, C, HAS_PROLOGUE, ACT)  # fmt: skip
            acc += tl.where(taps[:, None] == tap, tl.sum(g * a.to(tl.float32), axis=0)[None, :], 0.0)
    offsets = c[None, :] * sdw_c + (taps // 3)[:, None] * sdw_h + (taps % 3)[:, None] * sdw_w
    tl.atomic_add(dw_ptr + offsets, acc, mask=(taps < 9)[:, None] & c_mask[None, :])


@triton.jit
def _depthwise3x3_backward_kernel(
    dx_ptr, dscale_ptr, dshift_ptr, dw_ptr, dbias_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr,
    mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C, H_IN, W_IN, HW_OUT, W_OUT, H_OUT,
    DGRAD_TILES, CHANNEL_BLOCKS, PIXELS_PER_PROGRAM,
    sdx_n, sdx_c, sdx_h, sdx_w, sdw_c, sdw_h, sdw_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w,
    sx_n, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w,
    STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The first s²·``DGRAD_TILES`` programs are the dgrad's tiles (per parity class, row-major over CHANNEL_BLOCKS),
    the rest the wgrad's (per pixel chunk, CHANNEL_BLOCKS each)."""
    pid = tl.program_id(0)
    if pid < STRIDE * STRIDE * DGRAD_TILES:
        tile = pid % DGRAD_TILES
        _dgrad_tile(pid // DGRAD_TILES, tile // CHANNEL_BLOCKS, tile % CHANNEL_BLOCKS, dx_ptr, dscale_ptr, dshift_ptr,
                    dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                    y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C, HW_OUT, W_OUT, H_OUT, sdx_n, sdx_c, sdx_h, sdx_w,
                    sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w,
                    STRIDE, PAD, HAS_PROLOGUE, ACT, FROM_AFFINE, BLOCK_M, BLOCK_C)  # fmt: skip
    else:
        wgrad_pid = pid - STRIDE * STRIDE * DGRAD_TILES
        _wgrad_tile(wgrad_pid // CHANNEL_BLOCKS, wgrad_pid % CHANNEL_BLOCKS, dw_ptr, dbias_ptr, dy_ptr, dsum_ptr,
                    dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, scale_ptr, shift_ptr, P, C,
                    H_IN, W_IN, HW_OUT, W_OUT, PIXELS_PER_PROGRAM, sdw_c, sdw_h, sdw_w, sdy_n, sdy_c, sdy_h, sdy_w,
                    sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, STRIDE, PAD, HAS_PROLOGUE, ACT, HAS_BIAS,
                    FROM_AFFINE, BLOCK_M, BLOCK_C)  # fmt: skip


def depthwise3x3_bn_stats_backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, pad_before, stride,
                                   d_bias=None, bn=None, d_affine=None, d_weight=None) -> list:  # fmt: skip
    """As ``conv3x3_backward.conv3x3_bn_stats_backward`` for a depthwise (C, 1, 3, 3) ``weight``."""
    n, c, h, w = x.shape
    h_out, w_out = h // stride, w // stride
    pixels = n * h_out * w_out  # output pixels, and input pixels per parity class
    t = backward_buffers(dy, y, d_sum, d_sumsq, x, weight, scale, shift, bn, d_affine, d_weight)
    channel_blocks = triton.cdiv(c, BLOCK_C)
    dgrad_tiles = triton.cdiv(pixels, BLOCK_M) * channel_blocks
    chunks, per_program = wgrad_split(pixels, channel_blocks, BLOCK_M, x.device)
    grid = (stride * stride * dgrad_tiles + chunks * channel_blocks,)
    _depthwise3x3_backward_kernel[grid](
        t.dx, t.d_scale, t.d_shift, t.d_weight, t.d_weight if d_bias is None else d_bias, t.d_bn[0], t.d_bn[-1], dy,
        t.d_sum, t.d_sumsq, *t.bn_args, t.y, x, weight, t.scale, t.shift, pixels, c, h, w, h_out * w_out, w_out, h_out,
        dgrad_tiles, channel_blocks, per_program, *t.dx.stride(), t.d_weight.stride(0), t.d_weight.stride(2),
        t.d_weight.stride(3), *dy.stride(), *t.y.stride(), *x.stride(), weight.stride(0), weight.stride(2),
        weight.stride(3), STRIDE=stride, PAD=pad_before, HAS_PROLOGUE=scale is not None,
        ACT=ACTIVATION_CODES[activation], HAS_BIAS=d_bias is not None, FROM_AFFINE=bn is not None, BLOCK_M=BLOCK_M,
        BLOCK_C=BLOCK_C, num_warps=FP32_BACKWARD_WARPS if x.dtype == torch.float32 else NUM_WARPS,
        maxnreg=MAX_REGISTERS,
    )  # fmt: skip
    return t.grads(weight)
