"""Conv + norm + activation building blocks with PyTorch or TensorFlow-SAME padding.

All modules here take and return NCHW tensors (any memory format).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ..ops.backends import fused_kernels_available
from ..ops.padding import spatial_padding

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}

NormFactory = Callable[[int], nn.Module]


def check_choice(name: str, value: object, choices) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def make_activation(activation: str) -> nn.Module:
    """The activation module for ``"swish"`` (x·sigmoid(x)) or ``"relu"``."""
    check_choice("activation", activation, ACTIVATIONS)
    return ACTIVATIONS[activation]()


def make_norm_factory(norm_layer: NormFactory | None, momentum: float, eps: float) -> NormFactory:
    """A ``num_features -> module`` factory that passes ``momentum`` / ``eps`` where the factory takes them.

    ``norm_layer`` may be ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, torchvision's ``FrozenBatchNorm2d`` or any
    callable taking ``num_features``; keywords already bound by a ``functools.partial`` win.
    """
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
        raise ValueError(f"bn_momentum must be a number in (0, 1] (PyTorch's convention) or None, got {momentum!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
        raise ValueError(f"bn_eps must be a finite positive number, got {eps!r}")
    if norm_layer is None:
        norm_layer = nn.BatchNorm2d
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a callable taking num_features, got {type(norm_layer).__name__}")
    bound = norm_layer.keywords if isinstance(norm_layer, functools.partial) else {}
    try:
        accepted = inspect.signature(norm_layer).parameters
    except (TypeError, ValueError):
        accepted = {}
    extra = {k: v for k, v in (("momentum", momentum), ("eps", eps)) if k in accepted and k not in bound}
    return functools.partial(norm_layer, **extra)


def fused_for_norm(fused: bool | str, norm: NormFactory) -> bool | str:
    """The ``fused`` setting a model whose norm layers ``norm`` makes runs: as given where the fused ops can run them
    (BatchNorms — ``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` — and torchvision's ``FrozenBatchNorm2d``: affine maps
    of batch or running statistics); else False for ``"auto"`` (eager), and a ``ValueError`` for True."""
    layer = norm(8)
    if fused is False or isinstance(layer, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        return fused
    if fused is True:
        raise ValueError(
            "fused=True needs BatchNorm-type norm layers (nn.BatchNorm2d, nn.SyncBatchNorm or torchvision's "
            f"FrozenBatchNorm2d), but norm_layer makes {type(layer).__name__}: pass fused=False, or 'auto' (eager "
            "with such norm layers)"
        )
    return False


class FusedSetting:
    """Mixin of a module with a ``fused`` setting: True, False or ``"auto"`` (fused where its parameters are on a GPU
    with Triton). Its forward takes the fused ops where ``runs_fused`` says so, else its eager modules; its
    ``norm_layers()`` are the norm layers of the conv + norm layers its fused forward runs."""

    fused: bool | str

    def fused_on(self, device: torch.device) -> bool:
        """Whether the setting fuses work on ``device``: ``fused=True``, or ``"auto"`` on a GPU with Triton."""
        return fused_kernels_available(device) if self.fused == "auto" else bool(self.fused)

    def uses_fused_ops(self) -> bool:
        """Whether this module's ops are fused: ``fused_on`` its parameters' device."""
        # parameters() yields real tensors even under torch.fx tracing (attribute access yields proxies).
        return self.fused_on(next(self.parameters()).device)

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether a call whose (first) input is ``x`` (N, C, H, W) takes the fused ops: ``uses_fused_ops()`` and a
        non-empty batch (an empty one takes the eager modules: empty maps out, the BN counters advanced as
        ``nn.BatchNorm2d`` does)."""
        return self.uses_fused_ops() and x.shape[0] > 0


def init_conv_(conv: nn.Conv2d) -> None:
    """Truncated-normal fan-in variance scaling (scale 1.0), as TF's ``VarianceScaling``."""
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)


class ConvNorm(nn.Module):
    """``conv (no bias) -> norm -> [act]`` with static ``"torch"`` or ``"tf_same"`` padding; ``groups``: the conv's
    (``groups == in_channels == out_channels``: a depthwise conv).

    x: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: NormFactory,
        *,
        stride: int = 1,
        activation: str | None = None,
        padding: str = "torch",
        groups: int = 1,
    ) -> None:
        super().__init__()
        before, after = spatial_padding(kernel_size, stride, padding)
        self.pad = None if before == after else (before, after, before, after)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=before if self.pad is None else 0,
                              groups=groups, bias=False)  # fmt: skip
        self.bn = norm(out_channels)
        self.act = make_activation(activation) if activation is not None else nn.Identity()
        init_conv_(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.bn(self.conv(x)))


class MaxPool3x3s2(nn.Module):
    """3×3 stride-2 max-pool; ``"tf_same"`` pads bottom/right with −inf as TF ``SAME``.

    x: (N, C, H, W) with H, W even -> (N, C, H / 2, W / 2).
    """

    def __init__(self, padding: str = "torch") -> None:
        super().__init__()
        before, after = spatial_padding(3, 2, padding)
        self.pad = None if before == after else (before, after, before, after)
        self.padding = before if self.pad is None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, 3, 2, self.padding)
