"""Triton backward of ``conv1x1_bn_stats``: a dgrad and a wgrad GEMM in one launch, every elementwise step inside.

With g = dy + dΣ + 2·y·dΣ² (the statistics' gradients folded into the output gradient, computed as each GEMM loads
its dy and y tiles) and a = act(scale·x + shift) (the prologue, recomputed from the saved raw x):

- dgrad: ``d_a = g · W`` (pixels × C_in); its epilogue applies the prologue's backward, d_pre = d_a·act'(pre),
  stores ``dx = d_pre·scale`` and accumulates ``d_scale = Σ_p d_pre·x`` and ``d_shift = Σ_p d_pre``.
- wgrad: ``dW = gᵀ · a`` (C_out × C_in), split over pixel chunks (one weight tile alone would leave a GPU idle).

The two GEMMs do not depend on each other: one launch runs both, its first programs the dgrad's tiles and the rest the
wgrad's (horizontal fusion). Where every input channel fits one tile (C_in ≤ BLOCK_N) and the dots run on tensor cores
(bf16/fp16), both recompute y = a·Wᵀ (K = C_in: one more dot per output-channel step) instead of reading it — y, C_out
wide, is the largest tensor either reads. Tensors are (N, C, H, W) addressed through their strides (channels_last is the
fast layout); W is (C_out, C_in). g and a are rounded to the storage dtype as GEMM operands (tensor cores for bf16/fp16,
IEEE fp32 dots for fp32); accumulation and the channel reductions are fp32. The reductions (d_scale, d_shift, dW) are
atomic adds into zeroed fp32 buffers, the caller's (slices of one buffer for a whole connection) or filled here. With
the BN that y's statistics were finalised into (``conv1x1_bn``), dΣ, dΣ² are computed in both GEMMs from the gradients
of its scale and shift, and the dgrad also stores dγ, dβ.

``conv1x1_bn_pair``'s backward (two such convs of one x, no prologue) is one launch of the same tiles: each dgrad tile
runs both convs' K loops into one accumulator (dx = g_a·W_a + g_b·W_b, stored once), the wgrad tiles of both weights
follow.
"""

import triton
import triton.language as tl

from .activation import ACTIVATION_CODES
from .bn_grad import output_grad_tile, statistics_grads, store_bn_param_grads
from .gemm_backward import (
    backward_buffers,
    grad_dot,
    operand_dot,
    prologue_tile,
    store_input_grad,
    wgrad_dot,
    wgrad_split,
)
from .gemm_config import gemm_launch_config


@triton.jit
def _dgrad_steps(
    acc, first_tile, n, h, w, p_mask, k, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr,
    var_ptr, count, eps, y_ptr, w_ptr, C_IN, C_OUT, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sw_o, sw_k,
    storage: tl.constexpr, FP32_DOT: tl.constexpr, FROM_AFFINE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``acc`` + g·W over every output channel of one conv for the pixels (n, h, w) (``p_mask``) × input channels
    ``k``; with ``FROM_AFFINE``, the ``first_tile`` stores the output BN's dγ, dβ as it passes over every channel."""
    dy_rows, y_rows = n * sdy_n + h * sdy_h + w * sdy_w, n * sy_n + h * sy_h + w * sy_w
    for o0 in range(0, C_OUT, BLOCK_K):
        o = o0 + tl.arange(0, BLOCK_K)
        g_mask = p_mask[:, None] & (o < C_OUT)[None, :]
        g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, dy_rows,
                             y_rows, o, o < C_OUT, g_mask, sdy_c, sy_c, True, FROM_AFFINE)  # fmt: skip
        if FROM_AFFINE:  # noqa: SIM102 (a constexpr branch, then a runtime one)
            if first_tile:
                store_bn_param_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count,
                                     eps, o, o < C_OUT)  # fmt: skip
        b = tl.load(w_ptr + o[:, None] * sw_o + k[None, :] * sw_k, mask=(o < C_OUT)[:, None] & (k < C_IN)[None, :],
                    other=0.0)  # fmt: skip
        # Operands in the storage dtype (an fp32 master weight is rounded as autocast would).
        acc = grad_dot(acc, g, b, storage, FP32_DOT)
    return acc


