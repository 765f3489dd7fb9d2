"""The heads of SpineNet Mask R-CNN, as TF Model Garden builds them (``official/vision/modeling/heads``), with
torchvision's ``MaskRCNN`` contracts.

Every conv and fully connected layer has a bias and is followed by a BN and the activation, as in Model Garden:

- :class:`SpineNetRPNHead`: ``num_convs`` 3×3 convs shared across levels, BN per level, then 1×1 objectness
  (A channels) and box (4·A) predictors. ``forward(features)`` -> (objectness (N, A, H, W), deltas (N, 4A, H, W))
  per level, torchvision ``RPNHead``'s contract.
- :class:`SpineNetBoxHead`: RoI features (R, C, 7, 7) -> ``num_convs`` 3×3 convs -> flatten (C, H, W order) ->
  ``num_fcs`` dense layers -> (R, fc_dims); the class / box predictor is torchvision's ``FastRCNNPredictor``.
- :class:`SpineNetMaskHead` (R, C, 14, 14) -> (R, F, 14, 14) and :class:`SpineNetMaskPredictor` (a 2×2 stride-2
  transposed conv, BN, activation, 1×1 conv to one mask logit map per class) -> (R, K, 28, 28).
"""

from __future__ import annotations

import math
from itertools import pairwise

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from ..models.layers import NormFactory, make_activation
from .head import SharedTower


def _kaiming_fan_out(module: nn.Module) -> None:
    """Model Garden's ``VarianceScaling(2, 'fan_out', 'untruncated_normal')`` kernels, zero biases."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(module.bias)


class SpineNetRPNHead(nn.Module):
    """Region proposal head over ``num_levels`` levels (see the module docstring); Model Garden's init."""

    def __init__(self, in_channels: int, num_anchors: int, *, num_convs: int = 1, num_levels: int = 5,
                 norm: NormFactory = nn.BatchNorm2d, activation: str = "relu") -> None:  # fmt: skip
        super().__init__()
        self.tower = SharedTower(in_channels, num_convs, num_levels, norm, activation)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for predictor in (self.cls_logits, self.bbox_pred):
            nn.init.normal_(predictor.weight, std=1e-5)
            nn.init.zeros_(predictor.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if len(features) != len(self.tower.norms):
            raise ValueError(f"features must hold {len(self.tower.norms)} levels, got {len(features)}")
        towers = [self.tower(x, level) for level, x in enumerate(features)]
        return [self.cls_logits(t) for t in towers], [self.bbox_pred(t) for t in towers]


def _conv_norm_act(in_channels: int, out_channels: int, norm: NormFactory, activation: str) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    _kaiming_fan_out(conv)
    return nn.Sequential(conv, norm(out_channels), make_activation(activation))


class SpineNetBoxHead(nn.Module):
    """RoI box head: (R, C, S, S) -> (R, fc_dims) (see the module docstring)."""

    def __init__(self, in_channels: int, roi_size: int, *, num_convs: int = 4, num_filters: int = 256,
                 num_fcs: int = 1, fc_dims: int = 1024, norm: NormFactory = nn.BatchNorm2d,
                 activation: str = "relu") -> None:  # fmt: skip
        super().__init__()
        widths = [in_channels] + [num_filters] * num_convs
        self.convs = nn.Sequential(*(_conv_norm_act(a, b, norm, activation) for a, b in pairwise(widths)))
        fc_widths = [widths[-1] * roi_size * roi_size] + [fc_dims] * num_fcs
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(fc_widths))
        self.fc_norms = nn.ModuleList(norm(fc_dims) for _ in range(num_fcs))
        self.act = make_activation(activation)
        for fc in self.fcs:  # VarianceScaling(1/3, 'fan_out', 'uniform')
            bound = 1 / math.sqrt(fc.out_features)
            nn.init.uniform_(fc.weight, -bound, bound)
            nn.init.zeros_(fc.bias)
        self.out_channels = fc_widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs(x).flatten(1)
        for fc, norm in zip(self.fcs, self.fc_norms):
            x = self.act(norm(fc(x)[:, :, None, None]).flatten(1))  # the 2-D norm of a (R, F) batch
        return x


def box_predictor(in_features: int, num_classes: int) -> FastRCNNPredictor:
    """torchvision's class and per-class box predictor with Model Garden's init (N(0, 0.01²), N(0, 0.001²))."""
    predictor = FastRCNNPredictor(in_features, num_classes)
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    return predictor


class SpineNetMaskHead(nn.Sequential):
    """RoI mask head: ``num_convs`` × (3×3 conv, BN, act); (R, C, S, S) -> (R, num_filters, S, S)."""

    def __init__(self, in_channels: int, *, num_convs: int = 4, num_filters: int = 256,
                 norm: NormFactory = nn.BatchNorm2d, activation: str = "relu") -> None:  # fmt: skip
        widths = [in_channels] + [num_filters] * num_convs
        super().__init__(*(_conv_norm_act(a, b, norm, activation) for a, b in pairwise(widths)))


class SpineNetMaskPredictor(nn.Module):
    """(R, C, S, S) -> 2×2 stride-2 transposed conv, BN, act -> 1×1 conv: (R, num_classes, 2S, 2S) mask logits."""

    def __init__(self, in_channels: int, num_classes: int, *, norm: NormFactory = nn.BatchNorm2d,
                 activation: str = "relu") -> None:  # fmt: skip
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.norm = norm(in_channels)
        self.act = make_activation(activation)
        self.mask_logits = nn.Conv2d(in_channels, num_classes, 1)
        _kaiming_fan_out(self.upsample)
        _kaiming_fan_out(self.mask_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_logits(self.act(self.norm(self.upsample(x))))
