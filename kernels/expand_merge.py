"""Triton kernels of ``expand_merge`` (``spinenet_fast/ops/expand_merge.py`` states the maths): a connection's expand
1×1 GEMMs recomputed wherever their outputs are needed, never stored.

Every activation tensor is (N, C, H, W) addressed through its strides (channels_last is the fast layout). A tile of
an expand output, ``e[rows, o] = Σ_k act(scale[k]·h[n, k, h/ρ, w/ρ] + shift[k])·W[o, k]`` at output pixels
(n, h, w), is recomputed by ``_expand_tile`` from the parent's raw squeeze output (an upsampled parent's rows
gathered); dots as the conv kernels take them (``gemm_config``). One or two parents (constexpr ``NUM_PARENTS``);
the second parent's arguments repeat the first's where it is absent (never read). A pooled parent (max-pools after
its prologue) is the pooled tensor its statistics pass stored, without a prologue, from then on.

Launches: forward, per parent ``_expand_stats_kernel`` (Σe, Σe², the BN finalized by its last program), then one
``_expand_merge_fwd_kernel``; backward, one ``_expand_merge_k1_kernel``, then ``_expand_k2_kernel`` once for the
parents at the output's level and once per upsampled parent. K2 never recomputes e: the BN's statistics terms in its
backward are formed from the centred expand input and small (C_h × C_h) maps that K1's last programs build
(:func:`_expand_k2_kernel`). ``expand_merge_affine`` (the BNs' affine maps given): forward the
``_expand_merge_fwd_kernel`` alone; backward the same K1 and K2 launches with ``BATCH_STATS`` off (the maps'
gradients Σdz·e and Σdz; no mean terms).
"""

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, activation_grad, apply_activation
from .bn_finalize import Finalize, finalize_when_last
from .epilogue import add_tile_moments
from .gemm_backward import operand_dot, prologue_tile, store_input_grad
from .gemm_config import gemm_launch_config
from .maxpool_prologue import pooled_operand
from .merge import reader_deltas, readers_grad

from spinenet_fast.ops.expand_merge import Workspace, affine_norms, batch_norms, expand_inputs  # isort: skip (the op's)
from spinenet_fast.ops.expand_merge import pair, parent_scope, prologue_of  # isort: skip
from spinenet_fast.ops.padding import spatial_padding  # isort: skip


