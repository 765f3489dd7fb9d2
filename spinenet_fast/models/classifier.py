"""``SpineNetClassifier``: SpineNet for image classification, with the head of the official classification models.

The paper's ImageNet and iNaturalist models (the TPU repo's ``spinenet{49,96,143,190}_classification.yaml``:
``ClassificationHead`` with ``aggregation: 'all'``) read every endpoint P3…P7 (``endpoints_num_filters`` wide each):
from the top level down, the running map is nearest-resized to the next lower level and added to it, and the sum is
divided by the number of levels; then global average pooling, dropout and one dense layer (weights N(0, 0.01²), bias
0). Their training recipe (protocol C): swish, BN momentum 0.1 in PyTorch's convention (TF's 0.9) and ε 1e-5,
stochastic depth 0.2, label smoothing 0.1 (:data:`CLASSIFICATION_DEFAULTS`; the smoothing is the loss's:
``nn.CrossEntropyLoss(label_smoothing=...)`` or timm's ``--smoothing``).

Input sizes are multiples of 128, as for the backbone (the official recipe's 224 px is not: use 256). At such sizes
nearest resizing is exact replication, which keeps every level's mean, so without the optional embedding layer the
pooled aggregate is the mean of the levels' pooled maps, computed so (no full-resolution sum is written).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._api import register_model

from .layers import ConvNorm, make_norm_factory
from .spinenet import SCALING_MAP, SpineNet, SpineNetScaling

AGGREGATIONS = ("all", "top")
# The official classification recipe's model settings (TPU repo, spinenet*_classification.yaml).
CLASSIFICATION_DEFAULTS = {"activation": "swish", "bn_momentum": 0.1, "bn_eps": 1e-5, "stochastic_depth_rate": 0.2,
                           "label_smoothing": 0.1, "image_size": 256}  # fmt: skip


class SpineNetClassifier(nn.Module):
    """A SpineNet backbone and the official classification head.

    x (N, 3, H, W), H and W multiples of 128 -> logits (N, ``num_classes``). ``aggregation``: ``"all"`` (the
    official models: P3…P7 averaged after nearest resizing to P3) or ``"top"`` (P7 only). ``endpoints_num_filters``:
    > 0 adds a 1×1 conv + BN + activation of that width after the aggregation (the official models: 0).
    ``dropout_rate`` before the dense layer (official: 0). Other keyword arguments go to :class:`SpineNet`
    (``fused`` included); activation, BN and stochastic depth default to the official classification recipe.
    """

    def __init__(
        self,
        model_id: str | Mapping | SpineNetScaling = "49",
        num_classes: int = 1000,
        *,
        aggregation: str = "all",
        endpoints_num_filters: int = 0,
        dropout_rate: float = 0.0,
        activation: str = CLASSIFICATION_DEFAULTS["activation"],
        bn_momentum: float = CLASSIFICATION_DEFAULTS["bn_momentum"],
        bn_eps: float = CLASSIFICATION_DEFAULTS["bn_eps"],
        stochastic_depth_rate: float | None = CLASSIFICATION_DEFAULTS["stochastic_depth_rate"],
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        _check_head_args(num_classes, aggregation, endpoints_num_filters, dropout_rate)
        self.backbone = SpineNet(model_id, activation=activation, bn_momentum=bn_momentum, bn_eps=bn_eps,
                                 stochastic_depth_rate=stochastic_depth_rate, **backbone_kwargs)  # fmt: skip
        if aggregation == "top":
            self.backbone.keep_endpoints([list(self.backbone.endpoints)[-1]])
        self.aggregation = aggregation
        width = self.backbone.out_channels
        self.embedding = None
        if endpoints_num_filters:
            norm = make_norm_factory(backbone_kwargs.get("norm_layer"), bn_momentum, bn_eps)
            self.embedding = ConvNorm(width, endpoints_num_filters, 1, norm, activation=activation,
                                      padding=self.backbone.padding)  # fmt: skip
            width = endpoints_num_filters
        self.num_features = width
        self.dropout = nn.Dropout(dropout_rate)
        self.fc = nn.Linear(width, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward_features(self, x: Tensor) -> Tensor:
        """x (N, 3, H, W) -> the pooled aggregate of the endpoints (N, ``num_features``)."""
        levels = list(self.backbone(x).values())
        if self.embedding is None:  # nearest resizing by whole factors keeps each level's mean
            return torch.stack([level.mean((2, 3)) for level in levels]).mean(0)
        return self.embedding(aggregate_levels(levels)).mean((2, 3))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, ``num_features``) -> logits (N, ``num_classes``), or the features after dropout with ``pre_logits``."""
        features = self.dropout(features)
        return features if pre_logits else self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new dense layer of ``num_classes`` outputs (initialised as the official one); ``global_pool`` must be
        None or ``"avg"`` (the only pooling of the official head)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be None or 'avg' (the official head's pooling), got {global_pool!r}")
        _check_head_args(num_classes, self.aggregation, 0, self.dropout.p)
        self.fc = nn.Linear(self.num_features, num_classes).to(self.fc.weight)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)


def aggregate_levels(levels: list[Tensor]) -> Tensor:
    """The official ``aggregation: 'all'``: [(N, C, H_l, W_l) for l = min…max] -> (N, C, H_min, W_min), from the top
    level down, the running map nearest-resized to each lower level and added to it, divided by the level count."""
    total = levels[-1]
    for level in reversed(levels[:-1]):
        total = F.interpolate(total, size=level.shape[-2:], mode="nearest") + level
    return total / len(levels)


def _check_head_args(num_classes, aggregation, endpoints_num_filters, dropout_rate) -> None:
    for name, value in (("num_classes", num_classes), ("endpoints_num_filters", endpoints_num_filters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "num_classes" else 0):
            expected = "a positive int" if name == "num_classes" else "an int ≥ 0"
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")


def spinenet_classifier(model_id: str, *, weights=None, progress: bool = True, num_classes: int = 1000,
                        **kwargs) -> SpineNetClassifier:  # fmt: skip
    """torchvision's classification builder signature: ``torchvision.models.get_model("spinenet49_cls",
    weights=None, num_classes=...)`` (registered for every official id). No pretrained weights ship with this package:
    ``weights`` must be None."""
    del progress  # nothing is downloaded
    if weights is not None:
        raise ValueError(f"no pretrained weights ship with spinenet-fast, got weights={weights!r}")
    return SpineNetClassifier(model_id, num_classes, **kwargs)


for _model_id in SCALING_MAP:
    register_model(f"spinenet{_model_id.lower()}_cls")(functools.partial(spinenet_classifier, _model_id))
