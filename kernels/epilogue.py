"""GEMM epilogue shared by the convolution kernels: store the output tile and add its channel moments to the stats."""

import torch
import triton
import triton.language as tl


def statistics_buffer(stats: torch.Tensor | None, channels: int, device: torch.device, statistics: bool
                      ) -> torch.Tensor:  # fmt: skip
    """The [Σy; Σy²] a conv launch adds into: the caller's zeroed ``stats``, a new zeroed float64 (2, ``channels``),
    or — without ``statistics`` — an empty (0,) float64 tensor that stands in for them (nothing is added)."""
    if not statistics:
        if stats is not None:
            raise ValueError("stats must be None where no statistics are taken")
        return torch.empty(0, dtype=torch.float64, device=device)
    return torch.zeros((2, channels), dtype=torch.float64, device=device) if stats is None else stats


@triton.jit
def add_tile_moments(stats_ptr, values, rows, o, N_OUT):
    """Add one tile's share of [Σy; Σy²] to the zeroed (2, N_OUT) ``stats`` (float64; float32 where a caller hands
    in such a buffer) by atomics: no partial-sum buffer, no reduction launch. ``values``: the fp32 (BLOCK_M, BLOCK_N)
    tile, ``rows``: its valid rows.

    Written as the tile's moments — n_t·m_t and M2_t + n_t·m_t², with m_t its mean and M2_t = Σ(y − m_t)² formed in
    fp32 on chip — so that the variance Σy²/n − mean², taken in float64 by the finalize, loses nothing to the
    cancellation of a channel whose mean dwarfs its spread: the error of m_t enters both sums alike and cancels; the
    one left is of order eps·|mean|·std, not eps·mean²."""
    mask = rows[:, None] & (o < N_OUT)[None, :]
    n = tl.sum(rows.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(mask, values, 0.0), axis=0) / tl.maximum(n, 1.0)  # (no valid row: zeros added)
    deviation = tl.where(mask, values - mean[None, :], 0.0)
    spread = tl.sum(deviation * deviation, axis=0)
    mean = mean.to(stats_ptr.dtype.element_ty)
    share = mean * n
    tl.atomic_add(stats_ptr + o, share, mask=o < N_OUT)
    tl.atomic_add(stats_ptr + N_OUT + o, spread.to(stats_ptr.dtype.element_ty) + share * mean, mask=o < N_OUT)


@triton.jit
def store_tile_and_channel_stats(y_ptr, stats_ptr, acc, pixel_offsets, pixel_mask, o, sy_c, N_OUT,
                                 STATS: tl.constexpr):  # fmt: skip
    """Store fp32 ``acc`` (BLOCK_M, BLOCK_N) at ``y_ptr + pixel_offsets + o·sy_c`` in y's dtype, and with ``STATS``
    add this program's share of [Σy; Σy²] over its valid pixels to the zeroed (2, N_OUT) ``stats``
    (``add_tile_moments``).

    The statistics are of the values as stored (rounded to y's dtype), the tensor that BN later normalises
    (``spinenet_fast.ops.conv_common.conv_outputs`` says why)."""
    mask = pixel_mask[:, None] & (o < N_OUT)[None, :]
    stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pixel_offsets[:, None] + o[None, :] * sy_c, stored, mask=mask)
    if STATS:
        add_tile_moments(stats_ptr, stored.to(tl.float32), pixel_mask, o, N_OUT)
