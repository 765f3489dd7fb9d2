"""SpineNet-Mobile (Du et al. 2020, "Efficient Scale-Permuted Backbone with Learned Resource Distribution"): the
official small SpineNets 49 / 49S / 49XS, built from the block table and rules of TF Model Garden's
``SpineNetMobile`` (``official/vision/modeling/backbones/spinenet_mobile.py``).

Stem: 3×3 stride-2 conv + BN + act, then two MBConv blocks (level 1, then stride 2 to level 2). Each of the 16
scale-permuted blocks sums its two parents, each resampled by repeated depthwise 3×3 stride-2 convs (+ BN + act) or
nearest upsampling and then a 1×1 conv + BN to the block's width (no α squeeze, no activation), plus — for output
blocks — every earlier block of the same level and width that nothing read; then act and one MBConv block: 1×1
expand ×6 + BN + act, depthwise 3×3 + BN + act, squeeze-and-excitation (ratio 0.2 of the block's input width, ReLU,
Model Garden's hard sigmoid ``relu6(x + 3) · 0.16667``), 1×1 project + BN, stochastic depth and the residual add
(no activation after it). Endpoints: 1×1 conv + BN + act to ``endpoints_num_filters`` for P3–P7. Widths per level
{8, 16, 24, 40, 80, 112, 112, 112} × 1.0 / 0.65 / 0.6 (truncated), endpoints 48 / 40 / 24.

Input: (N, 3, H, W), H and W multiples of 128. Output: ``OrderedDict`` ``"p3"…"p7"``; layout NCHW.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ..ops.padding import PADDING_MODES
from .endpoint import Endpoint
from .fused_merge import RunningAffines, fused_mobile_merge_forward, mobile_layers, modules_running_affines
from .layers import (
    ACTIVATIONS,
    ConvNorm,
    FusedSetting,
    check_choice,
    fused_for_norm,
    make_activation,
    make_norm_factory,
)
from .spinenet import SIZE_DIVISIBILITY, check_fused, check_image_batch

FILTER_SIZE_MAP = {0: 8, 1: 16, 2: 24, 3: 40, 4: 80, 5: 112, 6: 112, 7: 112}
# (level, (parent 0, parent 1), is_output): Model Garden's SPINENET_BLOCK_SPECS of the Mobile models.
BLOCK_SPECS = (
    (2, (0, 1), False), (2, (1, 2), False), (4, (1, 2), False), (3, (3, 4), False), (4, (3, 5), False),
    (6, (4, 6), False), (4, (4, 6), False), (5, (7, 8), False), (7, (7, 9), False), (5, (9, 10), False),
    (5, (9, 11), False), (4, (6, 11), True), (3, (5, 11), True), (5, (8, 13), True), (7, (6, 15), True),
    (6, (13, 15), True),
)  # fmt: skip
# model id -> (endpoints_num_filters, filter_size_scale)
MOBILE_SCALING_MAP = {"49": (48, 1.0), "49S": (40, 0.65), "49XS": (24, 0.6)}
EXPAND_RATIO = 6
SE_RATIO = 0.2
HARD_SIGMOID_SLOPE = 0.16667  # Model Garden's constant (not 1/6)
MOBILE_BN = {"bn_momentum": 0.01, "bn_eps": 1e-3}  # Model Garden's 0.99 / 1e-3


class SqueezeExcitation(nn.Module):
    """x (N, C, H, W) · hard_sigmoid(expand(relu(reduce(mean_hw x)))): 1×1 convs with biases, C -> reduced -> C."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * (F.relu6(gate + 3) * HARD_SIGMOID_SLOPE)


