"""Launch configuration shared by the GEMM kernels (``conv1x1``, ``conv3x3``): dot precision, tiles, warps.

Chosen with ``python -m benchmarks.compile_sm90`` (every variant compiled for sm_90 under Triton 3.6 and 3.8, no
spills allowed): bf16/fp16 tensor-core dots take 64×64×32 tiles on two warp groups (one warp group needs 255
registers and spills); the IEEE fp32 dot, whose FMA lowering holds a thread's A rows and B columns in registers,
takes 32×32×16 tiles on four warps (64×64 tiles spill at any K ≥ 16, the smallest K ``tl.dot`` accepts).
"""

import torch
import triton
from triton.runtime.jit import JITFunction

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by FP32_DOT
TILES = {False: (64, 64, 32, 8), True: (32, 32, 16, 4)}


def use_fp32_dot(dtype: torch.dtype, kernel) -> bool:
    """IEEE fp32 dots for fp32 storage (no TF32 surprise), and for bf16 when ``kernel`` runs under Triton's CPU
    interpreter, which multiplies bf16 tiles wrongly in Triton 3.8 (numpy has no bf16); otherwise dots in the
    storage dtype. ``kernel`` is the launched function: a ``JITFunction`` compiles for a GPU, anything else (the
    interpreter's ``InterpretedFunction``) runs on the CPU."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not isinstance(kernel, JITFunction))


def gemm_launch_config(dtype: torch.dtype, kernel) -> dict:
    """The constexpr tiles, ``FP32_DOT`` and ``num_warps`` keyword arguments of a GEMM kernel's launch."""
    fp32_dot = use_fp32_dot(dtype, kernel)
    block_m, block_n, block_k, num_warps = TILES[fp32_dot]
    return {"FP32_DOT": fp32_dot, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps}


def narrow_block(channels: int, block: int) -> int:
    """A channel block for a GEMM dimension of ``channels``: ``block``, or for narrower channels (the stem conv's 3
    input channels) the smallest power of two that holds them, at least ``tl.dot``'s 16."""
    return min(block, max(16, triton.next_power_of_2(channels)))
