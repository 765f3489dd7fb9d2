"""Triton kernels of the cross-scale merge: ``act(Σ_i scale_i·y_i[h // ρ_i, w // ρ_i] + shift_i + extra)``.

Every tensor is (N, C, H, W) addressed through its own strides, so NCHW, channels_last (NHWC in memory) and
non-contiguous views all work; channels are the fastest tile axis. One or two parents, each read at its own
resolution (no upsampled copy is written). Scales and shifts arrive stacked as fp32 (num_parents, C); with
``ROW_SCALED`` the first parent's term is multiplied by a per-sample fp32 factor (stochastic depth).
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, activation_grad, apply_activation

BLOCK_P = 32
BLOCK_C = 32


@triton.jit
def _affine_at(y_ptr, scale_ptr, shift_ptr, parent, n, h, w, c, s_n, s_c, s_h, s_w, C, mask):
    """scale[parent, c]·y[n, c, h, w] + shift[parent, c] in fp32, for a (BLOCK_P, BLOCK_C) tile."""
    y = tl.load(y_ptr + n[:, None] * s_n + c[None, :] * s_c + h[:, None] * s_h + w[:, None] * s_w, mask=mask)
    scale = tl.load(scale_ptr + parent * C + c, mask=c < C)
    shift = tl.load(shift_ptr + parent * C + c, mask=c < C)
    return y.to(tl.float32) * scale[None, :] + shift[None, :]


@triton.jit
def _pre_activation(
    y0_ptr, y1_ptr, extra_ptr, scale_ptr, shift_ptr, row_scale, n, h, w, c, C, mask,
    s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, se_n, se_c, se_h, se_w,
    R0: tl.constexpr, R1: tl.constexpr, NUM_PARENTS: tl.constexpr, HAS_EXTRA: tl.constexpr, ROW_SCALED: tl.constexpr,
):  # fmt: skip
    """The merge's pre-activation sum at target pixels (n, h, w) × channels c; ``row_scale``: the first parent's
    per-pixel-row factor (BLOCK_P,) where ``ROW_SCALED``."""
    pre = _affine_at(y0_ptr, scale_ptr, shift_ptr, 0, n, h // R0, w // R0, c, s0_n, s0_c, s0_h, s0_w, C, mask)
    if ROW_SCALED:
        pre = pre * row_scale[:, None]
    if NUM_PARENTS == 2:
        pre += _affine_at(y1_ptr, scale_ptr, shift_ptr, 1, n, h // R1, w // R1, c, s1_n, s1_c, s1_h, s1_w, C, mask)
    if HAS_EXTRA:
        offsets = n[:, None] * se_n + c[None, :] * se_c + h[:, None] * se_h + w[:, None] * se_w
        pre += tl.load(extra_ptr + offsets, mask=mask).to(tl.float32)
    return pre


@triton.jit
def readers_grad(grad_ptr, g1_delta, g2_delta, g3_delta, offsets, mask, NUM_GRADS: tl.constexpr):
    """The output gradient at ``offsets`` as the fp32 sum of its ``NUM_GRADS`` readers' tensors (one layout and
    dtype): the first at ``grad_ptr``, the others ``g*_delta`` elements after it (:func:`reader_deltas`)."""
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if NUM_GRADS > 1:
        grad += tl.load(grad_ptr + g1_delta + offsets, mask=mask, other=0.0).to(tl.float32)
    if NUM_GRADS > 2:
        grad += tl.load(grad_ptr + g2_delta + offsets, mask=mask, other=0.0).to(tl.float32)
    if NUM_GRADS > 3:
        grad += tl.load(grad_ptr + g3_delta + offsets, mask=mask, other=0.0).to(tl.float32)
    return grad


def reader_deltas(grads: list[torch.Tensor]) -> list[int]:
    """The readers' gradients (1 to 4 tensors of one layout and dtype) after the first, as element offsets from it
    (allocations are element-aligned: scalars, not pointers), padded with 0 to three."""
    grad = grads[0]
    if any(g.stride() != grad.stride() or g.dtype != grad.dtype for g in grads):
        raise ValueError(f"grads must share one layout and dtype, got {[(g.stride(), g.dtype) for g in grads]}")
    deltas = [(g.data_ptr() - grad.data_ptr()) // grad.element_size() for g in grads[1:]]
    return deltas + [0] * (3 - len(deltas))


@triton.jit
def _row_scale_at(row_scale_ptr, n, p_mask, ROW_SCALED: tl.constexpr):
    """The per-sample factors of pixel rows ``n`` (BLOCK_P,) fp32 where ``ROW_SCALED``, else ones (never read)."""
    if ROW_SCALED:
        factors = tl.load(row_scale_ptr + n, mask=p_mask, other=0.0).to(tl.float32)
    else:
        factors = tl.full(n.shape, 1.0, tl.float32)
    return factors


@triton.jit
def _merge_fwd_kernel(
    out_ptr, y0_ptr, y1_ptr, extra_ptr, scale_ptr, shift_ptr, row_scale_ptr, P, C, H, W,
    so_n, so_c, so_h, so_w, s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, se_n, se_c, se_h, se_w,
    R0: tl.constexpr, R1: tl.constexpr, NUM_PARENTS: tl.constexpr, HAS_EXTRA: tl.constexpr,
    ROW_SCALED: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_P target pixels) × (BLOCK_C channels) tile of the merged output; P = N·H·W."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < P)[:, None] & (c < C)[None, :]
    n, h, w = p // (H * W), (p // W) % H, p % W
    row_scale = _row_scale_at(row_scale_ptr, n, p < P, ROW_SCALED)
    pre = _pre_activation(
        y0_ptr, y1_ptr, extra_ptr, scale_ptr, shift_ptr, row_scale, n, h, w, c, C, mask,
        s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, se_n, se_c, se_h, se_w, R0, R1, NUM_PARENTS, HAS_EXTRA,
        ROW_SCALED,
    )  # fmt: skip
    out = apply_activation(pre, ACT)
    offsets = n[:, None] * so_n + c[None, :] * so_c + h[:, None] * so_h + w[:, None] * so_w
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_bwd_kernel(
    dy_ptr, dextra_ptr, dscale_partial_ptr, dshift_partial_ptr, dshift_scaled_partial_ptr, grad_ptr, g1_delta,
    g2_delta, g3_delta, y0_ptr, y1_ptr, extra_ptr, scale_ptr, shift_ptr, row_scale_ptr, PL, C, H, W,
    sg_n, sg_c, sg_h, sg_w, sd_n, sd_c, sd_h, sd_w, sx_n, sx_c, sx_h, sx_w,
    s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, se_n, se_c, se_h, se_w,
    TARGET: tl.constexpr, R: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, NUM_PARENTS: tl.constexpr,
    HAS_EXTRA: tl.constexpr, WRITE_DEXTRA: tl.constexpr, ROW_SCALED: tl.constexpr, ACT: tl.constexpr,
    NUM_GRADS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Gradients for parent ``TARGET`` (ratio ``R``) over a tile of its own pixels, PL = N·(H/R)·(W/R).

    grad = the sum of ``NUM_GRADS`` tensors (one per reader of the output; same strides and dtype) as loaded: the
    first at ``grad_ptr``, the others ``g1_delta``… elements after it.

    dpre = grad·act'(pre) is recomputed at the ρ×ρ target pixels of each low-resolution pixel and block-summed:
    dy = scale·Σ dpre; per-program channel partials Σ(Σdpre)·y and Σ dpre go to (programs, C) fp32 buffers.
    With ``WRITE_DEXTRA`` the full-resolution dpre is also stored as the extra input's gradient. With ``ROW_SCALED``
    the first parent's Σ dpre is scaled by its sample's factor (in dy and Σ(Σdpre)·y), and parent 0's programs also
    store Σ factor·Σdpre, its shift's partials.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < PL)[:, None] & (c < C)[None, :]
    HL = H // R
    WL = W // R
    n, hl, wl = p // (HL * WL), (p // WL) % HL, p % WL
    row_scale = _row_scale_at(row_scale_ptr, n, p < PL, ROW_SCALED)
    block_sum = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for k in range(R * R):
        h = hl * R + k // R
        w = wl * R + k % R
        pre = _pre_activation(
            y0_ptr, y1_ptr, extra_ptr, scale_ptr, shift_ptr, row_scale, n, h, w, c, C, mask,
            s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, se_n, se_c, se_h, se_w, R0, R1, NUM_PARENTS, HAS_EXTRA,
            ROW_SCALED,
        )  # fmt: skip
        offsets = n[:, None] * sg_n + c[None, :] * sg_c + h[:, None] * sg_h + w[:, None] * sg_w
        grad = readers_grad(grad_ptr, g1_delta, g2_delta, g3_delta, offsets, mask, NUM_GRADS)
        dpre = grad * activation_grad(pre, ACT)
        dpre = tl.where(mask, dpre, 0.0)
        block_sum += dpre
        if WRITE_DEXTRA:
            offsets = n[:, None] * sx_n + c[None, :] * sx_c + h[:, None] * sx_h + w[:, None] * sx_w
            tl.store(dextra_ptr + offsets, dpre.to(dextra_ptr.dtype.element_ty), mask=mask)
    if TARGET == 0:
        y = tl.load(y0_ptr + n[:, None] * s0_n + c[None, :] * s0_c + hl[:, None] * s0_h + wl[:, None] * s0_w,
                    mask=mask, other=0.0)  # fmt: skip
    else:
        y = tl.load(y1_ptr + n[:, None] * s1_n + c[None, :] * s1_c + hl[:, None] * s1_h + wl[:, None] * s1_w,
                    mask=mask, other=0.0)  # fmt: skip
    row = tl.program_id(0) * C + c
    tl.store(dshift_partial_ptr + row, tl.sum(block_sum, axis=0), mask=c < C)
    if ROW_SCALED and TARGET == 0:
        block_sum = block_sum * row_scale[:, None]
        tl.store(dshift_scaled_partial_ptr + row, tl.sum(block_sum, axis=0), mask=c < C)
    scale = tl.load(scale_ptr + TARGET * C + c, mask=c < C, other=0.0)
    dy = block_sum * scale[None, :]
    tl.store(dy_ptr + n[:, None] * sd_n + c[None, :] * sd_c + hl[:, None] * sd_h + wl[:, None] * sd_w,
             dy.to(dy_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(dscale_partial_ptr + row, tl.sum(block_sum * y.to(tl.float32), axis=0), mask=c < C)


def _parent_args(parents: list[torch.Tensor]) -> list:
    """(y0, y1) pointers and their 8 strides; a missing second parent repeats the first (never read)."""
    y0 = parents[0]
    y1 = parents[1] if len(parents) == 2 else y0
    return [y0, y1, *y0.stride(), *y1.stride()]


def _ratio_args(ratios: list[int]) -> dict:
    return {"R0": ratios[0], "R1": ratios[1] if len(ratios) == 2 else 1, "NUM_PARENTS": len(ratios)}


def _row_scale_arg(row_scale, like: torch.Tensor) -> torch.Tensor:
    """The (N,) per-sample factors as a contiguous tensor (fp32 or fp64), or ``like`` (never read) without them."""
    return row_scale.contiguous() if row_scale is not None else like


def merge_forward(parents, scales, shifts, ratios, extra, row_scale, activation) -> torch.Tensor:
    """Launch the forward kernel; returns (N, C, H, W) in ``parents[0]``'s dtype, channels_last."""
    y0 = parents[0]
    n, c, h, w = y0.shape[0], y0.shape[1], y0.shape[2] * ratios[0], y0.shape[3] * ratios[0]
    out = torch.empty((n, c, h, w), dtype=y0.dtype, device=y0.device, memory_format=torch.channels_last)
    scale = torch.stack([s.float() for s in scales]).contiguous()
    shift = torch.stack([s.float() for s in shifts]).contiguous()
    y0_, y1_, *parent_strides = _parent_args(parents)
    extra_ = extra if extra is not None else y0
    grid = (triton.cdiv(n * h * w, BLOCK_P), triton.cdiv(c, BLOCK_C))
    _merge_fwd_kernel[grid](
        out, y0_, y1_, extra_, scale, shift, _row_scale_arg(row_scale, scale), n * h * w, c, h, w, *out.stride(),
        *parent_strides, *extra_.stride(), **_ratio_args(ratios), HAS_EXTRA=extra is not None,
        ROW_SCALED=row_scale is not None, ACT=ACTIVATION_CODES[activation], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


def merge_backward(grads, parents, scales, shifts, ratios, extra, row_scale, activation) -> tuple:
    """Launch one backward kernel per parent for the output gradient Σ ``grads`` (1 to 4 tensors of one layout);
    returns ``(d_parents, d_scales, d_shifts, d_extra or None)``, d_shifts = [Σ d_pre], with a ``row_scale``
    [Σ row_scale·d_pre (the first parent's), Σ d_pre]."""
    grad = grads[0]
    n, c, h, w = grad.shape
    deltas = reader_deltas(grads)
    scale = torch.stack([s.float() for s in scales]).contiguous()
    shift = torch.stack([s.float() for s in shifts]).contiguous()
    y0_, y1_, *parent_strides = _parent_args(parents)
    extra_ = extra if extra is not None else parents[0]
    d_extra = torch.empty_like(extra, memory_format=torch.channels_last) if extra is not None else None
    d_parents, d_scales, d_shifts = [], [], []
    for target, (y, ratio) in enumerate(zip(parents, ratios)):
        d_y = torch.empty_like(y, memory_format=torch.channels_last)
        low_pixels = n * (h // ratio) * (w // ratio)
        grid = (triton.cdiv(low_pixels, BLOCK_P), triton.cdiv(c, BLOCK_C))
        partial_scale = torch.empty((grid[0], c), dtype=torch.float32, device=grad.device)
        partial_shift = torch.empty_like(partial_scale)
        row_scaled = row_scale is not None and target == 0
        partial_shift_scaled = torch.empty_like(partial_scale) if row_scaled else partial_shift
        write_dextra = extra is not None and target == 0
        d_extra_ = d_extra if write_dextra else d_y
        _merge_bwd_kernel[grid](
            d_y, d_extra_, partial_scale, partial_shift, partial_shift_scaled, grad, *deltas, y0_, y1_, extra_, scale,
            shift, _row_scale_arg(row_scale, scale), low_pixels, c, h, w, *grad.stride(), *d_y.stride(),
            *d_extra_.stride(), *parent_strides, *extra_.stride(), TARGET=target, R=ratio, **_ratio_args(ratios),
            HAS_EXTRA=extra is not None, WRITE_DEXTRA=write_dextra, ROW_SCALED=row_scale is not None,
            ACT=ACTIVATION_CODES[activation], NUM_GRADS=len(grads), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
            num_warps=4 if len(grads) <= 2 else 8,  # more gradients' loads in flight: 4 warps spilled on sm_90
        )  # fmt: skip
        d_parents.append(d_y)
        d_scales.append(partial_scale.sum(0))
        if row_scaled:
            d_shifts.append(partial_shift_scaled.sum(0))
    d_shifts.append(partial_shift.sum(0))
    return d_parents, d_scales, d_shifts, d_extra
