"""Helpers for argument checks whose errors name the argument, the expectation and what was given."""

from __future__ import annotations

from torch import Tensor


def describe(value) -> str:
    """``dtype (shape) on device`` of a tensor, or the type name of anything else."""
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    return type(value).__name__