@triton.jit
def _expand_tile(h_ptr, w_ptr, scale_ptr, shift_ptr, rows, row_mask, o, K, C, s_c, sw_o, sw_k,
                 HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """e[rows, o] (BLOCK_M, BLOCK_N) fp32: the expand GEMM of the parent's a at row offsets ``rows``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = prologue_tile(h_ptr, rows, k, s_c, row_mask[:, None] & (k < K)[None, :], scale_ptr, shift_ptr, K,
                           HAS_PROLOGUE, ACT)  # fmt: skip
        b = tl.load(w_ptr + o[None, :] * sw_o + k[:, None] * sw_k, mask=(k < K)[:, None] & (o < C)[None, :],
                    other=0.0)  # fmt: skip
        acc = operand_dot(acc, a, b.to(a.dtype), FP32_DOT)
    return acc


@triton.jit
def _pooled_expand_tile(y_ptr, w_ptr, scale_ptr, shift_ptr, pooled_ptr, route_ptr, p, o, P, K, C, HW, W_IMG, H0, W0,
                        sy_n, sy_c, sy_h, sy_w, sw_o, sw_k, ACT: tl.constexpr, POOLS: tl.constexpr,
                        POOL_PAD: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
    """e[p, o] (BLOCK_M, BLOCK_N) fp32 of a pooled parent: a = ``POOLS`` max-pools of act(scale·y + shift) loaded
    by ``maxpool_prologue.pooled_operand`` at pooled pixels p (an (HW / W_IMG, W_IMG) map), which the programs of
    the first output-channel tile store with its route."""
    n, h, w = p // HW, (p % HW) // W_IMG, p % W_IMG
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = pooled_operand(y_ptr, pooled_ptr, route_ptr, p, n, h, w, k, (p < P)[:, None] & (k < K)[None, :], K, sy_n,
                           sy_c, sy_h, sy_w, H0, W0, scale_ptr, shift_ptr, ACT, POOLS, POOL_PAD, True)  # fmt: skip
        b = tl.load(w_ptr + o[None, :] * sw_o + k[:, None] * sw_k, mask=(k < K)[:, None] & (o < C)[None, :],
                    other=0.0)  # fmt: skip
        acc = operand_dot(acc, a, b.to(a.dtype), FP32_DOT)
    return acc


@triton.jit
def _parent_rows(n, h, w, R: tl.constexpr, s_n, s_h, s_w):
    """Offsets of the parent's pixel (n, h/R, w/R) for output pixels (n, h, w)."""
    return n * s_n + (h // R) * s_h + (w // R) * s_w


@triton.jit
def _pixels(p, HW, W_OUT, GROUP: tl.constexpr, LOG_GROUP: tl.constexpr):
    """(n, h, w) of the p-th pixel of an (N, HW / W_OUT, W_OUT) map in the order of ``GROUP``×``GROUP`` groups: the
    groups row-major, the pixels of a group in Morton order, so that every aligned R×R block (R | GROUP, powers of 2)
    is R² consecutive pixels (row-major for GROUP = 1)."""
    if GROUP == 1:
        n, h, w = p // HW, (p % HW) // W_OUT, p % W_OUT
    else:
        group, i = p // (GROUP * GROUP), p % (GROUP * GROUP)
        groups_w = W_OUT // GROUP
        groups_hw = HW // (GROUP * GROUP)
        n, h, w = group // groups_hw, (group % groups_hw) // groups_w * GROUP, group % groups_w * GROUP
        for b in tl.static_range(LOG_GROUP):
            w += ((i >> (2 * b)) & 1) << b
            h += ((i >> (2 * b + 1)) & 1) << b
    return n, h, w


@triton.jit
def _store_block_sum(
    s_ptr, dz, first, P, HW, W_OUT, o, C, ss_n, ss_c, ss_h, ss_w, R: tl.constexpr, GROUP: tl.constexpr,
    LOG_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Store an upsampled parent's gradient Σ_R×R dz at its resolution from the (BLOCK_M pixels from ``first``, in
    :func:`_pixels`' order) × channels o tile ``dz`` (fp32, 0 outside the map)."""
    sums = tl.sum(tl.reshape(dz, (BLOCK_M // (R * R), R * R, BLOCK_N)), axis=1)
    q = first + tl.arange(0, BLOCK_M // (R * R)) * (R * R)  # each block's first pixel
    n, h, w = _pixels(q, HW, W_OUT, GROUP, LOG_GROUP)
    offsets = _parent_rows(n, h, w, R, ss_n, ss_h, ss_w)[:, None] + o[None, :] * ss_c
    tl.store(s_ptr + offsets, sums.to(s_ptr.dtype.element_ty), mask=(q < P)[:, None] & (o < C)[None, :])


@triton.jit
def _expand_stats_kernel(
    stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr, bn_var_ptr,
    running_mean_ptr, running_var_ptr, batches_ptr, count, eps, momentum, unbias, h_ptr, w_ptr, scale_ptr, shift_ptr,
    pooled_ptr, route_ptr, P, K, C, HW, W_IMG, H0, W0, s_n, s_c, s_h, s_w, sw_o, sw_k, HAS_PROLOGUE: tl.constexpr,
    ACT: tl.constexpr, POOLS: tl.constexpr, POOL_PAD: tl.constexpr, FINALIZE: tl.constexpr,
    HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The share of [Σe; Σe²] of one (BLOCK_M parent pixels) × (BLOCK_N channels) tile of e (fp32, not stored), added
    to the zeroed float64 (2, C) stats (``add_tile_moments``); the last program finalizes the BN. With ``POOLS`` the
    parent's pixels are its max-pools' ((H0, W0) the raw map's size), stored with their route
    (``_pooled_expand_tile``)."""
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if POOLS > 0:
        e = _pooled_expand_tile(h_ptr, w_ptr, scale_ptr, shift_ptr, pooled_ptr, route_ptr, p, o, P, K, C, HW, W_IMG,
                                H0, W0, s_n, s_c, s_h, s_w, sw_o, sw_k, ACT, POOLS, POOL_PAD, FP32_DOT, BLOCK_M,
                                BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        rows = _parent_rows(p // HW, (p % HW) // W_IMG, p % W_IMG, 1, s_n, s_h, s_w)
        e = _expand_tile(h_ptr, w_ptr, scale_ptr, shift_ptr, rows, p < P, o, K, C, s_c, sw_o, sw_k, HAS_PROLOGUE,
                         ACT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    add_tile_moments(stats_ptr, e, p < P, o, C)
    if FINALIZE:
        finalize_when_last(stats_ptr, counter_ptr, gamma_ptr, beta_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr,
                           bn_var_ptr, running_mean_ptr, running_var_ptr, batches_ptr, C, count, eps, momentum,
                           unbias, HAS_RUNNING, HAS_COUNTER, 128)  # fmt: skip


@triton.jit
def _pre_activation(
    h0_ptr, w0_ptr, sc0_ptr, sh0_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, bs0_ptr, bb0_ptr, bs1_ptr, bb1_ptr, extra_ptr,
    n, h, w, p_mask, o, C, K0, K1, s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, sw0_o, sw0_k, sw1_o, sw1_k, se_n,
    se_c, se_h, se_w,
    R0: tl.constexpr, R1: tl.constexpr, NUM_PARENTS: tl.constexpr, HAS_EXTRA: tl.constexpr,
    HAS_PROLOGUE0: tl.constexpr, HAS_PROLOGUE1: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``(z, e0, e1)`` at output pixels (n, h, w) (``p_mask``) × channels o: z = Σ_p scale_p·e_p + shift_p (+ extra),
    parent p's BN affine map at ``bs<p>_ptr``, ``bb<p>_ptr`` ((C,) each, the maths dtype); e1 is e0 for one parent."""
    o_mask = o < C
    rows0 = _parent_rows(n, h, w, R0, s0_n, s0_h, s0_w)
    e0 = _expand_tile(h0_ptr, w0_ptr, sc0_ptr, sh0_ptr, rows0, p_mask, o, K0, C, s0_c, sw0_o, sw0_k, HAS_PROLOGUE0,
                      ACT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    z = e0 * tl.load(bs0_ptr + o, mask=o_mask, other=0.0)[None, :]
    z += tl.load(bb0_ptr + o, mask=o_mask, other=0.0)[None, :]
    e1 = e0
    if NUM_PARENTS == 2:
        rows1 = _parent_rows(n, h, w, R1, s1_n, s1_h, s1_w)
        e1 = _expand_tile(h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, rows1, p_mask, o, K1, C, s1_c, sw1_o, sw1_k,
                          HAS_PROLOGUE1, ACT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        z += e1 * tl.load(bs1_ptr + o, mask=o_mask, other=0.0)[None, :]
        z += tl.load(bb1_ptr + o, mask=o_mask, other=0.0)[None, :]
    if HAS_EXTRA:
        offsets = (n * se_n + h * se_h + w * se_w)[:, None] + o[None, :] * se_c
        z += tl.load(extra_ptr + offsets, mask=p_mask[:, None] & o_mask[None, :], other=0.0).to(tl.float32)
    return z, e0, e1


@triton.jit
def _expand_merge_fwd_kernel(
    out_ptr, h0_ptr, w0_ptr, sc0_ptr, sh0_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, bs0_ptr, bb0_ptr, bs1_ptr, bb1_ptr,
    extra_ptr, P, C, HW, W_OUT, K0, K1, so_n, so_c, so_h, so_w, s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w,
    sw0_o, sw0_k, sw1_o, sw1_k, se_n, se_c, se_h, se_w, R0: tl.constexpr, R1: tl.constexpr, NUM_PARENTS: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_PROLOGUE0: tl.constexpr, HAS_PROLOGUE1: tl.constexpr, ACT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels) × (BLOCK_N channels) tile of out = act(z)."""
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h, w = p // HW, (p % HW) // W_OUT, p % W_OUT
    z, _, _ = _pre_activation(
        h0_ptr, w0_ptr, sc0_ptr, sh0_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, bs0_ptr, bb0_ptr, bs1_ptr, bb1_ptr,
        extra_ptr, n, h, w, p < P, o, C, K0, K1, s0_n, s0_c, s0_h, s0_w, s1_n, s1_c, s1_h, s1_w, sw0_o, sw0_k, sw1_o,
        sw1_k, se_n, se_c, se_h, se_w, R0, R1, NUM_PARENTS, HAS_EXTRA, HAS_PROLOGUE0, HAS_PROLOGUE1, ACT, FP32_DOT,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    offsets = (n * so_n + h * so_h + w * so_w)[:, None] + o[None, :] * so_c
    mask = (p < P)[:, None] & (o < C)[None, :]
    tl.store(out_ptr + offsets, apply_activation(z, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _parent_sums(ws_ptr, dz, e, stats_ptr, eps, o, mask, C, BATCH_STATS: tl.constexpr):
    """Add this tile's t = Σdz and k = Σ dz·ê of one parent to its [k; t] rows (``ws_ptr``), ê from its e tile and,
    with ``BATCH_STATS``, its BN's [mean; var] at ``stats_ptr`` (without: ê = e, the affine map's input); ``dz`` is 0
    outside ``mask``."""
    if BATCH_STATS:
        mean = tl.load(stats_ptr + o, mask=o < C, other=0.0)
        inv_std = 1.0 / tl.sqrt(tl.load(stats_ptr + C + o, mask=o < C, other=1.0) + eps)
        e_hat = tl.where(mask, (e - mean[None, :]) * inv_std[None, :], 0.0)
    else:
        e_hat = tl.where(mask, e, 0.0)
    tl.atomic_add(ws_ptr + o, tl.sum(dz * e_hat, axis=0), mask=o < C)
    tl.atomic_add(ws_ptr + C + o, tl.sum(dz, axis=0), mask=o < C)


@triton.jit
def _add_input_sums(terms_ptr, h_ptr, rows, p_mask, sc_ptr, sh_ptr, K, s_c, R: tl.constexpr,
                    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Add this tile's share of a parent's Σa (``terms_ptr``) from its rows at output pixels: an upsampled parent's
    pixel is R² of them."""
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = p_mask[:, None] & (k < K)[None, :]
        a = prologue_tile(h_ptr, rows, k, s_c, mask, sc_ptr, sh_ptr, K, HAS_PROLOGUE, ACT).to(tl.float32)
        tl.atomic_add(terms_ptr + k, tl.sum(a, axis=0) / (R * R), mask=k < K)


@triton.jit
def _add_mean_maps(terms_ptr, w_ptr, bs_ptr, st_ptr, sums_ptr, eps, count, o, C, K, sw_o, sw_k,
                   dtype: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """Add output channels o's share of one parent's b = Σ_o (γ/σ)(t/n)·W[o, :] and M = Wᵀ·diag(q)·W,
    q = (γ/σ²)·k/n (``terms_ptr``: [Σa; b; M; G]; its k, t complete at ``sums_ptr``; W as the dots round it)."""
    o_mask = o < C
    scale = tl.load(bs_ptr + o, mask=o_mask, other=0.0)
    inv_std = 1.0 / tl.sqrt(tl.load(st_ptr + C + o, mask=o_mask, other=1.0) + eps)
    q = scale * inv_std * tl.load(sums_ptr + o, mask=o_mask, other=0.0) / count
    v = scale * tl.load(sums_ptr + C + o, mask=o_mask, other=0.0) / count
    for i0 in range(0, K, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        w_i = tl.load(w_ptr + o[:, None] * sw_o + i[None, :] * sw_k, mask=o_mask[:, None] & (i < K)[None, :],
                      other=0.0).to(dtype).to(tl.float32)  # fmt: skip
        tl.atomic_add(terms_ptr + K + i, tl.sum(v[:, None] * w_i, axis=0), mask=i < K)
        for j0 in range(0, K, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            w_j = tl.load(w_ptr + o[:, None] * sw_o + j[None, :] * sw_k, mask=o_mask[:, None] & (j < K)[None, :],
                          other=0.0).to(dtype).to(tl.float32)  # fmt: skip
            m = _fp32_dot(tl.zeros((BLOCK_K, BLOCK_K), tl.float32), tl.trans(w_i * q[:, None]), w_j, FP32_DOT)
            tl.atomic_add(terms_ptr + 2 * K + i[:, None] * K + j[None, :], m, mask=(i < K)[:, None] & (j < K)[None, :])


@triton.jit
def _expand_merge_k1_kernel(
    dz_ptr, sum0_ptr, sum1_ptr, grad_ptr, g1_delta, g2_delta, g3_delta, ws_ptr, eps0, eps1, h0_ptr, w0_ptr, sc0_ptr,
    sh0_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, bs0_ptr, bb0_ptr, st0_ptr, bs1_ptr, bb1_ptr, st1_ptr, extra_ptr,
    terms0_ptr, terms1_ptr, counters_ptr, count0, count1, P, C,
    HW, W_OUT, K0, K1, sg_n, sg_c, sg_h, sg_w,
    sd_n, sd_c, sd_h, sd_w, ss0_n, ss0_c, ss0_h, ss0_w, ss1_n, ss1_c, ss1_h, ss1_w, s0_n, s0_c, s0_h, s0_w, s1_n, s1_c,
    s1_h, s1_w, sw0_o, sw0_k, sw1_o, sw1_k, se_n, se_c, se_h, se_w, R0: tl.constexpr, R1: tl.constexpr,
    NUM_PARENTS: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_PROLOGUE0: tl.constexpr, HAS_PROLOGUE1: tl.constexpr,
    ACT: tl.constexpr, NUM_GRADS: tl.constexpr, STORE_DZ: tl.constexpr, SUM0: tl.constexpr, SUM1: tl.constexpr,
    GROUP: tl.constexpr, LOG_GROUP: tl.constexpr, BATCH_STATS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels, in :func:`_pixels`' order of ``GROUP``×``GROUP`` groups) × (BLOCK_N channels)
    tile: z recomputed (parent p's map (scale, shift) at ``bs<p>_ptr``, ``bb<p>_ptr``), dz = Σ grads·act'(z) (the
    gradient is the sum of ``NUM_GRADS`` tensors of one layout, ``g*_delta`` elements after the first), stored where
    ``STORE_DZ``; parent i's block sums Σ_Ri×Ri dz stored at its resolution where ``SUM<i>`` (an upsampled parent
    whose R² blocks the tile holds whole); and its share of each parent's [k; t] added into the workspace's (P, 2, C)
    rows (``_parent_sums``: with ``BATCH_STATS`` the BN's [mean; var] at ``st<p>_ptr``). With ``BATCH_STATS`` also
    K2's BN mean terms (``terms<p>_ptr``, see :func:`_expand_k2_kernel`; ``count<p>``: the BN's count): the first
    column of tiles adds each parent's Σa, and the last program of each column (a ticket in ``counters_ptr``: its
    channels' k, t complete) adds their share of b and M (:func:`_add_mean_maps`)."""
    first = tl.program_id(0) * BLOCK_M
    p = first + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (p < P)[:, None] & (o < C)[None, :]
    n, h, w = _pixels(p, HW, W_OUT, GROUP, LOG_GROUP)
    if BATCH_STATS:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if tl.program_id(1) == 0:  # first, while nothing else is live: Σa beside the tile's work spilled on sm_90
            _add_input_sums(terms0_ptr, h0_ptr, _parent_rows(n, h, w, R0, s0_n, s0_h, s0_w), p < P, sc0_ptr, sh0_ptr,
                            K0, s0_c, R0, HAS_PROLOGUE0, ACT, BLOCK_K)  # fmt: skip
            if NUM_PARENTS == 2:
                _add_input_sums(terms1_ptr, h1_ptr, _parent_rows(n, h, w, R1, s1_n, s1_h, s1_w), p < P, sc1_ptr,
                                sh1_ptr, K1, s1_c, R1, HAS_PROLOGUE1, ACT, BLOCK_K)  # fmt: skip
    z, e0, e1 = _pre_activation(
        h0_ptr, w0_ptr, sc0_ptr, sh0_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, bs0_ptr, bb0_ptr, bs1_ptr, bb1_ptr,
        extra_ptr, n, h, w, p < P, o, C, K0, K1, s0_n, s0_c, s0_h, s0_w,
        s1_n, s1_c, s1_h, s1_w, sw0_o, sw0_k, sw1_o, sw1_k, se_n, se_c, se_h, se_w, R0, R1, NUM_PARENTS, HAS_EXTRA,
        HAS_PROLOGUE0, HAS_PROLOGUE1, ACT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    offsets = (n * sg_n + h * sg_h + w * sg_w)[:, None] + o[None, :] * sg_c
    grad = readers_grad(grad_ptr, g1_delta, g2_delta, g3_delta, offsets, mask, NUM_GRADS)
    dz = (grad * activation_grad(z, ACT)).to(h0_ptr.dtype.element_ty)  # the sums are of dz as stored
    if STORE_DZ:
        tl.store(dz_ptr + (n * sd_n + h * sd_h + w * sd_w)[:, None] + o[None, :] * sd_c, dz, mask=mask)
    dz = tl.where(mask, dz.to(tl.float32), 0.0)
    _parent_sums(ws_ptr, dz, e0, st0_ptr, eps0, o, mask, C, BATCH_STATS)
    if SUM0:
        _store_block_sum(sum0_ptr, dz, first, P, HW, W_OUT, o, C, ss0_n, ss0_c, ss0_h, ss0_w, R0, GROUP, LOG_GROUP,
                         BLOCK_M, BLOCK_N)  # fmt: skip
    if NUM_PARENTS == 2:
        _parent_sums(ws_ptr + 2 * C, dz, e1, st1_ptr, eps1, o, mask, C, BATCH_STATS)
        if SUM1:
            _store_block_sum(sum1_ptr, dz, first, P, HW, W_OUT, o, C, ss1_n, ss1_c, ss1_h, ss1_w, R1, GROUP,
                             LOG_GROUP, BLOCK_M, BLOCK_N)  # fmt: skip
    if BATCH_STATS:
        dtype = h0_ptr.dtype.element_ty
        tl.debug_barrier()  # every thread's k, t atomics precede this program's ticket
        ticket = tl.atomic_add(counters_ptr + tl.program_id(1), 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            _add_mean_maps(terms0_ptr, w0_ptr, bs0_ptr, st0_ptr, ws_ptr, eps0, count0, o, C, K0, sw0_o, sw0_k, dtype,
                           FP32_DOT, BLOCK_N, BLOCK_K)  # fmt: skip
            if NUM_PARENTS == 2:
                _add_mean_maps(terms1_ptr, w1_ptr, bs1_ptr, st1_ptr, ws_ptr + 2 * C, eps1, count1, o, C, K1, sw1_o,
                               sw1_k, dtype, FP32_DOT, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _fp32_dot(acc, a, b, FP32_DOT: tl.constexpr):
    """``acc + a·b`` of fp32 operands (the BN mean terms' small GEMMs): IEEE with ``FP32_DOT`` (fp32 storage), else
    TF32 (bf16/fp16 storage: the terms are centred, so TF32 rounds relative to them, finer than the storage)."""
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _centred_input(h_ptr, rows, p_mask, k, s_c, sc_ptr, sh_ptr, terms_ptr, count, K, HAS_PROLOGUE: tl.constexpr,
                   ACT: tl.constexpr):  # fmt: skip
    """a − ā (fp32; 0 outside the map) at rows × squeezed channels k: the expand's operand recomputed and centred on
    its mean over the parent's ``count`` pixels (Σa at ``terms_ptr``)."""
    mask = p_mask[:, None] & (k < K)[None, :]
    a = prologue_tile(h_ptr, rows, k, s_c, mask, sc_ptr, sh_ptr, K, HAS_PROLOGUE, ACT).to(tl.float32)
    mean = tl.load(terms_ptr + k, mask=k < K, other=0.0) / count
    return tl.where(mask, a - mean[None, :], 0.0)


@triton.jit
def _mean_terms(terms_ptr, h_ptr, rows, p_mask, j, sc_ptr, sh_ptr, count, K, s_c, HAS_PROLOGUE: tl.constexpr,
                ACT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """The statistics' share of da[:, j]: b[j] + (a − ā)·M[:, j] (``terms_ptr``: [Σa; b; M; G], see
    :func:`_expand_k2_kernel`), (BLOCK_M, BLOCK_N) fp32; this tile's share of the centred Gram G[:, j] added."""
    j_mask = j < K
    c_j = _centred_input(h_ptr, rows, p_mask, j, s_c, sc_ptr, sh_ptr, terms_ptr, count, K, HAS_PROLOGUE, ACT)
    terms = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + tl.load(terms_ptr + K + j, mask=j_mask, other=0.0)[None, :]
    for i0 in range(0, K, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        square = (i < K)[:, None] & j_mask[None, :]
        c_i = _centred_input(h_ptr, rows, p_mask, i, s_c, sc_ptr, sh_ptr, terms_ptr, count, K, HAS_PROLOGUE, ACT)
        m = tl.load(terms_ptr + 2 * K + i[:, None] * K + j[None, :], mask=square, other=0.0)
        terms = _fp32_dot(terms, c_i, m, FP32_DOT)
        gram = _fp32_dot(tl.zeros((BLOCK_K, BLOCK_N), tl.float32), tl.trans(c_i), c_j, FP32_DOT)
        tl.atomic_add(terms_ptr + 2 * K + K * K + i[:, None] * K + j[None, :], gram, mask=square)
    return terms


@triton.jit
def _weight_mean_terms_when_last(counter_ptr, tiles, terms_ptr, dw_ptr, w_ptr, stats_ptr, gamma_ptr, sums_ptr, eps,
                                 count, C, K, j, sw_o, sw_k, dtype: tl.constexpr, FP32_DOT: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """After this program's share of G[:, j], a ticket from the zeroed ``counter_ptr`` (this j-tile's); the holder of
    the last of the ``tiles`` tickets (G[:, j] complete) adds the statistics' share of dW[:, j]:
    −(γ/σ)(t/n)·Σa[j] − q·(W·G)[:, j], q = (γ/σ²)·k/n, for every output channel."""
    tl.debug_barrier()  # every thread's Gram atomics precede this program's ticket
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == tiles - 1:
        j_mask = j < K
        input_sums = tl.load(terms_ptr + j, mask=j_mask, other=0.0)
        for o0 in range(0, C, BLOCK_K):
            o = o0 + tl.arange(0, BLOCK_K)
            o_mask = o < C
            inv_std = 1.0 / tl.sqrt(tl.load(stats_ptr + C + o, mask=o_mask, other=1.0) + eps)
            gain = tl.load(gamma_ptr + o, mask=o_mask, other=0.0).to(tl.float32) * inv_std
            q = gain * inv_std * tl.load(sums_ptr + o, mask=o_mask, other=0.0) / count
            v = gain * tl.load(sums_ptr + C + o, mask=o_mask, other=0.0) / count
            wg = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
            for i0 in range(0, K, BLOCK_K):
                i = i0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_ptr + o[:, None] * sw_o + i[None, :] * sw_k, mask=o_mask[:, None] & (i < K)[None, :],
                            other=0.0).to(dtype).to(tl.float32)  # fmt: skip
                gram = tl.load(terms_ptr + 2 * K + K * K + i[:, None] * K + j[None, :],
                               mask=(i < K)[:, None] & j_mask[None, :], other=0.0)  # fmt: skip
                wg = _fp32_dot(wg, w, gram, FP32_DOT)
            d_w = -(v[:, None] * input_sums[None, :] + q[:, None] * wg)
            tl.atomic_add(dw_ptr + o[:, None] * K + j[None, :], d_w, mask=o_mask[:, None] & j_mask[None, :])


@triton.jit
def _k2_tile(
    pid_m, pid_j, tiles_m, dh_ptr, dw_ptr, dbn_ptr, dz_ptr, h_ptr, w_ptr, sc_ptr, sh_ptr, stats_ptr, gamma_ptr,
    sums_ptr, affine_grad_ptr, terms_ptr, counter_ptr, eps, P, C, K, HW, W_IMG, sz_n, sz_c, sz_h, sz_w, s_n, s_c, s_h,
    s_w, sd_n, sd_c, sd_h, sd_w, sw_o, sw_k, R: tl.constexpr, HAS_PROLOGUE: tl.constexpr, BATCH_STATS: tl.constexpr,
    ACT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Tile (pid_m, pid_j) of one parent's backward (see :func:`_expand_k2_kernel`)."""
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask, j_mask = p < P, j < K
    n, hp, wp = p // HW, (p % HW) // W_IMG, p % W_IMG
    rows = n * s_n + hp * s_h + wp * s_w
    a_mask = p_mask[:, None] & j_mask[None, :]
    a_j = prologue_tile(h_ptr, rows, j, s_c, a_mask, sc_ptr, sh_ptr, K, HAS_PROLOGUE, ACT)
    dtype = h_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for o0 in range(0, C, BLOCK_K):
        o = o0 + tl.arange(0, BLOCK_K)
        o_mask = o < C
        mask = p_mask[:, None] & o_mask[None, :]
        dz = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for child in range(R * R):
            child_rows = n * sz_n + (hp * R + child // R) * sz_h + (wp * R + child % R) * sz_w
            dz += tl.load(dz_ptr + child_rows[:, None] + o[None, :] * sz_c, mask=mask, other=0.0).to(tl.float32)
        gain = tl.load(gamma_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
        if BATCH_STATS:
            gain *= 1.0 / tl.sqrt(tl.load(stats_ptr + C + o, mask=o_mask, other=1.0) + eps)
        de = tl.where(mask, gain[None, :] * dz, 0.0)
        b = tl.load(w_ptr + o[:, None] * sw_o + j[None, :] * sw_k, mask=o_mask[:, None] & j_mask[None, :], other=0.0)
        de = de.to(dtype)
        acc = operand_dot(acc, de, b.to(dtype), FP32_DOT)
        d_w = operand_dot(tl.zeros((BLOCK_K, BLOCK_N), tl.float32), tl.trans(de), a_j, FP32_DOT)
        tl.atomic_add(dw_ptr + o[:, None] * K + j[None, :], d_w, mask=o_mask[:, None] & j_mask[None, :])
        if (pid_m == 0) & (pid_j == 0):
            tl.store(dbn_ptr + o, tl.load(sums_ptr + o, mask=o_mask).to(dbn_ptr.dtype.element_ty), mask=o_mask)
            tl.store(dbn_ptr + C + o, tl.load(sums_ptr + C + o, mask=o_mask).to(dbn_ptr.dtype.element_ty),
                     mask=o_mask)  # fmt: skip
    if BATCH_STATS:
        acc -= _mean_terms(terms_ptr, h_ptr, rows, p_mask, j, sc_ptr, sh_ptr, P, K, s_c, HAS_PROLOGUE, ACT, FP32_DOT,
                           BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    store_input_grad(acc, dh_ptr, n * sd_n + hp * sd_h + wp * sd_w, sd_c, h_ptr, rows, s_c, sc_ptr, sh_ptr,
                     affine_grad_ptr, affine_grad_ptr + K, j, a_mask, K, HAS_PROLOGUE, ACT)  # fmt: skip
    if BATCH_STATS:
        _weight_mean_terms_when_last(counter_ptr + pid_j, tiles_m, terms_ptr, dw_ptr, w_ptr, stats_ptr, gamma_ptr,
                                     sums_ptr, eps, P, C, K, j, sw_o, sw_k, dtype, FP32_DOT, BLOCK_N,
                                     BLOCK_K)  # fmt: skip


@triton.jit
def _expand_k2_kernel(
    dz_ptr, P, C, HW, W_IMG, J0, J, sz_n, sz_c, sz_h, sz_w,
    dh0_ptr, dw0_ptr, dbn0_ptr, h0_ptr, w0_ptr, sc0_ptr, sh0_ptr, stats0_ptr, gamma0_ptr, sums0_ptr, affine_grad0_ptr,
    terms0_ptr, counters0_ptr, eps0, K0, s0_n, s0_c, s0_h, s0_w, sd0_n, sd0_c, sd0_h, sd0_w, sw0_o, sw0_k,
    dh1_ptr, dw1_ptr, dbn1_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr, stats1_ptr, gamma1_ptr, sums1_ptr, affine_grad1_ptr,
    terms1_ptr, counters1_ptr, eps1, K1, s1_n, s1_c, s1_h, s1_w, sd1_n, sd1_c, sd1_h, sd1_w, sw1_o, sw1_k,
    R: tl.constexpr, NUM_PARENTS: tl.constexpr, HAS_PROLOGUE0: tl.constexpr, HAS_PROLOGUE1: tl.constexpr,
    BATCH_STATS: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The backward of one or two parents that read one gradient map dz at R× their resolution (dz at theirs, R = 1,
    for a connection's same-level and pooled parents together, or one upsampled parent's block sums; the output's dz
    for R > 1), one (BLOCK_M parent pixels) × (BLOCK_N squeezed channels j) tile per program: program i is pixel tile
    i // J and j-tile i % J of the J = J0 + J1 tiles of the parents' channels (parent 0's first), so the programs
    reading a dz tile run together (J: every parent's tiles).

    BN's backward de = (γ/σ)(S − t/P − ê·k/P) (S = Σ_R×R dz; P: the BN's count, the parent's pixels; t, k at
    ``sums*_ptr``) splits into the gradient's term s = (γ/σ)·S and the statistics' terms, which are linear in the
    centred expand input a − ā (ê·σ = (a − ā)·Wᵀ), so nothing recomputes e: per block of BLOCK_K output channels o,
    da[:, j] += s·W[o, j] and dW[o, j] += sᵀa[:, j] (fp32 atomics into the zeroed ``dw*_ptr``); then
    da[:, j] −= b[j] + (a − ā)·M[:, j] with b = Σ_o (γ/σ)(t/P)·W[o, :] and M = Wᵀ·diag(q)·W, q = (γ/σ²)·k/P (K1's
    last programs wrote both into ``terms*_ptr``, [Σa; b; M; G]), and each program adds its share of the centred
    Gram G = (a − ā)ᵀ(a − ā); the last program of each j-tile (a ticket in ``counters*_ptr``) adds the statistics'
    share of dW[:, j] (:func:`_weight_mean_terms_when_last`). Without ``BATCH_STATS`` (an affine map: its scale at
    ``gamma*_ptr``) de = scale·S and no more. Then the prologue's backward: dh = da·act'(scale·h + shift)·scale
    stored, Σ da·act'·h and Σ da·act' added to the (2, K) ``affine_grad*_ptr`` (without a prologue dh = da). Each
    parent's tile (0, 0) stores its k, t (``dbn*_ptr``, (2, C)): dγ, dβ of a BN, d_scale, d_shift of a map."""
    pid_m, pid_j = tl.program_id(0) // J, tl.program_id(0) % J
    tiles_m = tl.num_programs(0) // J
    if pid_j < J0:
        _k2_tile(pid_m, pid_j, tiles_m, dh0_ptr, dw0_ptr, dbn0_ptr, dz_ptr, h0_ptr, w0_ptr, sc0_ptr, sh0_ptr,
                 stats0_ptr, gamma0_ptr, sums0_ptr, affine_grad0_ptr, terms0_ptr, counters0_ptr, eps0, P, C, K0, HW,
                 W_IMG, sz_n, sz_c, sz_h, sz_w, s0_n, s0_c, s0_h, s0_w, sd0_n, sd0_c, sd0_h, sd0_w, sw0_o, sw0_k, R,
                 HAS_PROLOGUE0, BATCH_STATS, ACT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    elif NUM_PARENTS == 2:
        _k2_tile(pid_m, pid_j - J0, tiles_m, dh1_ptr, dw1_ptr, dbn1_ptr, dz_ptr, h1_ptr, w1_ptr, sc1_ptr, sh1_ptr,
                 stats1_ptr, gamma1_ptr, sums1_ptr, affine_grad1_ptr, terms1_ptr, counters1_ptr, eps1, P, C, K1, HW,
                 W_IMG, sz_n, sz_c, sz_h, sz_w, s1_n, s1_c, s1_h, s1_w, sd1_n, sd1_c, sd1_h, sd1_w, sw1_o, sw1_k, R,
                 HAS_PROLOGUE1, BATCH_STATS, ACT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


# PTX .maxnreg of K1 and K2, stated (at most 8 warps: one program fits an SM's registers): left to its heuristic,
# ptxas capped K1's fp32 variant for a parent without a prologue beside one with it at 80 registers and spilled.
MAX_REGISTERS = 255


def _prologue_pointers(scale, shift, w2d) -> tuple:
    """A parent's prologue (scale, shift) as kernel arguments: the weight stands in for an absent one (never read)."""
    return (scale.contiguous(), shift.contiguous()) if scale is not None else (w2d, w2d)


def _workspace(workspace, weights, parents):
    return Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents])


def _parent_args(inputs, prologues, weights) -> tuple[list, list, list]:
    """(pointers h0, w0, sc0, sh0, h1, w1, sc1, sh1), (their strides), (K0, K1) of the parents' expand inputs: the
    second repeats the first."""
    chosen = [0, min(1, len(inputs) - 1)]
    pointers, strides = [], []
    for i in chosen:
        w2d = weights[i].view(weights[i].shape[:2])
        scale, shift = prologues[i]
        pointers += [inputs[i], w2d, *_prologue_pointers(scale, shift, w2d)]
        strides.append((*inputs[i].stride(), *w2d.stride()))
    return pointers, [s[:4] for s in strides] + [s[4:] for s in strides], [inputs[i].shape[1] for i in chosen]


def _constexprs(inputs, prologues, ratios, activation) -> dict:
    flags = [scale is not None for scale, _ in prologues]
    return dict(R0=ratios[0], R1=ratios[-1], NUM_PARENTS=len(inputs), HAS_PROLOGUE0=flags[0],
                HAS_PROLOGUE1=flags[-1], ACT=ACTIVATION_CODES[activation])  # fmt: skip


def _statistics_launcher(h, weight, scale, shift, activation, num_pools, padding, counter, bn, config):
    """``bn_finalize``'s signature for one parent's ``_expand_stats_kernel`` launch (``with_running_update``): its
    finalize writes ``bn`` (4, C) [scale; shift; mean; var]. Returns ``(launch, pooled, route)``: a pooled parent's
    max-pools and route ((N, C_h, H0 >> pools, W0 >> pools) channels_last, stored by the launch; empty without
    pools)."""
    n, c_h, height0, width0 = h.shape
    height, width = height0 >> num_pools, width0 >> num_pools
    w2d = weight.view(weight.shape[:2])
    prologue = _prologue_pointers(scale, shift, w2d)
    size, layout = ((n, c_h, height, width), torch.channels_last) if num_pools else ((0,), torch.contiguous_format)
    pooled = torch.empty(size, dtype=h.dtype, device=h.device, memory_format=layout)
    route = torch.empty(size, dtype=torch.int32, device=h.device, memory_format=layout)

    def launch(stats, count, gamma, beta, eps, running_mean, running_var, batches, momentum, unbias):
        finalize = Finalize(counter, gamma.contiguous(), beta.contiguous(), tuple(bn.unbind()), running_mean,
                            running_var, batches, count, eps, momentum, unbias)  # fmt: skip
        bn_args, bn_constexprs = finalize.launch_args()
        grid = (triton.cdiv(count, config["BLOCK_M"]), triton.cdiv(w2d.shape[0], config["BLOCK_N"]))
        _expand_stats_kernel[grid](
            stats, *bn_args, h, w2d, *prologue, pooled if num_pools else h, route if num_pools else stats, count,
            c_h, w2d.shape[0], height * width, width, height0, width0, *h.stride(), *w2d.stride(),
            HAS_PROLOGUE=scale is not None, ACT=ACTIVATION_CODES[activation], POOLS=num_pools,
            POOL_PAD=spatial_padding(3, 2, padding)[0], **bn_constexprs, **config,
        )  # fmt: skip
        return finalize.outputs

    return launch, pooled, route


def expand_merge_forward(parents, scales, shifts, weights, ratios, extra, activation, bn_weights, bn_biases, eps,
                         running_means, running_vars, batches, momentums, pools, padding, workspace):  # fmt: skip
    """The op's forward on Triton: ``(out, [scale; shift; mean; var] (P, 4, C) fp32, pooled_0, pooled_1, route_0,
    route_1)`` (see ``ops/expand_merge.py``)."""
    from spinenet_fast.ops.bn_finalize import with_running_update

    ws = _workspace(workspace, weights, parents)
    h0, channels = parents[0], weights[0].shape[0]
    config = gemm_launch_config(h0.dtype, _expand_stats_kernel)
    bn = workspace.new_empty((len(parents), 4, channels))  # per parent [scale; shift; mean; var]
    pooled, routes = [], []
    for i, (h, weight, ratio) in enumerate(zip(parents, weights, ratios)):
        pixels = h.shape[0] * (h.shape[2] >> pools[i]) * (h.shape[3] >> pools[i])
        total = pixels * ratio**2
        running = (running_means[i], running_vars[i]) if running_means else (None, None)
        statistics, pooled_i, route_i = _statistics_launcher(
            h, weight, *prologue_of(scales, shifts, i), activation, pools[i], padding,
            ws.counters[i], bn[i], config,
        )  # fmt: skip
        with parent_scope(i):
            with_running_update(statistics, ws.stats[i], pixels, bn_weights[i], bn_biases[i], eps[i], *running,
                                batches[i] if batches else None, momentums[i], total / (total - 1))  # fmt: skip
        pooled.append(pooled_i)
        routes.append(route_i)
    inputs, prologues = expand_inputs(parents, scales, shifts, pools, pooled)
    out = _merged(inputs, prologues, weights, ratios, extra, activation, [(b[0], b[1]) for b in bn])
    return out, bn, *pair(pooled, out), *pair(routes, routes[0])


def expand_merge_affine_forward(parents, scales, shifts, weights, ratios, extra, activation, bn_scales, bn_shifts):
    """``expand_merge_affine`` on Triton (see ``ops/expand_merge_affine.py``): one launch."""
    prologues = [prologue_of(scales, shifts, i) for i in range(len(parents))]
    return _merged(parents, prologues, weights, ratios, extra, activation, list(zip(bn_scales, bn_shifts)))


def _merged(inputs, prologues, weights, ratios, extra, activation, affines) -> torch.Tensor:
    """out = act(Σ_p upsample(scale_p·e_p + shift_p, ρ_p) (+ extra)), (N, C, H, W) channels_last, in one launch of
    ``_expand_merge_fwd_kernel``: each e_p recomputed from its expand input and prologue (``expand_inputs``);
    ``affines``: per parent its BN's (scale, shift), (C,) each in the maths dtype."""
    h0, channels = inputs[0], weights[0].shape[0]
    n, height, width = h0.shape[0], h0.shape[2] * ratios[0], h0.shape[3] * ratios[0]
    out = torch.empty((n, channels, height, width), dtype=h0.dtype, device=h0.device, memory_format=torch.channels_last)
    pointers, strides, ks = _parent_args(inputs, prologues, weights)
    extra_ = extra if extra is not None else out
    config = gemm_launch_config(h0.dtype, _expand_merge_fwd_kernel)
    grid = (triton.cdiv(n * height * width, config["BLOCK_M"]), triton.cdiv(channels, config["BLOCK_N"]))
    _expand_merge_fwd_kernel[grid](
        out, *pointers, *affines[0], *affines[-1], extra_, n * height * width, channels, height * width, width, *ks,
        *out.stride(), *strides[0], *strides[1], *strides[2], *strides[3], *extra_.stride(),
        HAS_EXTRA=extra is not None, **_constexprs(inputs, prologues, ratios, activation), **config,
    )  # fmt: skip
    return out


def _block_summed(ratios, block_m) -> list[bool]:
    """Which parents' gradients K1 sums over their R×R blocks as it goes: those upsampled by a power of 2 whose
    blocks fit a tile of K1's pixels."""
    return [ratio > 1 and ratio & (ratio - 1) == 0 and ratio**2 <= block_m for ratio in ratios]


def _stats_pointer(norm):
    """A parent's BN [mean; var] as a kernel argument: its gain stands in for a map's (never read)."""
    return norm.stats if norm.stats is not None else norm.gain


def _mean_term_pointers(ws, i: int) -> tuple:
    """Parent i's BN mean terms and its K2 tickets (``Workspace``) as kernel arguments: its sums stand in for a map's
    (never read)."""
    if ws.mean_terms:
        return ws.mean_terms[i], ws.tile_counters[i]
    return ws.sums[i], ws.sums[i]


def _k2_parent_args(dh, d_weight, d_bn, h, prologue, weight, norm, sums, affine_grads, mean_terms):
    """One parent's share of ``_expand_k2_kernel``'s arguments (``norm``: its ``ExpandNorm``; ``mean_terms``:
    :func:`_mean_term_pointers`)."""
    w2d = weight.view(weight.shape[:2])
    return [dh, d_weight, d_bn, h, w2d, *_prologue_pointers(*prologue, w2d), _stats_pointer(norm), norm.gain, sums,
            affine_grads, *mean_terms,
            norm.eps, h.shape[1], *h.stride(), *dh.stride(), *w2d.stride()]  # fmt: skip


def _launch_k2(dz, ratio, parents: list[int], args: list[list], inputs, prologues, activation, batch_stats, config):
    """One ``_expand_k2_kernel`` launch for ``parents`` (one or two indices, their ``_k2_parent_args`` in ``args``)
    reading ``dz`` at ``ratio``× their resolution."""
    h = inputs[parents[0]]
    count = h.shape[0] * h.shape[2] * h.shape[3]
    tiles = [triton.cdiv(inputs[i].shape[1], config["BLOCK_N"]) for i in parents]
    second = args[1] if len(parents) == 2 else args[0]
    flags = [prologues[i][0] is not None for i in parents]
    _expand_k2_kernel[(triton.cdiv(count, config["BLOCK_M"]) * sum(tiles),)](
        dz, count, dz.shape[1], h.shape[2] * h.shape[3], h.shape[3], tiles[0], sum(tiles), *dz.stride(), *args[0],
        *second, R=ratio, NUM_PARENTS=len(parents), HAS_PROLOGUE0=flags[0], HAS_PROLOGUE1=flags[-1],
        BATCH_STATS=batch_stats, ACT=ACTIVATION_CODES[activation], **config,
    )  # fmt: skip


def expand_merge_backward(grads, parents, scales, shifts, weights, ratios, extra, activation, bn_weights, bn_biases,
                          bn, eps, pools, padding, pooled, routes, workspace) -> list[torch.Tensor]:  # fmt: skip
    """The op's backward on Triton: ``[*dh_p, *dW_p, *[dγ_p; dβ_p], (d_extra)]`` (see ``ops/expand_merge.py``;
    :func:`_connection_backward`). A pooled parent's gradient then goes through ``bn_act_maxpool_backward`` (the
    extension's one-pass gather on a GPU), on the backend ``auto`` takes (it has no Triton kernel)."""
    from spinenet_fast.ops import backends
    from spinenet_fast.ops.bn_act_maxpool import _maxpool_backward_into_op

    ws = _workspace(workspace, weights, parents)
    inputs, prologues = expand_inputs(parents, scales, shifts, pools, pooled)
    d_parents, d_weights, d_bns, d_extra = _connection_backward(
        grads, inputs, prologues, weights, ratios, extra, activation, batch_norms(bn, bn_weights, eps), ws
    )  # fmt: skip
    for i, num_pools in enumerate(pools):
        if num_pools:
            with parent_scope(i), backends.auto_where_unimplemented("bn_act_maxpool_backward_into"):
                d_parents[i] = _maxpool_backward_into_op(
                    d_parents[i], parents[i], routes[i], scales[i], shifts[i], activation, num_pools, padding,
                    ws.affine_grads[i],
                )  # fmt: skip
    return [*d_parents, *d_weights, *d_bns, *d_extra]


def expand_merge_affine_backward(grads, parents, scales, shifts, weights, ratios, extra, activation, bn_scales,
                                 bn_shifts, workspace) -> list[torch.Tensor]:  # fmt: skip
    """``expand_merge_affine``'s backward on Triton: ``[*dh_p, *dW_p, *[d_scale_p; d_shift_p], (d_extra)]`` (see
    ``ops/expand_merge_affine.py``; :func:`_connection_backward`)."""
    ws = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents], statistics=False)
    prologues = [prologue_of(scales, shifts, i) for i in range(len(parents))]
    d_parents, d_weights, d_bns, d_extra = _connection_backward(
        grads, parents, prologues, weights, ratios, extra, activation, affine_norms(bn_scales, bn_shifts), ws
    )  # fmt: skip
    return [*d_parents, *d_weights, *d_bns, *d_extra]


def _connection_backward(grads, inputs, prologues, weights, ratios, extra, activation, norms, ws) -> tuple:
    """The backward of act(Σ_p upsample(norm_p(conv1x1(act(scale_p·h_p + shift_p), W_p)), ρ_p) + extra) from each
    parent's expand input and prologue (``inputs``, ``prologues``) and its ``ExpandNorm`` (a BN with batch statistics
    or a given affine map: all of one kind): ``(dh_p, dW_p, [k_p; t_p], [d_extra])`` — an fp32 weight's dW left in
    its slice of the workspace ``ws`` (an empty stand-in returned). K1 stores dz where a same-level parent, an
    unsummed upsampled parent or ``extra`` needs it, and each summed upsampled parent's block sums
    (``_block_summed``); then one K2 launch covers the same-level parents (reading dz once: the merge's launch) and one
    each upsampled parent (its block sums, or dz)."""
    grad = grads[0]
    deltas = reader_deltas(grads)
    h0, channels = inputs[0], weights[0].shape[0]
    n, _, height, width = grad.shape
    batch_stats = norms[0].stats is not None
    config = gemm_launch_config(h0.dtype, _expand_merge_k1_kernel) | {"maxnreg": MAX_REGISTERS}
    summed = _block_summed(ratios, config["BLOCK_M"])
    group = max([r for r, s in zip(ratios, summed) if s], default=1)
    store_dz = extra is not None or not all(summed)
    dz = torch.empty_like(grad, memory_format=torch.channels_last, dtype=h0.dtype) if store_dz else grad
    block_sums = [
        torch.empty((n, channels, height // r, width // r), dtype=h0.dtype, device=grad.device,
                    memory_format=torch.channels_last) if s else dz
        for r, s in zip(ratios, summed)
    ]  # fmt: skip
    pointers, strides, ks = _parent_args(inputs, prologues, weights)
    extra_ = extra if extra is not None else dz
    sums_, sums_strides = pair(block_sums, dz), [*block_sums[0].stride(), *block_sums[-1].stride()]
    maps = [(norm.scale, norm.shift, _stats_pointer(norm)) for norm in (norms[0], norms[-1])]
    grid = (triton.cdiv(n * height * width, config["BLOCK_M"]), triton.cdiv(channels, config["BLOCK_N"]))
    terms = [_mean_term_pointers(ws, i)[0] for i in (0, len(inputs) - 1)]
    counters = ws.column_counters if batch_stats else ws.sums
    counts = [h.shape[0] * h.shape[2] * h.shape[3] for h in (inputs[0], inputs[-1])]
    _expand_merge_k1_kernel[grid](
        dz, *sums_, grad, *deltas, ws.sums, norms[0].eps, norms[-1].eps, *pointers, *maps[0], *maps[1], extra_,
        *terms, counters, *counts,
        n * height * width, channels, height * width, width, *ks, *grad.stride(), *dz.stride(), *sums_strides,
        *strides[0], *strides[1], *strides[2], *strides[3], *extra_.stride(), HAS_EXTRA=extra is not None,
        NUM_GRADS=len(grads), STORE_DZ=store_dz, SUM0=summed[0], SUM1=summed[-1], GROUP=group,
        LOG_GROUP=group.bit_length() - 1, BATCH_STATS=batch_stats, **_constexprs(inputs, prologues, ratios, activation),
        **config,
    )  # fmt: skip
    # Half-width squeezed-channel tiles and, for the FMA (fp32) dots, 8 warps: while K2 recomputed e, with the GEMM
    # tiles' a·Wᵀ, de·W and deᵀa live together, the shared configuration spilled on sm_90 (255 registers bf16; 168
    # fp32); with the mean terms instead of a·Wᵀ these tiles take 190–242 registers. The register cap stated: left to
    # its heuristic, ptxas capped the two-parent fp32 variants at 128 registers and spilled 16 bytes.
    config = gemm_launch_config(h0.dtype, _expand_k2_kernel) | {"maxnreg": MAX_REGISTERS}
    config["BLOCK_N"] //= 2
    if config["FP32_DOT"]:
        config["num_warps"] = 8
    d_parents = [torch.empty_like(h, memory_format=torch.channels_last) for h in inputs]
    d_bns = [torch.empty((2, channels), dtype=norm.gain.dtype, device=h0.device) for norm in norms]
    args = [
        _k2_parent_args(d_parents[i], ws.weight_grads[i], d_bns[i], inputs[i], prologues[i], weights[i], norms[i],
                        ws.sums[i], ws.affine_grads[i], _mean_term_pointers(ws, i))
        for i in range(len(inputs))
    ]  # fmt: skip
    level = [i for i, ratio in enumerate(ratios) if ratio == 1]
    k2 = lambda *a: _launch_k2(*a, inputs, prologues, activation, batch_stats, config)  # noqa: E731
    if len(level) == 2:
        k2(dz, 1, level, [args[i] for i in level])
    for i, ratio in enumerate(ratios):
        with parent_scope(i):
            if ratio > 1:
                k2(block_sums[i] if summed[i] else dz, 1 if summed[i] else ratio, [i], [args[i]])
            elif len(level) == 1:
                k2(dz, 1, [i], [args[i]])
    d_weights = [d_w.new_empty(0) if weight.dtype == d_w.dtype else d_w.view(weight.shape).to(weight.dtype)
                 for d_w, weight in zip(ws.weight_grads, weights)]  # fmt: skip
    return d_parents, d_weights, d_bns, [dz] if extra is not None else []
