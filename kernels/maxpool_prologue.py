"""A GEMM prologue that max-pools: ``POOLS`` chained 3×3/s2 max-pools of ``act(scale·y + shift)``, loaded as a tile.

Output pixel (n, h, w) of the last pool covers a tree of 9^POOLS leaf positions of y (N, C, H0, W0): stage s (the
last pool first) picks window position d = 3·dh + dw, i.e. row 2·r − PAD + dh of the level below. ATen pools stage
by stage, each taking the first maximum of its window in row-major order (a NaN always replaces); the pixel its
backward sends the gradient to is therefore the first leaf, in this lexicographic order of the tree, that holds the
maximum. Scanning the leaves in that order with the same comparison gives the maximum and that pixel (the route) in
one pass, without the intermediate pools.
"""

import triton
import triton.language as tl

from .activation import apply_activation


@triton.jit
def pooled_tile(y_ptr, n, h, w, k, mask, sy_n, sy_c, sy_h, sy_w, H0, W0, scale, shift, ACT: tl.constexpr,
                POOLS: tl.constexpr, PAD: tl.constexpr):  # fmt: skip
    """``(pooled, route)`` for pooled pixels (n, h, w) (BLOCK_M,) and channels k (BLOCK_K,): the fp32 maximum
    (−inf where ``mask`` is false) and the level-0 pixel h0·W0 + w0 (int32) ATen's pool-by-pool backward routes its
    gradient to. scale, shift: fp32 (BLOCK_K,); PAD: the pools' padding before (1: torch, 0: tf_same)."""
    best = tl.full(mask.shape, float("-inf"), tl.float32)
    route = tl.full(mask.shape, -1, tl.int32)
    leaves = 1
    for _ in tl.static_range(POOLS):
        leaves *= 9
    for leaf in range(leaves):
        rows, cols, valid = h, w, mask
        place = leaves
        for stage in tl.static_range(POOLS):  # the last pool's window position first
            place = place // 9
            digit = (leaf // place) % 9
            rows = 2 * rows - PAD + digit // 3
            cols = 2 * cols - PAD + digit % 3
            height, width = H0 >> (POOLS - 1 - stage), W0 >> (POOLS - 1 - stage)
            inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            valid = valid & inside[:, None]
        v = tl.load(y_ptr + (n * sy_n + rows * sy_h + cols * sy_w)[:, None] + k[None, :] * sy_c, mask=valid, other=0.0)
        v = apply_activation(v.to(tl.float32) * scale[None, :] + shift[None, :], ACT)
        replaces = valid & ((v > best) | (v != v) | (route < 0))  # the first valid leaf starts, as ATen's does
        best = tl.where(replaces, v, best)
        route = tl.where(replaces, (rows * W0 + cols)[:, None], route)
    return best, route


@triton.jit
def pooled_operand(y_ptr, pooled_ptr, route_ptr, p, n, h, w, k, mask, K, sy_n, sy_c, sy_h, sy_w, H0, W0, scale_ptr,
                   shift_ptr, ACT: tl.constexpr, POOLS: tl.constexpr, PAD: tl.constexpr,
                   STORE: tl.constexpr):  # fmt: skip
    """A GEMM's (pooled pixels p = (n, h, w) × channels k) operand: :func:`pooled_tile` with the BN affine at
    ``scale_ptr``/``shift_ptr`` (K,), 0 outside ``mask``, in y's dtype; with ``STORE`` the programs of the first
    output-channel tile (grid axis 1) also write it, with its route, to the (P, K) NHWC ``pooled_ptr`` /
    ``route_ptr`` — once per pixel and channel."""
    scale = tl.load(scale_ptr + k, mask=k < K, other=0.0)
    shift = tl.load(shift_ptr + k, mask=k < K, other=0.0)
    a, route = pooled_tile(y_ptr, n, h, w, k, mask, sy_n, sy_c, sy_h, sy_w, H0, W0, scale, shift, ACT, POOLS, PAD)
    a = tl.where(mask, a, 0.0).to(y_ptr.dtype.element_ty)
    if STORE:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if tl.program_id(1) == 0:
            nhwc = p[:, None] * K + k[None, :]
            tl.store(pooled_ptr + nhwc, a, mask=mask)
            tl.store(route_ptr + nhwc, route, mask=mask)
    return a
