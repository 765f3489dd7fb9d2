"""ResNet-v1 bottleneck and residual blocks (stride 1) and block groups, as SpineNet uses them.

All blocks take and return NCHW tensors at a fixed resolution: SpineNet changes resolution only in the
cross-scale resampling. A group with ``fused`` runs its blocks through the fused ops (``fused_block``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from .fused_block import block_layers, fused_block_forward, input_readers
from .fused_merge import RunningAffines
from .layers import ConvNorm, FusedSetting, NormFactory, make_activation

BLOCK_TYPES = ("bottleneck", "residual")


def block_output_channels(block_type: str, filters: int) -> int:
    """Output width of a block: 4F for a bottleneck, F for a residual block."""
    return 4 * filters if block_type == "bottleneck" else filters


class Bottleneck(nn.Module):
    """1×1 F -> 3×3 F -> 1×1 4F (+ BN, act) with an identity or 1×1 projection shortcut.

    x: (N, C, H, W) -> (N, 4F, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        norm: NormFactory,
        activation: str,
        padding: str,
        drop_rate: float,
    ) -> None:
        super().__init__()
        out_channels = 4 * filters
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, norm, padding=padding) if in_channels != out_channels else None
        )
        self.conv1 = ConvNorm(in_channels, filters, 1, norm, activation=activation, padding=padding)
        self.conv2 = ConvNorm(filters, filters, 3, norm, activation=activation, padding=padding)
        self.conv3 = ConvNorm(filters, out_channels, 1, norm, padding=padding)
        self.drop_path = StochasticDepth(drop_rate, mode="row")
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.drop_path(self.conv3(self.conv2(self.conv1(x)))) + shortcut)


class Residual(nn.Module):
    """3×3 F -> 3×3 F (+ BN, act) with an identity or 1×1 projection shortcut.

    x: (N, C, H, W) -> (N, F, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        norm: NormFactory,
        activation: str,
        padding: str,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_channels, filters, 1, norm, padding=padding) if in_channels != filters else None
        self.conv1 = ConvNorm(in_channels, filters, 3, norm, activation=activation, padding=padding)
        self.conv2 = ConvNorm(filters, filters, 3, norm, padding=padding)
        self.drop_path = StochasticDepth(drop_rate, mode="row")
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.drop_path(self.conv2(self.conv1(x))) + shortcut)


class BlockGroup(FusedSetting, nn.Sequential):
    """``block_repeats`` blocks of one type sharing one stochastic-depth rate.

    Only the first block may project its shortcut (when ``in_channels`` differs from the output width).
    ``fused``: True runs the blocks through the fused ops (same parameters and results), False through the eager
    modules, ``"auto"`` fused on a GPU with Triton.
    """

    def __init__(
        self,
        block_type: str,
        in_channels: int,
        filters: int,
        block_repeats: int,
        norm: NormFactory,
        activation: str,
        padding: str,
        drop_rate: float,
        fused: bool | str = False,
    ) -> None:
        block = Bottleneck if block_type == "bottleneck" else Residual
        out_channels = block_output_channels(block_type, filters)
        super().__init__(
            *(
                block(in_channels if i == 0 else out_channels, filters, norm, activation, padding, drop_rate)
                for i in range(block_repeats)
            )
        )
        self.out_channels = out_channels
        self.activation, self.padding, self.fused = activation, padding, fused

    def norm_layers(self) -> list[nn.Module]:
        """The norm layer of each conv + norm layer of its blocks (main path, projection shortcut)."""
        return [layer.bn for block in self for layer in block_layers(block)]

    def forward(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], readers: int | None = None,
        affines: RunningAffines | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:  # fmt: skip
        """x: the input, or one copy per reader of it (``input_readers``: a fused merge's ``readers``); with
        ``readers``, the output that many times, one per reader (see ``CrossScaleMerge.forward``); ``affines`` as
        ``CrossScaleMerge.forward``'s."""
        main = x[0] if isinstance(x, tuple) else x
        if not self.runs_fused(main):
            out = super().forward(main)
            return out if readers is None else (out,) * readers
        for i, block in enumerate(self):
            last = i == len(self) - 1
            x = fused_block_forward(block, x, self.activation, self.padding,
                                    (readers or 1) if last else input_readers(self[i + 1]), affines)  # fmt: skip
        return x[0] if readers is None else x

    def input_readers(self) -> int:
        """How many copies of its input ``forward`` takes from a fused merge (``fused_block.input_readers``; two,
        main path and shortcut, for the eager modules, which read the first)."""
        return input_readers(self[0]) if self.uses_fused_ops() else 2
