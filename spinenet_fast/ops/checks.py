"""Helpers for argument checks whose errors name the argument, the expectation and what was given."""

from __future__ import annotations

import torch
from torch import Tensor


def describe(value) -> str:
    """``dtype (shape) on device`` of a tensor, or the type name of anything else."""
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    return type(value).__name__


def check_accumulator(name: str, buffer, shape: tuple[int, ...], dtype, device) -> None:
    """``buffer`` (if given) must be a contiguous ``dtype`` tensor of ``shape`` on ``device``: a caller's zeroed
    accumulator that an op adds into. Raises ``ValueError`` naming it otherwise."""
    if buffer is None:
        return
    fits = isinstance(buffer, Tensor) and tuple(buffer.shape) == shape and buffer.dtype == dtype
    if not (fits and buffer.is_contiguous() and buffer.device == device):
        raise ValueError(
            f"{name} must be a contiguous {str(dtype)[6:]} {shape} tensor on {device}, got {describe(buffer)}"
        )


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` is laid out densely, contiguous or (4-D) channels_last: no gap, no overlap."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def check_statistics_flag(statistics) -> None:
    """A conv op's ``statistics`` must be a bool (whether it returns [Σy; Σy²] of its output)."""
    if not isinstance(statistics, bool):
        raise TypeError(f"statistics must be a bool, got {describe(statistics)}")


def check_buffers_without_statistics(statistics: bool) -> None:
    """A conv op's gradient buffers serve its backward without statistics (``statistics=False``): a conv + BN in
    training mode takes them through ``conv1x1_bn`` / ``conv3x3_bn``."""
    if statistics:
        raise ValueError("prologue_grad_buffer and weight_grad_buffer need statistics=False (with statistics, a conv "
                         "and its training-mode BN take them as one op: conv1x1_bn / conv3x3_bn)")  # fmt: skip
