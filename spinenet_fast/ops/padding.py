"""Static padding of SpineNet's 3×3 and 7×7 windows: PyTorch-symmetric or TensorFlow ``SAME``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

PADDING_MODES = ("torch", "tf_same")


def same_padding(kernel_size: int, stride: int) -> tuple[int, int]:
    """TF ``SAME`` padding ``(before, after)`` along one axis whose size is a multiple of ``stride``.

    TF pads ``max((ceil(n/s) - 1)·s + k - n, 0)`` in total with the odd pixel after; when ``n % s == 0``
    that is ``max(k - s, 0)``, independent of ``n``. SpineNet inputs are multiples of 128, so every
    stride-2 op sees even sizes and the padding is static.
    """
    total = max(kernel_size - stride, 0)
    return total // 2, total - total // 2


def spatial_padding(kernel_size: int, stride: int, padding: str) -> tuple[int, int]:
    """Padding ``(before, after)`` per spatial axis for ``padding`` mode ``"torch"`` or ``"tf_same"``."""
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {sorted(PADDING_MODES)}, got {padding!r}")
    if padding == "tf_same":
        return same_padding(kernel_size, stride)
    return kernel_size // 2, kernel_size // 2


def pad_window(x: Tensor, padding: str, value: float, stride: int = 2, kernel_size: int = 3) -> Tensor:
    """x (N, C, H, W) padded for a ``kernel_size`` (3×3, or 7×7) window of ``stride`` in ``padding`` mode, with
    ``value``."""
    before, after = spatial_padding(kernel_size, stride, padding)
    return F.pad(x, (before, after, before, after), value=value)


def crop_window(x: Tensor, padding: str, stride: int = 2, kernel_size: int = 3) -> Tensor:
    """The adjoint of :func:`pad_window`: drop the padded border."""
    before, after = spatial_padding(kernel_size, stride, padding)
    return x[..., before : x.shape[2] - after, before : x.shape[3] - after]