class MBConv(nn.Module):
    """Model Garden's ``InvertedBottleneckBlock`` (see the module docstring); residual when stride 1 and widths match.

    x: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm, activation: str, padding: str,
                 drop_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        expanded = in_channels * EXPAND_RATIO
        self.expand = ConvNorm(in_channels, expanded, 1, norm, activation=activation)
        self.depthwise = ConvNorm(expanded, expanded, 3, norm, stride=stride, activation=activation, padding=padding,
                                  groups=expanded)  # fmt: skip
        self.se = SqueezeExcitation(expanded, max(1, int(in_channels * SE_RATIO)))
        self.project = ConvNorm(expanded, out_channels, 1, norm)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_rate, mode="row") if self.residual and drop_rate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + self.drop_path(y) if self.residual else y


class MobileResample(nn.Module):
    """A parent at ``parent_level`` to a block at ``target_level`` and its width: d = target − parent ×
    (depthwise 3×3 stride 2 + BN + act), or nearest upsampling by 2^-d, then 1×1 conv + BN (no activation).

    x: (N, in_channels, H, W) -> (N, out_channels, H / 2^d, W / 2^d).
    """

    def __init__(self, in_channels: int, out_channels: int, parent_level: int, target_level: int, norm,
                 activation: str, padding: str) -> None:  # fmt: skip
        super().__init__()
        self.parent_level, self.target_level = parent_level, target_level
        down = target_level - parent_level
        self.down = nn.Sequential(*(
            ConvNorm(in_channels, in_channels, 3, norm, stride=2, activation=activation, padding=padding,
                     groups=in_channels)
            for _ in range(max(down, 0))
        ))  # fmt: skip
        self.upsample_factor = 2 ** max(-down, 0)
        self.conv = ConvNorm(in_channels, out_channels, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        if self.upsample_factor > 1:
            x = F.interpolate(x, scale_factor=self.upsample_factor, mode="nearest")
        return self.conv(x)


class MobileMerge(FusedSetting, nn.Module):
    """act(Σ resampled parents + Σ unread same-level extras): the input of one scale-permuted block. With ``fused``
    (True, or ``"auto"`` on a GPU with Triton) the same parameters run through the fused ops
    (``fused_merge.fused_mobile_merge_forward``)."""

    def __init__(self, resamples: list[MobileResample], parent_ids: list[int], extra_ids: list[int],
                 activation: str, padding: str = "tf_same", fused: bool | str = False) -> None:  # fmt: skip
        super().__init__()
        self.resamples = nn.ModuleList(resamples)
        self.parent_ids, self.extra_ids = parent_ids, extra_ids
        self.act = make_activation(activation)
        self.activation, self.padding, self.fused = activation, padding, fused

    def norm_layers(self) -> list[nn.Module]:
        """The norm layer of each conv + norm layer the fused forward runs (depthwise convs, the 1×1 conv)."""
        return [layer.bn for resample in self.resamples for layer, _ in mobile_layers(resample)]

    def forward(self, feats: list[torch.Tensor], affines: RunningAffines | None = None) -> torch.Tensor:
        """``affines`` (fused): the running-statistics norms' maps where the model computed them."""
        if self.runs_fused(feats[self.parent_ids[0]]):
            return fused_mobile_merge_forward(self, feats, self.activation, self.padding, affines)
        x = sum(resample(feats[i]) for resample, i in zip(self.resamples, self.parent_ids))
        for i in self.extra_ids:
            x = x + feats[i]
        return self.act(x)


