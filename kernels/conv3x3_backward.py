"""Triton backward of ``conv3x3_bn_stats`` (K×K windows, ``KSIZE`` 3 or 7; stride s = 1 or 2): a dgrad and a wgrad
implicit GEMM, every elementwise step inside them.

With g = dy + dΣ + 2·y·dΣ² (folded as each GEMM loads its dy and y tiles, from the statistics' gradients or from
those of the BN affine map they were finalised into) and a = act(scale·x + shift) (recomputed from the saved raw x):

- dgrad: ``d_a[n, c, h, w] = Σ_{o, kh, kw} g[n, o, i, j]·W[o, c, kh, kw]`` over the taps with h = s·i + kh − PAD,
  w = s·j + kw − PAD. The input pixels fall into s² parity classes (h mod s, w mod s), each fed by its own taps
  (3×3, stride 2: 1, 2, 2 or 4 of the 9; 7×7: 9, 12, 12 or 16 of the 49; stride 1: one class, every tap) from a
  dense output window: each program belongs to one class, so none multiplies by a tap that does not reach it. Its
  epilogue is the prologue's backward (``gemm_backward.store_input_grad``).
- wgrad: ``dW[o, c, kh, kw] = Σ_{n, i, j} g[n, o, i, j]·a[n, c, s·i + kh − PAD, s·j + kw − PAD]``, one GEMM per tap,
  split over pixel chunks, added atomically into a zeroed fp32 dW.

Both run in one launch (horizontal fusion: the dgrad's programs first, then the wgrad's).

H and W are multiples of s (the op checks it), so every class has the output's H/s × W/s pixels. Tensors are
(N, C, H, W) through their strides; dW has the weight's layout. Operands are rounded to the storage dtype (tensor
cores for bf16/fp16; IEEE fp32 dots for fp32), accumulation and reductions are fp32.
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES
from .bn_grad import output_grad_tile, store_bn_param_grads
from .gemm_backward import backward_buffers, grad_dot, store_input_grad, wgrad_dot, wgrad_split
from .gemm_config import gemm_launch_config, narrow_block


@triton.jit
def _store_bn_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, C_OUT,
                    BLOCK: tl.constexpr):  # fmt: skip
    """The output BN's dγ, dβ (one program stores them)."""
    for o0 in range(0, C_OUT, BLOCK):
        o = o0 + tl.arange(0, BLOCK)
        store_bn_param_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, o,
                             o < C_OUT)  # fmt: skip


@triton.jit
def _dgrad_tile(
    parity, pid_m, pid_n, dx_ptr, dscale_ptr, dshift_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr,
    gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW_OUT,
    W_OUT, H_OUT,
    sdx_n, sdx_c, sdx_h, sdx_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr,
    FP32_DOT: tl.constexpr, FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M input pixels of parity class ``parity``) × (BLOCK_N input channels) tile of dx, and its share of
    d_scale, d_shift; with ``FROM_AFFINE`` tile (0, 0, 0) stores the output BN's dγ, dβ."""
    if FROM_AFFINE:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if (parity == 0) & (pid_m == 0) & (pid_n == 0):
            _store_bn_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                            C_OUT, BLOCK_K)  # fmt: skip
    parity_h, parity_w = parity // STRIDE, parity % STRIDE
    q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n, u, v = q // HW_OUT, (q % HW_OUT) // W_OUT, q % W_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(KSIZE * KSIZE):
        kh, kw = tap // KSIZE, tap % KSIZE
        # h = s·u + parity_h is reached from output row i = u + (parity_h + PAD − kh)/s where that is an integer.
        reach_h = parity_h + PAD - kh
        reach_w = parity_w + PAD - kw
        if (reach_h % STRIDE == 0) & (reach_w % STRIDE == 0):
            i = u + reach_h // STRIDE
            j = v + reach_w // STRIDE
            valid = (q < P) & (i >= 0) & (i < H_OUT) & (j >= 0) & (j < W_OUT)
            dy_rows, y_rows = n * sdy_n + i * sdy_h + j * sdy_w, n * sy_n + i * sy_h + j * sy_w
            for o0 in range(0, C_OUT, BLOCK_K):
                o = o0 + tl.arange(0, BLOCK_K)
                g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                                     dy_rows, y_rows, o, o < C_OUT, valid[:, None] & (o < C_OUT)[None, :], sdy_c, sy_c,
                                     True, FROM_AFFINE)  # fmt: skip
                b = tl.load(w_ptr + o[:, None] * sw_o + k[None, :] * sw_c + kh * sw_h + kw * sw_w,
                            mask=(o < C_OUT)[:, None] & (k < C_IN)[None, :], other=0.0)  # fmt: skip
                acc = grad_dot(acc, g, b, dx_ptr.dtype.element_ty, FP32_DOT)
    h, w = STRIDE * u + parity_h, STRIDE * v + parity_w
    store_input_grad(acc, dx_ptr, n * sdx_n + h * sdx_h + w * sdx_w, sdx_c, x_ptr, n * sx_n + h * sx_h + w * sx_w, sx_c,
                     scale_ptr, shift_ptr, dscale_ptr, dshift_ptr, k, (q < P)[:, None] & (k < C_IN)[None, :], C_IN,
                     HAS_PROLOGUE, ACT)  # fmt: skip


