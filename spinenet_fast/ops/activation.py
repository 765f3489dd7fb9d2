"""Activation maths of the PyTorch reference ops: the same functions the Triton kernels implement."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "swish")


def activation_forward(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "swish":
        return F.silu(x)
    return x


def activation_grad(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx, elementwise."""
    if activation == "relu":
        return (x > 0).to(x.dtype)
    if activation == "swish":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    return torch.ones_like(x)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the ops' maths and BN affines: fp32 for fp32/bf16/fp16 storage, else float64 (a BN's statistics
    [Σ; Σ²] are float64 for every storage: ``bn_finalize.STATS_DTYPE``)."""
    return torch.promote_types(x.dtype, torch.float32)