@triton.jit
def _dgrad_tile(
    pid_m, pid_n, dx_ptr, dscale_ptr, dshift_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr,
    mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG,
    sdx_n, sdx_c, sdx_h, sdx_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_k,
    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr,
    FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M pixels) × (BLOCK_N input channels) tile of dx, and its share of d_scale, d_shift; with
    ``FROM_AFFINE``, tile (0, 0) stores the output BN's dγ, dβ as it passes over every output channel."""
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
    acc = _dgrad_steps(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), (pid_m == 0) & (pid_n == 0), n, h, w, p < P, k,
                       dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                       y_ptr, w_ptr, C_IN, C_OUT, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sw_o, sw_k,
                       dx_ptr.dtype.element_ty, FP32_DOT, FROM_AFFINE, BLOCK_K)  # fmt: skip
    store_input_grad(acc, dx_ptr, n * sdx_n + h * sdx_h + w * sdx_w, sdx_c, x_ptr, n * sx_n + h * sx_h + w * sx_w, sx_c,
                     scale_ptr, shift_ptr, dscale_ptr, dshift_ptr, k, (p < P)[:, None] & (k < C_IN)[None, :], C_IN,
                     HAS_PROLOGUE, ACT)  # fmt: skip


@triton.jit
def _wgrad_tile(
    pid_o, pid_k, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr,
    x_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG, PIXELS_PER_PROGRAM, sdy_n, sdy_c, sdy_h, sdy_w,
    sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr,
    FP32_DOT: tl.constexpr, FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output channels) × (BLOCK_N input channels) tile of dW over one chunk of pixels, added to dW."""
    o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    first = chunk * PIXELS_PER_PROGRAM
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for p0 in range(first, first + PIXELS_PER_PROGRAM, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
        g_mask = (o < C_OUT)[:, None] & (p < P)[None, :]
        dy_rows, y_rows = n * sdy_n + h * sdy_h + w * sdy_w, n * sy_n + h * sy_h + w * sy_w
        g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, dy_rows,
                             y_rows, o, o < C_OUT, g_mask, sdy_c, sy_c, False, FROM_AFFINE)  # fmt: skip
        acc = wgrad_dot(acc, g, x_ptr, n * sx_n + h * sx_h + w * sx_w, k, sx_c, (p < P)[:, None] & (k < C_IN)[None, :],
                        scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE, ACT, FP32_DOT)  # fmt: skip
    mask = (o < C_OUT)[:, None] & (k < C_IN)[None, :]
    tl.atomic_add(dw_ptr + o[:, None] * C_IN + k[None, :], acc, mask=mask)


@triton.jit
def _dgrad_steps_recomputing(
    acc, first_tile, a, n, h, w, p_mask, k, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr,
    var_ptr, count, eps, w_ptr, C_IN, C_OUT, sdy_n, sdy_c, sdy_h, sdy_w, sw_o, sw_k, storage: tl.constexpr,
    FP32_DOT: tl.constexpr, FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """:func:`_dgrad_steps` where the tile holds every input channel: y = a·Wᵀ recomputed from the tile's operand
    ``a`` (pixels × all input channels) per output-channel step, not read."""
    for o0 in range(0, C_OUT, BLOCK_K):
        o = o0 + tl.arange(0, BLOCK_K)
        g_mask = p_mask[:, None] & (o < C_OUT)[None, :]
        b = tl.load(w_ptr + o[:, None] * sw_o + k[None, :] * sw_k, mask=(o < C_OUT)[:, None] & (k < C_IN)[None, :],
                    other=0.0).to(a.dtype)  # fmt: skip
        y = operand_dot(tl.zeros((BLOCK_M, BLOCK_K), tl.float32), a, tl.trans(b), FP32_DOT)
        d_sum, d_sumsq = statistics_grads(dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, o, o < C_OUT,
                                          FROM_AFFINE)  # fmt: skip
        dy = tl.load(dy_ptr + (n * sdy_n + h * sdy_h + w * sdy_w)[:, None] + o[None, :] * sdy_c, mask=g_mask, other=0.0)
        g = tl.where(g_mask, dy.to(tl.float32) + d_sum[None, :] + 2.0 * y * d_sumsq[None, :], 0.0)
        if FROM_AFFINE:  # noqa: SIM102 (a constexpr branch, then a runtime one)
            if first_tile:
                store_bn_param_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count,
                                     eps, o, o < C_OUT)  # fmt: skip
        acc = grad_dot(acc, g, b, storage, FP32_DOT)
    return acc


@triton.jit
def _dgrad_tile_recomputing(
    pid_m, dx_ptr, dscale_ptr, dshift_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr,
    var_ptr, count, eps, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG, sdx_n, sdx_c, sdx_h, sdx_w,
    sdy_n, sdy_c, sdy_h, sdy_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_k,
    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr,
    FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """:func:`_dgrad_tile` where one tile holds every input channel: y = a·Wᵀ recomputed from a = act(scale·x +
    shift) per output-channel step, not read."""
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_N)
    n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
    x_rows, x_mask = n * sx_n + h * sx_h + w * sx_w, (p < P)[:, None] & (k < C_IN)[None, :]
    a = prologue_tile(x_ptr, x_rows, k, sx_c, x_mask, scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE, ACT)
    acc = _dgrad_steps_recomputing(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), pid_m == 0, a, n, h, w, p < P, k,
                                   dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr,
                                   count, eps, w_ptr, C_IN, C_OUT, sdy_n, sdy_c, sdy_h, sdy_w, sw_o, sw_k,
                                   dx_ptr.dtype.element_ty, FP32_DOT, FROM_AFFINE, BLOCK_M,
                                   BLOCK_K)  # fmt: skip
    store_input_grad(acc, dx_ptr, n * sdx_n + h * sdx_h + w * sdx_w, sdx_c, x_ptr, x_rows, sx_c, scale_ptr, shift_ptr,
                     dscale_ptr, dshift_ptr, k, x_mask, C_IN, HAS_PROLOGUE, ACT)  # fmt: skip


@triton.jit
def _wgrad_tile_recomputing(
    pid_o, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, x_ptr, w_ptr,
    scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG, PIXELS_PER_PROGRAM, sdy_n, sdy_c, sdy_h, sdy_w,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr,
    FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """:func:`_wgrad_tile` where one tile holds every input channel: y's tile is W·aᵀ, not read."""
    o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_N)
    first = chunk * PIXELS_PER_PROGRAM
    w_tile = tl.load(w_ptr + o[:, None] * sw_o + k[None, :] * sw_k, mask=(o < C_OUT)[:, None] & (k < C_IN)[None, :],
                     other=0.0).to(x_ptr.dtype.element_ty)  # fmt: skip
    d_sum, d_sumsq = statistics_grads(dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, o, o < C_OUT,
                                      FROM_AFFINE)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for p0 in range(first, first + PIXELS_PER_PROGRAM, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
        g_mask = (o < C_OUT)[:, None] & (p < P)[None, :]
        a = prologue_tile(x_ptr, n * sx_n + h * sx_h + w * sx_w, k, sx_c, (p < P)[:, None] & (k < C_IN)[None, :],
                          scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE, ACT)  # fmt: skip
        y = operand_dot(tl.zeros((BLOCK_M, BLOCK_K), tl.float32), w_tile, tl.trans(a), FP32_DOT)
        dy = tl.load(dy_ptr + (n * sdy_n + h * sdy_h + w * sdy_w)[None, :] + o[:, None] * sdy_c, mask=g_mask, other=0.0)
        g = tl.where(g_mask, dy.to(tl.float32) + d_sum[:, None] + 2.0 * y * d_sumsq[:, None], 0.0)
        acc = operand_dot(acc, g.to(a.dtype), a, FP32_DOT)
    tl.atomic_add(dw_ptr + o[:, None] * C_IN + k[None, :], acc, mask=(o < C_OUT)[:, None] & (k < C_IN)[None, :])


@triton.jit
def _conv1x1_backward_kernel(
    dx_ptr, dscale_ptr, dshift_ptr, dw_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr,
    var_ptr, count, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG, DGRAD_PROGRAMS,
    DGRAD_COLUMNS, WGRAD_COLUMNS, WGRAD_CHUNKS, PIXELS_PER_PROGRAM,
    sdx_n, sdx_c, sdx_h, sdx_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_k,
    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr,
    FROM_AFFINE: tl.constexpr, RECOMPUTE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The first ``DGRAD_PROGRAMS`` programs are the dgrad's tiles (row-major over DGRAD_COLUMNS input-channel
    blocks), the rest the wgrad's (WGRAD_CHUNKS pixel chunks of each of the weight's tiles, WGRAD_COLUMNS per row).
    ``RECOMPUTE_Y``: one column of tiles holds every input channel, and both recompute y instead of reading it."""
    pid = tl.program_id(0)
    if RECOMPUTE_Y:
        if pid < DGRAD_PROGRAMS:
            _dgrad_tile_recomputing(pid, dx_ptr, dscale_ptr, dshift_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, dsum_ptr,
                                    dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, x_ptr, w_ptr, scale_ptr,
                                    shift_ptr, P, C_IN, C_OUT, HW, W_IMG, sdx_n, sdx_c, sdx_h, sdx_w, sdy_n, sdy_c,
                                    sdy_h, sdy_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, HAS_PROLOGUE, ACT, FP32_DOT,
                                    FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        else:
            tile, chunk = (pid - DGRAD_PROGRAMS) // WGRAD_CHUNKS, (pid - DGRAD_PROGRAMS) % WGRAD_CHUNKS
            _wgrad_tile_recomputing(tile, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr,
                                    count, eps, x_ptr, w_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG,
                                    PIXELS_PER_PROGRAM, sdy_n, sdy_c, sdy_h, sdy_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_k,
                                    HAS_PROLOGUE, ACT, FP32_DOT, FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    elif pid < DGRAD_PROGRAMS:
        _dgrad_tile(pid // DGRAD_COLUMNS, pid % DGRAD_COLUMNS, dx_ptr, dscale_ptr, dshift_ptr, dgamma_ptr, dbeta_ptr,
                    dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, w_ptr,
                    scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG, sdx_n, sdx_c, sdx_h, sdx_w, sdy_n, sdy_c, sdy_h,
                    sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, HAS_PROLOGUE, ACT, FP32_DOT,
                    FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        tile, chunk = (pid - DGRAD_PROGRAMS) // WGRAD_CHUNKS, (pid - DGRAD_PROGRAMS) % WGRAD_CHUNKS
        _wgrad_tile(tile // WGRAD_COLUMNS, tile % WGRAD_COLUMNS, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr,
                    mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, scale_ptr, shift_ptr, P, C_IN, C_OUT, HW, W_IMG,
                    PIXELS_PER_PROGRAM, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
                    HAS_PROLOGUE, ACT, FP32_DOT, FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


def recomputes_y(c_in: int, config: dict) -> bool:
    """Whether a backward launch of ``config``'s tiles recomputes y: a = act(scale·x + shift) fits one tile, so y = a·Wᵀ
    costs a tensor-core dot, not a read (not with fp32's IEEE dots, whose variants with the recomputation spilled
    registers on sm_90)."""
    return c_in <= config["BLOCK_N"] and not config["FP32_DOT"]


def conv1x1_bn_stats_backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, bn=None, d_affine=None,
                              d_weight=None):  # fmt: skip
    """``[dx (channels_last, x's dtype), dW (W's dtype), (d_affine = [d_scale; d_shift] (2, C_in) fp32)]``.

    ``bn`` = (γ, mean, var, count, eps): y's statistics were finalised into that BN, and ``d_sum``/``d_sumsq`` are the
    gradients of its scale and shift; the statistics' gradients are then computed inside both GEMMs, and
    ``[dγ; dβ]`` (2, C_out) in γ's dtype is returned last. ``d_sum``, ``d_sumsq`` None: the statistics have no
    gradient (a BN with running statistics), and y is not read. ``d_affine``: a zeroed fp32 (2, C_in) buffer the
    prologue's gradients are added into (then not returned), or None. ``d_weight``: a zeroed fp32 buffer laid out as
    the weight that dW is added into (returned as dW for an fp32 weight), or None (one fill)."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    pixels = n * h * w
    w2d = weight.reshape(c_out, c_in)
    t = backward_buffers(dy, y, d_sum, d_sumsq, x, weight, scale, shift, bn, d_affine, d_weight)
    config = gemm_launch_config(x.dtype, _conv1x1_backward_kernel)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    dgrad_columns = triton.cdiv(c_in, block_n)
    dgrad_programs = triton.cdiv(pixels, block_m) * dgrad_columns
    wgrad_columns = triton.cdiv(c_in, block_n)
    chunks, per_program = wgrad_split(pixels, triton.cdiv(c_out, block_m) * wgrad_columns, block_k, x.device)
    grid = (dgrad_programs + triton.cdiv(c_out, block_m) * wgrad_columns * chunks,)
    recompute_y = d_sum is not None and recomputes_y(c_in, config)  # y only serves the statistics' gradients
    y = dy if recompute_y else t.y  # dy: a stand-in where y is recomputed (t.y is dy where y is not needed)
    _conv1x1_backward_kernel[grid](
        t.dx, t.d_scale, t.d_shift, t.d_weight, t.d_bn[0], t.d_bn[-1], dy, t.d_sum, t.d_sumsq, *t.bn_args, y, x, w2d,
        t.scale, t.shift, pixels, c_in, c_out, h * w, w, dgrad_programs, dgrad_columns, wgrad_columns, chunks,
        per_program, *t.dx.stride(), *dy.stride(), *y.stride(), *x.stride(), *w2d.stride(),
        HAS_PROLOGUE=scale is not None, ACT=ACTIVATION_CODES[activation],
        FROM_AFFINE=bn is not None, RECOMPUTE_Y=recompute_y, **config,
    )  # fmt: skip
    return t.grads(weight)


