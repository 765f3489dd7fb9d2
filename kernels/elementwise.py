"""Elementwise Triton kernels around a library convolution (the 3×3 stride-2 conv's backward runs in ATen/cuDNN).

All work on (N, C, H, W) tensors addressed through their strides, one (BLOCK_P pixels) × (BLOCK_C channels) tile per
program; the outputs are allocated channels_last by the launchers. Maths in fp32.

- ``affine_activation``: a = act(scale·x + shift), the recomputed input of the conv (its weight gradient needs it).
- ``output_grad``: g = dy + dΣ + 2·y·dΣ², the statistics' gradients folded into the output gradient (its tile,
  ``output_grad_tile``, is also the prologue of the 1×1 conv's backward GEMMs); dΣ, dΣ² given, or computed per tile
  from the gradients of the BN affine map they were finalised into (``bn_statistics_grad``, shared with the
  finalize's own backward).
- ``affine_activation_backward``: dx = act'(pre)·d_a·scale with d_scale = Σ d_pre·x, d_shift = Σ d_pre accumulated
  by atomic adds into a zeroed (2, C) buffer.
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, activation_grad, apply_activation

BLOCK_P, BLOCK_C = 64, 32


@triton.jit
def _tile(P, C, HW, W_IMG, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's pixels (n, h, w), channels and mask."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return p // HW, (p % HW) // W_IMG, p % W_IMG, c, (p < P)[:, None] & (c < C)[None, :]


@triton.jit
def bn_statistics_grad(d_scale, d_shift, weight, mean, var, count, eps):
    """``(dΣ, dΣ²)`` of BN's statistics [Σ; Σ²] of ``count`` values from the gradients of its affine map
    (scale = γ·invstd, shift = β − mean·scale, mean = Σ/n, var = Σ²/n − mean²), and ``(dγ, dβ)``: per-channel fp32."""
    invstd = 1.0 / tl.sqrt(var + eps)
    d_affine = d_scale - d_shift * mean  # dL/d(γ·invstd) folded with shift's −mean·scale
    d_var = -0.5 * weight * d_affine * invstd * invstd * invstd
    d_mean = -d_shift * weight * invstd - 2.0 * mean * d_var
    return d_mean / count, d_var / count, invstd * d_affine, d_shift


@triton.jit
def store_bn_param_grads(dgamma_ptr, dbeta_ptr, dscale_ptr, dshift_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, c,
                         c_mask):  # fmt: skip
    """Store dγ, dβ of channels ``c`` (where ``c_mask``) from the gradients of the BN's scale and shift."""
    _, _, d_gamma, d_beta = bn_statistics_grad(
        tl.load(dscale_ptr + c, mask=c_mask, other=0.0), tl.load(dshift_ptr + c, mask=c_mask, other=0.0),
        tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32), tl.load(mean_ptr + c, mask=c_mask, other=0.0),
        tl.load(var_ptr + c, mask=c_mask, other=0.0), count, eps,
    )  # fmt: skip
    tl.store(dgamma_ptr + c, d_gamma.to(dgamma_ptr.dtype.element_ty), mask=c_mask)
    tl.store(dbeta_ptr + c, d_beta.to(dbeta_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def output_grad_tile(
    dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, dy_rows, y_rows, o, o_mask, mask,
    sdy_c, sy_c, ROWS_ARE_PIXELS: tl.constexpr, FROM_AFFINE: tl.constexpr,
):  # fmt: skip
    """g = dy + dΣ + 2·y·dΣ² in fp32 (0 outside ``mask``): a (pixels × output channels) tile, or its transpose.
    ``dy_rows``/``y_rows``: the pixels' offsets in dy and y; ``o``: output channels, valid where ``o_mask``.
    ``FROM_AFFINE``: ``dsum_ptr``/``dsumsq_ptr`` hold the gradients of the BN affine map (d_scale, d_shift) that y's
    statistics were finalised into (γ, batch mean and variance of ``count`` values, eps), and dΣ, dΣ² are computed
    here (``bn_statistics_grad``); otherwise they are dΣ, dΣ² themselves."""
    d_sum = tl.load(dsum_ptr + o, mask=o_mask, other=0.0)
    d_sumsq = tl.load(dsumsq_ptr + o, mask=o_mask, other=0.0)
    if FROM_AFFINE:
        gamma = tl.load(gamma_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + o, mask=o_mask, other=0.0)
        var = tl.load(var_ptr + o, mask=o_mask, other=0.0)
        d_sum, d_sumsq, _, _ = bn_statistics_grad(d_sum, d_sumsq, gamma, mean, var, count, eps)
    if ROWS_ARE_PIXELS:
        dy = tl.load(dy_ptr + dy_rows[:, None] + o[None, :] * sdy_c, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_rows[:, None] + o[None, :] * sy_c, mask=mask, other=0.0).to(tl.float32)
        d_sum, d_sumsq = d_sum[None, :], d_sumsq[None, :]
    else:  # transposed tile: output channels × pixels
        dy = tl.load(dy_ptr + dy_rows[None, :] + o[:, None] * sdy_c, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_rows[None, :] + o[:, None] * sy_c, mask=mask, other=0.0).to(tl.float32)
        d_sum, d_sumsq = d_sum[:, None], d_sumsq[:, None]
    return tl.where(mask, dy + d_sum + 2.0 * y * d_sumsq, 0.0)


@triton.jit
def _affine_activation_kernel(
    a_ptr, x_ptr, scale_ptr, shift_ptr, P, C, HW, W_IMG, sa_n, sa_c, sa_h, sa_w, sx_n, sx_c, sx_h, sx_w,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, h, w, c, mask = _tile(P, C, HW, W_IMG, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + (n * sx_n + h * sx_h + w * sx_w)[:, None] + c[None, :] * sx_c, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0)[None, :]
    a = apply_activation(x.to(tl.float32) * scale + shift, ACT)
    a = a.to(x.dtype).to(tl.float32)  # the forward's operand, rounded to the storage dtype as it was
    tl.store(a_ptr + (n * sa_n + h * sa_h + w * sa_w)[:, None] + c[None, :] * sa_c, a.to(a_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _output_grad_kernel(
    g_ptr, dgamma_ptr, dbeta_ptr, dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
    P, C, HW, W_IMG, sg_n, sg_c, sg_h, sg_w, sdy_n, sdy_c, sdy_h, sdy_w, sy_n, sy_c, sy_h, sy_w,
    FROM_AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A tile of g; with ``FROM_AFFINE`` the programs of the first pixel block also store dγ, dβ of their channels."""
    n, h, w, c, mask = _tile(P, C, HW, W_IMG, BLOCK_P, BLOCK_C)
    dy_rows, y_rows = n * sdy_n + h * sdy_h + w * sdy_w, n * sy_n + h * sy_h + w * sy_w
    g = output_grad_tile(dy_ptr, y_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, dy_rows,
                         y_rows, c, c < C, mask, sdy_c, sy_c, True, FROM_AFFINE)  # fmt: skip
    tl.store(g_ptr + (n * sg_n + h * sg_h + w * sg_w)[:, None] + c[None, :] * sg_c, g.to(g_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip
    if FROM_AFFINE:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if tl.program_id(0) == 0:
            store_bn_param_grads(dgamma_ptr, dbeta_ptr, dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps,
                                 c, c < C)  # fmt: skip


@triton.jit
def _affine_activation_bwd_kernel(
    dx_ptr, daffine_ptr, da_ptr, x_ptr, scale_ptr, shift_ptr, P, C, HW, W_IMG,
    sdx_n, sdx_c, sdx_h, sdx_w, sda_n, sda_c, sda_h, sda_w, sx_n, sx_c, sx_h, sx_w,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, h, w, c, mask = _tile(P, C, HW, W_IMG, BLOCK_P, BLOCK_C)
    d_a = tl.load(da_ptr + (n * sda_n + h * sda_h + w * sda_w)[:, None] + c[None, :] * sda_c, mask=mask, other=0.0)
    x = tl.load(x_ptr + (n * sx_n + h * sx_h + w * sx_w)[:, None] + c[None, :] * sx_c, mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0)[None, :]
    d_pre = tl.where(mask, d_a.to(tl.float32) * activation_grad(x * scale + shift, ACT), 0.0)
    tl.atomic_add(daffine_ptr + c, tl.sum(d_pre * x, axis=0), mask=c < C)
    tl.atomic_add(daffine_ptr + C + c, tl.sum(d_pre, axis=0), mask=c < C)
    tl.store(dx_ptr + (n * sdx_n + h * sdx_h + w * sdx_w)[:, None] + c[None, :] * sdx_c,
             (d_pre * scale).to(dx_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def _grid(t: torch.Tensor) -> tuple[int, int]:
    n, c, h, w = t.shape
    return triton.cdiv(n * h * w, BLOCK_P), triton.cdiv(c, BLOCK_C)


def _geometry(t: torch.Tensor) -> tuple[int, int, int, int]:
    n, c, h, w = t.shape
    return n * h * w, c, h * w, w


def affine_activation(x, scale, shift, activation, dtype) -> torch.Tensor:
    """``act(scale·x + shift)`` (rounded to x's dtype as the forward's operand was) stored channels_last in dtype."""
    a = torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
    _affine_activation_kernel[_grid(x)](
        a, x, scale.contiguous(), shift.contiguous(), *_geometry(x), *a.stride(), *x.stride(),
        ACT=ACTIVATION_CODES[activation], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return a


def output_grad(dy, y, d_sum, d_sumsq, dtype, bn=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``dy + dΣ + 2·y·dΣ²`` stored channels_last in dtype. With ``bn`` = (γ, mean, var, count, eps), ``d_sum`` and
    ``d_sumsq`` are the gradients of the BN affine map y's statistics were finalised into: dΣ, dΣ² are computed per
    tile, and ``(g, [dγ; dβ] (2, C) in γ's dtype)`` is returned."""
    g = torch.empty_like(y, dtype=dtype, memory_format=torch.channels_last)
    if bn is not None:
        gamma, mean, var, count, eps = bn
        d_bn = torch.empty((2, y.shape[1]), dtype=gamma.dtype, device=y.device)
        bn_args = (gamma.contiguous(), mean.contiguous(), var.contiguous(), float(count), float(eps))
    else:  # unused pointers
        d_bn, bn_args = (d_sum, d_sum), (d_sum, d_sum, d_sum, 1.0, 1.0)
    _output_grad_kernel[_grid(y)](
        g, d_bn[0], d_bn[1], dy, y, d_sum.contiguous(), d_sumsq.contiguous(), *bn_args, *_geometry(y), *g.stride(),
        *dy.stride(), *y.stride(), FROM_AFFINE=bn is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return g if bn is None else (g, d_bn)


def affine_activation_backward(d_a, x, scale, shift, activation, d_affine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx channels_last in x's dtype, [d_scale; d_shift] (2, C) fp32)`` from the gradient of act(scale·x + shift);
    the reductions are added into ``d_affine`` (a zeroed fp32 (2, C) buffer) where it is given."""
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    if d_affine is None:
        d_affine = torch.zeros((2, x.shape[1]), dtype=torch.float32, device=x.device)
    _affine_activation_bwd_kernel[_grid(x)](
        dx, d_affine, d_a, x, scale.contiguous(), shift.contiguous(), *_geometry(x), *dx.stride(), *d_a.stride(),
        *x.stride(), ACT=ACTIVATION_CODES[activation], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return dx, d_affine
