"""SpineNet's stem: 7×7/s2 conv -> BN -> activation -> 3×3/s2 max-pool, fused or eager.

Fused: the conv and its BN are one ``conv3x3_bn`` on its 7×7 window (training mode: the statistics in the implicit
GEMM's epilogue, the BN finalised by its last program, the BN's backward folded into the conv's one backward launch;
eval mode ``conv3x3_bn_stats`` and the running affine), and BN + activation + max-pool one ``bn_act_maxpool`` (the
pooled map written once; its backward one pass gathering through the stored routes): two launches per pass where
eager launches the image's and the weight's casts, the conv, BN, activation and max-pool, and no full-resolution
normalised or activated map is stored between them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .fused_merge import (
    ConnectionWorkspace,
    RunningAffines,
    compute_dtype,
    conv_then_bn,
    max_pooled,
    takes_grad_buffers,
)
from .layers import ConvNorm, FusedSetting, MaxPool3x3s2, NormFactory


class Stem(FusedSetting, nn.Sequential):
    """``pool(act(BN(conv7x7/s2(x))))``: (N, 3, H, W) -> (N, out_channels, H/4, W/4) (channels_last where fused).
    The ``conv`` (a ``ConvNorm``) and ``pool`` children and ``state_dict`` keys of the eager stem; ``fused`` as a
    ``BlockGroup``'s (True, False or ``"auto"``: fused on a GPU with Triton)."""

    def __init__(self, out_channels: int, norm: NormFactory, activation: str, padding: str,
                 fused: bool | str = False) -> None:  # fmt: skip
        conv = ConvNorm(3, out_channels, 7, norm, stride=2, activation=activation, padding=padding)
        super().__init__(OrderedDict(conv=conv, pool=MaxPool3x3s2(padding)))
        self.activation, self.padding, self.fused = activation, padding, fused

    def norm_layers(self) -> list[nn.Module]:
        return [self.conv.bn]

    def forward(self, x: Tensor, affines: RunningAffines | None = None) -> Tensor:
        """``affines`` (fused): as ``CrossScaleMerge.forward``'s."""
        return fused_stem_forward(self, x, affines) if self.runs_fused(x) else super().forward(x)


def fused_stem_forward(stem: Stem, x: Tensor, affines: RunningAffines | None = None) -> Tensor:
    """``stem(x)`` from the fused ops (same parameters, buffers and result as its eager forward): one workspace fill
    for the BN's accumulators and the max-pool's affine gradients, ``conv_then_bn``, then ``bn_act_maxpool``."""
    x = x.to(compute_dtype(x))
    layer = stem.conv
    statistics = torch.promote_types(x.dtype, torch.float32)
    sizes = ConnectionWorkspace.layer_sizes(layer, False, statistics)
    pool_grads = takes_grad_buffers(layer.conv, layer.bn)
    if pool_grads:  # the max-pool op's [d_scale; d_shift]
        sizes.append(2 * layer.conv.out_channels)
    workspace = ConnectionWorkspace(sizes, x.device, statistics, [layer.bn], affines)
    y, scale, shift = conv_then_bn(x, layer.conv, layer.bn, None, None, stem.activation, workspace,
                                   padding=stem.padding)  # fmt: skip
    buffer = workspace.take(layer.conv.out_channels) if pool_grads else None
    return max_pooled(y, scale, shift, stem.activation, 1, stem.padding, affine_grad_buffer=buffer)
