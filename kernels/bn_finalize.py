"""Triton kernel turning per-channel Σy, Σy² into BatchNorm's folded affine map (and batch mean / variance)."""

import torch
import triton
import triton.language as tl

BLOCK_C = 128


@triton.jit
def _bn_finalize_kernel(
    sums_ptr, sumsq_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr, C, count, eps,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """mean = Σ/n, var = Σ²/n − mean² (biased, ≥ 0), scale = γ/sqrt(var + eps), shift = β − mean·scale."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    mean = tl.load(sums_ptr + c, mask=mask) / count
    var = tl.maximum(tl.load(sumsq_ptr + c, mask=mask) / count - mean * mean, 0.0)
    scale = tl.load(weight_ptr + c, mask=mask).to(tl.float32) / tl.sqrt(var + eps)
    tl.store(scale_ptr + c, scale, mask=mask)
    tl.store(shift_ptr + c, tl.load(bias_ptr + c, mask=mask).to(tl.float32) - mean * scale, mask=mask)
    tl.store(mean_ptr + c, mean, mask=mask)
    tl.store(var_ptr + c, var, mask=mask)


def bn_finalize_forward(sums, sumsq, count, weight, bias, eps) -> list[torch.Tensor]:
    """Returns fp32 ``[scale, shift, mean, var]``, each (C,)."""
    outputs = [torch.empty_like(sums, dtype=torch.float32) for _ in range(4)]
    grid = (triton.cdiv(sums.numel(), BLOCK_C),)
    _bn_finalize_kernel[grid](sums, sumsq, weight, bias, *outputs, sums.numel(), float(count), eps, BLOCK_C=BLOCK_C)
    return outputs
