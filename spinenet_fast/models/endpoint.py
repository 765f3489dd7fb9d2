"""A SpineNet endpoint: the 1×1 conv + BN + activation that maps an output block to the endpoints' width.

With ``fused`` (True, or ``"auto"`` on a GPU) and a training-mode or running-statistics ``nn.BatchNorm2d`` it runs as
one ``conv1x1_bn`` (its BN finalised in the GEMM's last program; in eval mode the running statistics become the
affine) and a one-parent ``merge`` that applies the BN and the activation: two launches and one fill instead of
eager's conv, BN, activation and weight cast, and a backward of two launches. Same parameters, buffers and result.
x: (N, C_in, H, W) -> (N, C_out, H, W) (channels_last when fused).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import merge
from .fused_merge import ConnectionWorkspace, compute_dtype, conv_then_bn
from .layers import ConvNorm, NormFactory, uses_fused_setting


class Endpoint(ConvNorm):
    """``ConvNorm(in_channels, out_channels, 1, norm, activation=activation)`` with a fused path (module
    docstring)."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormFactory, *, activation: str, padding: str,
                 fused: bool | str = False) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, 1, norm, activation=activation, padding=padding)
        self.activation, self.fused = activation, fused

    def uses_fused_ops(self) -> bool:
        """See the module docstring; frozen or other norms, and empty batches, run eagerly."""
        return isinstance(self.bn, nn.modules.batchnorm._BatchNorm) and uses_fused_setting(self, self.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fused_ops() or x.shape[0] == 0:
            return super().forward(x)
        dtype = compute_dtype(x)
        sizes = ConnectionWorkspace.layer_sizes(self, False, torch.promote_types(dtype, torch.float32))
        workspace = ConnectionWorkspace(sizes + ([3 * self.conv.out_channels] if sizes else []), x.device,
                                        torch.promote_types(dtype, torch.float32))  # fmt: skip
        y, scale, shift = conv_then_bn(x.to(dtype), self.conv, self.bn, None, None, self.activation, workspace)
        sums = workspace.take(self.conv.out_channels, rows=3) if sizes else None
        return merge([y], [scale], [shift], [1], None, self.activation, sums_buffer=sums)
