"""BN's backward inside the backward GEMMs (Triton ``@triton.jit`` helpers, fp32 maths).

- ``bn_statistics_grad``: dΣ, dΣ² (and dγ, dβ) of BN's statistics from the gradients of the affine map they were
  finalised into (also ``bn_finalize``'s own backward).
- ``output_grad_tile``: g = dy + dΣ + 2·y·dΣ², the statistics' gradients (``statistics_grads``) folded into the
  output gradient as a GEMM loads its dy and y tiles.
- ``store_bn_param_grads``: dγ, dβ of some channels.
"""

import triton
import triton.language as tl


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
    ``dy_rows``/``y_rows``: the pixels' offsets in dy and y; ``o``: output channels, valid where ``o_mask``. The
    statistics' gradients: :func:`statistics_grads`; ``dsum_ptr`` None (a constexpr: the statistics have no
    gradient, as a BN with running statistics leaves them): g = dy, y not read."""
    if ROWS_ARE_PIXELS:
        dy_offsets, y_offsets = dy_rows[:, None] + o[None, :] * sdy_c, y_rows[:, None] + o[None, :] * sy_c
    else:  # transposed tile: output channels × pixels
        dy_offsets, y_offsets = dy_rows[None, :] + o[:, None] * sdy_c, y_rows[None, :] + o[:, None] * sy_c
    g = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    if dsum_ptr is not None:
        d_sum, d_sumsq = statistics_grads(dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, o, o_mask,
                                          FROM_AFFINE)  # fmt: skip
        if ROWS_ARE_PIXELS:
            d_sum, d_sumsq = d_sum[None, :], d_sumsq[None, :]
        else:
            d_sum, d_sumsq = d_sum[:, None], d_sumsq[:, None]
        y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
        g = g + d_sum + 2.0 * y * d_sumsq
    return tl.where(mask, g, 0.0)


@triton.jit
def statistics_grads(dsum_ptr, dsumsq_ptr, gamma_ptr, mean_ptr, var_ptr, count, eps, o, o_mask,
                     FROM_AFFINE: tl.constexpr):  # fmt: skip
    """(dΣ, dΣ²) of output channels ``o``: with ``FROM_AFFINE``, ``dsum_ptr``/``dsumsq_ptr`` hold the gradients of the
    BN affine map (d_scale, d_shift) that y's statistics were finalised into (γ, batch mean and variance of ``count``
    values, eps), and dΣ, dΣ² are computed here (``bn_statistics_grad``); otherwise they are dΣ, dΣ² themselves."""
    d_sum = tl.load(dsum_ptr + o, mask=o_mask, other=0.0)
    d_sumsq = tl.load(dsumsq_ptr + o, mask=o_mask, other=0.0)
    if FROM_AFFINE:
        gamma = tl.load(gamma_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + o, mask=o_mask, other=0.0)
        var = tl.load(var_ptr + o, mask=o_mask, other=0.0)
        d_sum, d_sumsq, _, _ = bn_statistics_grad(d_sum, d_sumsq, gamma, mean, var, count, eps)
    return d_sum, d_sumsq
