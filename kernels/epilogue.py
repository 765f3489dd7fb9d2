"""GEMM epilogue shared by the convolution kernels: store the output tile and add its channel sums to the stats."""

import triton
import triton.language as tl


@triton.jit
def store_tile_and_channel_stats(y_ptr, stats_ptr, acc, pixel_offsets, pixel_mask, o, sy_c, N_OUT):
    """Store fp32 ``acc`` (BLOCK_M, BLOCK_N) at ``y_ptr + pixel_offsets + o·sy_c`` in y's dtype, and add this
    program's Σ and Σ² over its valid pixels to the zeroed (2, N_OUT) fp32 ``stats`` (atomics: no partial-sum
    buffer, no reduction launch).

    The statistics are of the values as stored (rounded to y's dtype), the tensor that BN later normalises
    (``spinenet_fast.ops.conv_common.conv_outputs`` says why)."""
    mask = pixel_mask[:, None] & (o < N_OUT)[None, :]
    stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pixel_offsets[:, None] + o[None, :] * sy_c, stored, mask=mask)
    acc = tl.where(mask, stored.to(tl.float32), 0.0)
    tl.atomic_add(stats_ptr + o, tl.sum(acc, axis=0), mask=o < N_OUT)
    tl.atomic_add(stats_ptr + N_OUT + o, tl.sum(acc * acc, axis=0), mask=o < N_OUT)
