"""A backbone's output layer at one level: 1×1 conv -> BN -> activation (a :class:`ConvNorm`), fused or eager.

Fused: the conv and its BN are one ``conv1x1_bn`` / ``conv1x1_bn_stats`` (training mode: the statistics in the GEMM's
epilogue, the BN finalised by its last program, the BN's backward folded into the conv's one backward kernel), and
BN + activation one single-parent ``merge`` that writes the output once (its backward also forms the BN's channel
sums): two launches per pass instead of eager's conv, weight cast, BN and activation (and their backwards), and no
normalised map stored between them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import merge_for_readers
from ..ops.merge import sums_rows
from .fused_merge import ConnectionWorkspace, RunningAffines, compute_dtype, conv_then_bn
from .layers import ConvNorm, FusedSetting, NormFactory


class Endpoint(FusedSetting, ConvNorm):
    """``act(BN(conv1x1(x)))``: (N, in_channels, H, W) -> (N, out_channels, H, W) (channels_last where fused). Same
    parameters and ``state_dict`` keys as a ``ConvNorm``; ``fused`` as a ``BlockGroup``'s (True, False or
    ``"auto"``: fused on a GPU with Triton)."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormFactory, activation: str,
                 fused: bool | str = False, **kwargs) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, 1, norm, activation=activation, **kwargs)
        self.activation, self.fused = activation, fused

    def norm_layers(self) -> list[nn.Module]:
        return [self.bn]

    def forward(self, x: Tensor, affines: RunningAffines | None = None) -> Tensor:
        """``affines`` (fused): as ``CrossScaleMerge.forward``'s."""
        return fused_endpoint_forward(self, x, affines) if self.runs_fused(x) else super().forward(x)


def fused_endpoint_forward(endpoint: Endpoint, x: Tensor, affines: RunningAffines | None = None) -> Tensor:
    """``endpoint(x)`` from the fused ops (same parameters, buffers and result as its eager forward): one workspace
    fill for the BN's accumulators, ``conv_then_bn``, then BN + activation as one single-parent ``merge``."""
    x = x.to(compute_dtype(x))
    statistics = torch.promote_types(x.dtype, torch.float32)
    sizes = ConnectionWorkspace.layer_sizes(endpoint, False, statistics)
    channels = endpoint.conv.out_channels
    if sizes:  # the merge backward's channel sums
        sizes.append(sums_rows(1, False) * channels)
    workspace = ConnectionWorkspace(sizes, x.device, statistics, [endpoint.bn], affines)
    y, scale, shift = conv_then_bn(x, endpoint.conv, endpoint.bn, None, None, endpoint.activation, workspace)
    sums_buffer = workspace.take(channels, rows=sums_rows(1, False)) if sizes else None
    return merge_for_readers([y], [scale], [shift], [1], None, endpoint.activation, readers=1,
                             sums_buffer=sums_buffer)[0]  # fmt: skip