@triton.jit
def _wgrad_tile(
    pid_o, pid_k, tap, chunk, dw_ptr, dbias_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count,
    eps, y_ptr, x_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, H_IN, W_IN, HW_OUT, W_OUT, PIXELS_PER_PROGRAM,
    sdw_o, sdw_c, sdw_h, sdw_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output channels) × (BLOCK_N input channels) tile of dW at ``tap`` over one chunk of output
    pixels, added to dW; with ``HAS_BIAS`` the tiles of tap 0 and the first input channels add Σ_p g to d_bias."""
    o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    kh, kw = tap // KSIZE, tap % KSIZE
    first = chunk * PIXELS_PER_PROGRAM
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for p0 in range(first, first + PIXELS_PER_PROGRAM, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        n, i, j = p // HW_OUT, (p % HW_OUT) // W_OUT, p % W_OUT
        dy_rows, y_rows = n * sdy_n + i * sdy_h + j * sdy_w, n * sy_n + i * sy_h + j * sy_w
        g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, dy_rows,
                             y_rows, o, o < C_OUT, (o < C_OUT)[:, None] & (p < P)[None, :], sdy_c, sy_c, False,
                             FROM_AFFINE)  # fmt: skip
        if HAS_BIAS:  # noqa: SIM102 (a constexpr branch, then a runtime one; added per step: no loop-carried vector)
            if (pid_k == 0) & (tap == 0):
                tl.atomic_add(dbias_ptr + o, tl.sum(g, axis=1), mask=o < C_OUT)
        h, w = STRIDE * i + kh - PAD, STRIDE * j + kw - PAD
        inside = (p < P) & (h >= 0) & (h < H_IN) & (w >= 0) & (w < W_IN)
        acc = wgrad_dot(acc, g, x_ptr, n * sx_n + h * sx_h + w * sx_w, k, sx_c, inside[:, None] & (k < C_IN)[None, :],
                        scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE, ACT, FP32_DOT)  # fmt: skip
    mask = (o < C_OUT)[:, None] & (k < C_IN)[None, :]
    tl.atomic_add(dw_ptr + o[:, None] * sdw_o + k[None, :] * sdw_c + kh * sdw_h + kw * sdw_w, acc, mask=mask)


@triton.jit
def _conv3x3_backward_kernel(
    dx_ptr, dscale_ptr, dshift_ptr, dw_ptr, dbias_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr,
    mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, H_IN, W_IN, HW_OUT, W_OUT,
    H_OUT, DGRAD_TILES, DGRAD_COLUMNS, WGRAD_COLUMNS, WGRAD_CHUNKS, PIXELS_PER_PROGRAM,
    sdx_n, sdx_c, sdx_h, sdx_w, sdw_o, sdw_c, sdw_h, sdw_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, FROM_AFFINE: tl.constexpr,
    DGRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The first s²·``DGRAD_TILES`` programs are the dgrad's tiles (each parity class's DGRAD_TILES, row-major over
    DGRAD_COLUMNS input-channel blocks; none without ``DGRAD``, where x needs no gradient, the first wgrad program
    then storing dγ, dβ), the rest the wgrad's (per weight tile, WGRAD_COLUMNS per row, its K² taps × WGRAD_CHUNKS
    pixel chunks)."""
    pid = tl.program_id(0)
    if pid < STRIDE * STRIDE * DGRAD_TILES:
        tile = pid % DGRAD_TILES
        _dgrad_tile(pid // DGRAD_TILES, tile // DGRAD_COLUMNS, tile % DGRAD_COLUMNS, dx_ptr, dscale_ptr, dshift_ptr,
                    dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                    y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW_OUT, W_OUT, H_OUT, sdx_n, sdx_c,
                    sdx_h, sdx_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, sw_o,
                    sw_c, sw_h, sw_w, KSIZE, STRIDE, PAD, HAS_PROLOGUE, ACT, FP32_DOT, FROM_AFFINE, BLOCK_M,
                    BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        wgrad_pid = pid - STRIDE * STRIDE * DGRAD_TILES
        if FROM_AFFINE and not DGRAD:  # noqa: SIM102 (a constexpr branch, then a runtime one)
            if wgrad_pid == 0:
                _store_bn_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                                C_OUT, BLOCK_K)  # fmt: skip
        taps = KSIZE * KSIZE
        tile, step = wgrad_pid // (taps * WGRAD_CHUNKS), wgrad_pid % (taps * WGRAD_CHUNKS)
        _wgrad_tile(tile // WGRAD_COLUMNS, tile % WGRAD_COLUMNS, step % taps, step // taps, dw_ptr, dbias_ptr,
                    dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, scale_ptr,
                    shift_ptr, P, C_IN, C_OUT, H_IN, W_IN, HW_OUT, W_OUT, PIXELS_PER_PROGRAM, sdw_o, sdw_c, sdw_h,
                    sdw_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, KSIZE, STRIDE,
                    PAD, HAS_PROLOGUE, ACT, HAS_BIAS, FP32_DOT, FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


def conv3x3_bn_stats_backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, pad_before, stride,
                              d_bias=None, bn=None, d_affine=None, d_weight=None,
                              input_grad: bool = True) -> list[torch.Tensor]:  # fmt: skip
    """``[dx (channels_last, x's dtype), dW (W's dtype, W's layout), (d_affine = [d_scale; d_shift] (2, C_in) fp32),
    ([dγ; dβ])]``; ``bn``, ``d_affine``, ``d_weight`` and ``d_sum``/``d_sumsq`` None (no statistics' gradients) as for
    ``conv1x1_backward.conv1x1_bn_stats_backward``.
    ``pad_before``: the top/left padding (K // 2, or (K − 2) // 2 for stride 2 in ``"tf_same"``); ``stride``: 1 or 2;
    ``d_bias``: a zeroed fp32 (C_out,) buffer the bias gradient Σ_p g is added into (a conv with a bias), or None.
    ``input_grad`` False (no prologue): no dgrad programs, dx an empty stand-in."""
    if not input_grad and scale is not None:
        raise ValueError("input_grad=False needs a conv without a prologue (its gradients come from the dgrad)")
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    h_out, w_out = h // stride, w // stride
    pixels = n * h_out * w_out  # output pixels, and input pixels per parity class
    t = backward_buffers(dy, y, d_sum, d_sumsq, x, weight, scale, shift, bn, d_affine, d_weight, input_grad)
    config = gemm_launch_config(x.dtype, _conv3x3_backward_kernel)
    config["BLOCK_N"] = narrow_block(c_in, config["BLOCK_N"])  # the input channels' dimension of both GEMMs
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    taps = weight.shape[-1] ** 2
    dgrad_columns = triton.cdiv(c_in, block_n)
    dgrad_tiles = triton.cdiv(pixels, block_m) * dgrad_columns if input_grad else 0
    wgrad_tiles = triton.cdiv(c_out, block_m) * triton.cdiv(c_in, block_n)
    chunks, per_program = wgrad_split(pixels, taps * wgrad_tiles, block_k, x.device)
    grid = (stride * stride * dgrad_tiles + taps * wgrad_tiles * chunks,)
    _conv3x3_backward_kernel[grid](
        t.dx, t.d_scale, t.d_shift, t.d_weight, t.d_weight if d_bias is None else d_bias, t.d_bn[0], t.d_bn[-1], dy,
        t.d_sum, t.d_sumsq, *t.bn_args, t.y, x, weight, t.scale, t.shift, pixels, c_in, c_out, h, w, h_out * w_out,
        w_out, h_out, dgrad_tiles, dgrad_columns, triton.cdiv(c_in, block_n), chunks, per_program, *t.dx.stride(),
        *t.d_weight.stride(), *dy.stride(), *t.y.stride(), *x.stride(), *weight.stride(), KSIZE=weight.shape[-1],
        STRIDE=stride, PAD=pad_before, HAS_PROLOGUE=scale is not None, ACT=ACTIVATION_CODES[activation],
        HAS_BIAS=d_bias is not None, FROM_AFFINE=bn is not None, DGRAD=input_grad,
        **config,
    )  # fmt: skip
    return t.grads(weight)
