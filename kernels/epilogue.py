"""GEMM epilogue shared by the convolution kernels: store the output tile and its channel partial sums."""

import triton
import triton.language as tl


@triton.jit
def store_tile_and_channel_stats(y_ptr, sum_ptr, sumsq_ptr, acc, pixel_offsets, pixel_mask, o, sy_c, N_OUT):
    """Store fp32 ``acc`` (BLOCK_M, BLOCK_N) at ``y_ptr + pixel_offsets + o·sy_c`` in y's dtype, and this
    program's Σ and Σ² over its valid pixels into row ``program_id(0)`` of the (programs, N_OUT) buffers.

    The statistics are of the values as stored (rounded to y's dtype), the tensor that BN later normalises
    (``spinenet_fast.ops.conv_common.conv_outputs`` says why)."""
    mask = pixel_mask[:, None] & (o < N_OUT)[None, :]
    stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pixel_offsets[:, None] + o[None, :] * sy_c, stored, mask=mask)
    acc = tl.where(mask, stored.to(tl.float32), 0.0)
    row = tl.program_id(0) * N_OUT + o
    tl.store(sum_ptr + row, tl.sum(acc, axis=0), mask=o < N_OUT)
    tl.store(sumsq_ptr + row, tl.sum(acc * acc, axis=0), mask=o < N_OUT)
