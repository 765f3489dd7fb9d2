"""Which precision the GEMM kernels' ``tl.dot`` uses for a given storage dtype."""

import os

import torch


def use_fp32_dot(dtype: torch.dtype) -> bool:
    """IEEE fp32 dots for fp32 storage (no TF32 surprise), and for bf16 under Triton's CPU interpreter, which
    multiplies bf16 tiles wrongly in Triton 3.8 (numpy has no bf16); otherwise dots in the storage dtype."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