@triton.jit
def _pair_wgrad_tile(
    tile, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, y_ptr, w_ptr, x_ptr, P,
    C_IN, C_OUT, HW, W_IMG, WGRAD_COLUMNS, PIXELS_PER_PROGRAM, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, FP32_DOT: tl.constexpr, RECOMPUTE_Y: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One of the pair's wgrad programs: weight tile ``tile`` of one conv over pixel chunk ``chunk``."""
    if RECOMPUTE_Y:
        _wgrad_tile_recomputing(tile, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count,
                                eps, x_ptr, w_ptr, x_ptr, x_ptr, P, C_IN, C_OUT, HW, W_IMG, PIXELS_PER_PROGRAM, sdy_n,
                                sdy_c, sdy_h, sdy_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, False, 0, FP32_DOT, True,
                                BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        _wgrad_tile(tile // WGRAD_COLUMNS, tile % WGRAD_COLUMNS, chunk, dw_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr,
                    mean_ptr, var_ptr, count, eps, y_ptr, x_ptr, x_ptr, x_ptr, P, C_IN, C_OUT, HW, W_IMG,
                    PIXELS_PER_PROGRAM, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
                    False, 0, FP32_DOT, True, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _conv1x1_pair_backward_kernel(
    dx_ptr, x_ptr, P, C_IN, HW, W_IMG, count, DGRAD_PROGRAMS, DGRAD_COLUMNS, WGRAD_COLUMNS,
    sdx_n, sdx_c, sdx_h, sdx_w, sx_n, sx_c, sx_h, sx_w,
    dw_a_ptr, dgamma_a_ptr, dbeta_a_ptr, dy_a_ptr, dsum_a_ptr, dsumsq_a_ptr, gamma_a_ptr, mean_a_ptr, var_a_ptr, eps_a,
    y_a_ptr, w_a_ptr, C_A, WGRAD_A, CHUNKS_A, PIXELS_A, sdy_a_n, sdy_a_c, sdy_a_h, sdy_a_w, sy_a_n, sy_a_c, sy_a_h,
    sy_a_w, sw_a_o, sw_a_k,
    dw_b_ptr, dgamma_b_ptr, dbeta_b_ptr, dy_b_ptr, dsum_b_ptr, dsumsq_b_ptr, gamma_b_ptr, mean_b_ptr, var_b_ptr, eps_b,
    y_b_ptr, w_b_ptr, C_B, CHUNKS_B, PIXELS_B, sdy_b_n, sdy_b_c, sdy_b_h, sdy_b_w, sy_b_n, sy_b_c, sy_b_h, sy_b_w,
    sw_b_o, sw_b_k,
    FP32_DOT: tl.constexpr, RECOMPUTE_Y: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Two 1×1 conv + BN backwards of one input x (a and b, no prologue) in one launch: the first ``DGRAD_PROGRAMS``
    programs are dx's tiles, g_a·W_a + g_b·W_b summed in one accumulator (one K loop over both convs' output
    channels); the next ``WGRAD_A`` a's wgrad tiles (``CHUNKS_A`` pixel chunks each), the rest b's.
    ``RECOMPUTE_Y``: one column of tiles holds every input channel, and every program recomputes y_a, y_b from its x
    tile instead of reading them (the dgrad's one x tile serves both convs)."""
    pid = tl.program_id(0)
    if pid < DGRAD_PROGRAMS:
        pid_m, pid_n = pid // DGRAD_COLUMNS, pid % DGRAD_COLUMNS
        p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
        first = (pid_m == 0) & (pid_n == 0)
        x_rows, x_mask = n * sx_n + h * sx_h + w * sx_w, (p < P)[:, None] & (k < C_IN)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if RECOMPUTE_Y:
            a = prologue_tile(x_ptr, x_rows, k, sx_c, x_mask, x_ptr, x_ptr, C_IN, False, 0)
            acc = _dgrad_steps_recomputing(acc, first, a, n, h, w, p < P, k, dgamma_a_ptr, dbeta_a_ptr, dy_a_ptr,
                                           dsum_a_ptr, dsumsq_a_ptr, gamma_a_ptr, mean_a_ptr, var_a_ptr, count, eps_a,
                                           w_a_ptr, C_IN, C_A, sdy_a_n, sdy_a_c, sdy_a_h, sdy_a_w, sw_a_o, sw_a_k,
                                           dx_ptr.dtype.element_ty, FP32_DOT, True, BLOCK_M,
                                           BLOCK_K)  # fmt: skip
            acc = _dgrad_steps_recomputing(acc, first, a, n, h, w, p < P, k, dgamma_b_ptr, dbeta_b_ptr, dy_b_ptr,
                                           dsum_b_ptr, dsumsq_b_ptr, gamma_b_ptr, mean_b_ptr, var_b_ptr, count, eps_b,
                                           w_b_ptr, C_IN, C_B, sdy_b_n, sdy_b_c, sdy_b_h, sdy_b_w, sw_b_o, sw_b_k,
                                           dx_ptr.dtype.element_ty, FP32_DOT, True, BLOCK_M,
                                           BLOCK_K)  # fmt: skip
        else:
            acc = _dgrad_steps(acc, first, n, h, w, p < P, k, dgamma_a_ptr, dbeta_a_ptr, dy_a_ptr, dsum_a_ptr,
                               dsumsq_a_ptr, gamma_a_ptr, mean_a_ptr, var_a_ptr, count, eps_a, y_a_ptr, w_a_ptr, C_IN,
                               C_A, sdy_a_n, sdy_a_c, sdy_a_h, sdy_a_w, sy_a_n, sy_a_c, sy_a_h, sy_a_w, sw_a_o, sw_a_k,
                               dx_ptr.dtype.element_ty, FP32_DOT, True, BLOCK_K)  # fmt: skip
            acc = _dgrad_steps(acc, first, n, h, w, p < P, k, dgamma_b_ptr, dbeta_b_ptr, dy_b_ptr, dsum_b_ptr,
                               dsumsq_b_ptr, gamma_b_ptr, mean_b_ptr, var_b_ptr, count, eps_b, y_b_ptr, w_b_ptr, C_IN,
                               C_B, sdy_b_n, sdy_b_c, sdy_b_h, sdy_b_w, sy_b_n, sy_b_c, sy_b_h, sy_b_w, sw_b_o, sw_b_k,
                               dx_ptr.dtype.element_ty, FP32_DOT, True, BLOCK_K)  # fmt: skip
        store_input_grad(acc, dx_ptr, n * sdx_n + h * sdx_h + w * sdx_w, sdx_c, x_ptr, x_rows, sx_c, x_ptr, x_ptr,
                         dx_ptr, dx_ptr, k, x_mask, C_IN, False, 0)  # fmt: skip
    elif pid < DGRAD_PROGRAMS + WGRAD_A:
        _pair_wgrad_tile((pid - DGRAD_PROGRAMS) // CHUNKS_A, (pid - DGRAD_PROGRAMS) % CHUNKS_A, dw_a_ptr, dy_a_ptr,
                         dsum_a_ptr, dsumsq_a_ptr, gamma_a_ptr, mean_a_ptr, var_a_ptr, count, eps_a, y_a_ptr, w_a_ptr,
                         x_ptr, P, C_IN, C_A, HW, W_IMG, WGRAD_COLUMNS, PIXELS_A, sdy_a_n, sdy_a_c, sdy_a_h, sdy_a_w,
                         sy_a_n, sy_a_c, sy_a_h, sy_a_w, sx_n, sx_c, sx_h, sx_w, sw_a_o, sw_a_k, FP32_DOT, RECOMPUTE_Y,
                         BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        program = pid - DGRAD_PROGRAMS - WGRAD_A
        _pair_wgrad_tile(program // CHUNKS_B, program % CHUNKS_B, dw_b_ptr, dy_b_ptr, dsum_b_ptr, dsumsq_b_ptr,
                         gamma_b_ptr, mean_b_ptr, var_b_ptr, count, eps_b, y_b_ptr, w_b_ptr, x_ptr, P, C_IN, C_B, HW,
                         W_IMG, WGRAD_COLUMNS, PIXELS_B, sdy_b_n, sdy_b_c, sdy_b_h, sdy_b_w, sy_b_n, sy_b_c, sy_b_h,
                         sy_b_w, sx_n, sx_c, sx_h, sx_w, sw_b_o, sw_b_k, FP32_DOT, RECOMPUTE_Y, BLOCK_M, BLOCK_N,
                         BLOCK_K)  # fmt: skip


def conv1x1_bn_pair_backward(x, convs) -> list:
    """The backward of two ``conv1x1_bn`` of one x without a prologue, in one launch: ``[dx (channels_last, x's
    dtype), dW_a, [dγ_a; dβ_a], dW_b, [dγ_b; dβ_b]]``, dx = dx_a + dx_b summed in the GEMM's accumulator. ``convs``:
    per conv ``(dy, d_scale, d_shift, y, weight, bn, d_weight)`` as :func:`conv1x1_bn_stats_backward` takes them
    (``bn`` = (γ, mean, var, count, eps), required: the statistics' gradients come from the BN's affine map)."""
    n, c_in, h, w = x.shape
    pixels = n * h * w
    config = gemm_launch_config(x.dtype, _conv1x1_pair_backward_kernel)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    columns = triton.cdiv(c_in, block_n)
    dgrad_programs = triton.cdiv(pixels, block_m) * columns
    recompute_y = recomputes_y(c_in, config)
    launch_args, buffers, wgrad_programs = [], [], []
    for dy, d_sum, d_sumsq, y, weight, bn, d_weight in convs:
        c_out = weight.shape[0]
        t = backward_buffers(dy, y, d_sum, d_sumsq, x, weight, None, None, bn, None, d_weight)
        tiles = triton.cdiv(c_out, block_m) * columns
        chunks, per_program = wgrad_split(pixels, tiles, block_k, x.device)
        w2d = weight.reshape(c_out, c_in)
        gamma, mean, var, _, eps = t.bn_args
        programs = () if buffers else (tiles * chunks,)  # b's: the rest of the grid
        y = dy if recompute_y else t.y  # dy: a stand-in where y is recomputed
        launch_args += [t.d_weight, *t.d_bn, dy, t.d_sum, t.d_sumsq, gamma, mean, var, eps, y, w2d, c_out, *programs,
                        chunks, per_program, *dy.stride(), *y.stride(), *w2d.stride()]  # fmt: skip
        buffers.append(t)
        wgrad_programs.append(tiles * chunks)
    dx = buffers[0].dx
    _conv1x1_pair_backward_kernel[(dgrad_programs + sum(wgrad_programs),)](
        dx, x, pixels, c_in, h * w, w, buffers[0].bn_args[3], dgrad_programs, columns, columns, *dx.stride(),
        *x.stride(), *launch_args, RECOMPUTE_Y=recompute_y, **config,
    )  # fmt: skip
    return [dx, *(g for (_, _, _, _, weight, _, _), t in zip(convs, buffers) for g in t.grads(weight)[1:])]