class SpineNetMobile(nn.Module):
    """SpineNet-Mobile ``model_id`` in {"49", "49S", "49XS"} (see the module docstring), P3–P7.

    Defaults are the official RetinaNet recipe's (``retinanet_mobile_coco``): swish, stochastic depth 0.2 (rising
    linearly over the 16 blocks), BN momentum 0.01 (PyTorch's convention) and ε 1e-3, ``padding="tf_same"``
    (Model Garden's ``SAME``; ``"torch"``: symmetric). ``fused``: True runs the cross-scale connections (depthwise
    resampling chains, 1×1 convs, BNs, the merges) through the fused ops (any device; the backend follows
    ``spinenet_fast.ops.backends``), False through eager modules, ``"auto"`` fused on a GPU with Triton; so do the
    endpoints (1×1 conv + BN + act: ``models.endpoint``); the MBConv blocks and the stem run eagerly either way. Same
    ``state_dict``.
    """

    size_divisibility = SIZE_DIVISIBILITY

    def __init__(self, model_id: str = "49", *, activation: str = "swish", norm_layer=None,
                 bn_momentum: float = MOBILE_BN["bn_momentum"], bn_eps: float = MOBILE_BN["bn_eps"],
                 stochastic_depth_rate: float = 0.2, padding: str = "tf_same",
                 fused: bool | str = "auto") -> None:  # fmt: skip
        super().__init__()
        key = model_id.upper() if isinstance(model_id, str) else model_id
        if key not in MOBILE_SCALING_MAP:
            raise ValueError(f"model_id must be one of {list(MOBILE_SCALING_MAP)}, got {model_id!r}")
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("padding", padding, PADDING_MODES)
        check_fused(fused)
        if isinstance(stochastic_depth_rate, bool) or not (
            isinstance(stochastic_depth_rate, (int, float)) and 0 <= stochastic_depth_rate < 1
        ):
            raise ValueError(f"stochastic_depth_rate must be a number in [0, 1), got {stochastic_depth_rate!r}")
        self.model_id = key
        endpoints_filters, scale = MOBILE_SCALING_MAP[key]
        norm = make_norm_factory(norm_layer, bn_momentum, bn_eps)
        fused = fused_for_norm(fused, norm)

        def width(level: int) -> int:
            return int(FILTER_SIZE_MAP[level] * scale)

        self.stem = ConvNorm(3, width(0), 3, norm, stride=2, activation=activation, padding=padding)
        self.init_blocks = nn.ModuleList(
            [MBConv(width(0), width(1), 1, norm, activation, padding), MBConv(width(1), width(2), 2, norm, activation,
                                                                              padding)]
        )  # fmt: skip
        levels, widths, reads = [1, 2], [width(1), width(2)], [0, 0]
        merges, blocks = [], []
        for k, (level, parents, is_output) in enumerate(BLOCK_SPECS):
            resamples = [MobileResample(widths[i], width(level), levels[i], level, norm, activation, padding)
                         for i in parents]  # fmt: skip
            for i in parents:
                reads[i] += 1
            extras = []
            if is_output:
                extras = [
                    j for j in range(len(levels)) if not reads[j] and levels[j] == level and widths[j] == width(level)
                ]
                for j in extras:
                    reads[j] += 1
            merges.append(MobileMerge(resamples, list(parents), extras, activation, padding, fused))
            drop = stochastic_depth_rate * (k + 1) / len(BLOCK_SPECS)
            blocks.append(MBConv(width(level), width(level), 1, norm, activation, padding, drop))
            levels.append(level)
            widths.append(width(level))
            reads.append(0)
        self.merges, self.blocks = nn.ModuleList(merges), nn.ModuleList(blocks)
        outputs = {level: 2 + k for k, (level, _, is_output) in enumerate(BLOCK_SPECS) if is_output}
        self._endpoint_ids = {f"p{level}": outputs[level] for level in range(3, 8)}
        self.endpoints = nn.ModuleDict({
            name: Endpoint(widths[i], endpoints_filters, norm, activation, fused)
            for name, i in self._endpoint_ids.items()
        })  # fmt: skip
        self.out_channels = endpoints_filters
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.fused = fused

    def fusable_modules(self) -> list[nn.Module]:
        """The modules with a ``fused`` setting of their own: the merges and the endpoints."""
        return [*self.merges, *self.endpoints.values()]

    def model_running_affines(self, x: torch.Tensor) -> RunningAffines | None:
        """The running-statistics norms' affine maps of a forward of x, all at once
        (``fused_merge.modules_running_affines``)."""
        return modules_running_affines(self.fusable_modules(), x)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = check_image_batch(x, self.stem.conv.weight)
        affines = self.model_running_affines(x)
        x = self.stem(x)
        feats = []
        for block in self.init_blocks:
            x = block(x)
            feats.append(x)
        for merge, block in zip(self.merges, self.blocks):
            feats.append(block(merge(feats, affines=affines)))
        return OrderedDict(
            (name, self.endpoints[name](feats[i], affines=affines)) for name, i in self._endpoint_ids.items()
        )
