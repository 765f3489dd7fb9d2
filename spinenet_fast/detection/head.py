"""RetinaNet head of SpineNet detectors: class and box towers whose convs are shared across levels, BN per level.

Follows torchvision ``RetinaNetHead``'s contract: ``forward(features)`` returns ``cls_logits`` (N, ΣHWA, K) and
``bbox_regression`` (N, ΣHWA, 4); ``compute_loss(targets, head_outputs, anchors, matched_idxs)`` returns
``classification`` and ``bbox_regression`` losses — eagerly (torchvision's ops, image by image) or through the fused
``retinanet_loss`` op for the whole batch (:meth:`SpineNetRetinaNetHead.loss_from_matches`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import sigmoid_focal_loss

from ..models.layers import FusedSetting, NormFactory, make_activation
from ..ops.retinanet_loss import retinanet_loss
from .anchors import flatten_per_anchor
from .fused_head import fusable_head, fused_head_forward
from .matching import pad_targets


class SeparableConv2d(nn.Sequential):
    """Keras ``SeparableConv2D`` (depth multiplier 1): a 3×3 depthwise conv without bias, then a 1×1 conv with bias.

    x: (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1),
        )


def head_conv(in_channels: int, out_channels: int, separable: bool) -> nn.Module:
    """A 3×3 conv with bias, or its separable form."""
    if separable:
        return SeparableConv2d(in_channels, out_channels)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class SharedTower(nn.Module):
    """``num_convs`` × (3×3 conv with bias — or separable —, shared across levels -> BN of this level -> act).

    x: (N, C, H, W) of level index ``level`` -> (N, C, H, W).
    """

    def __init__(self, channels: int, num_convs: int, num_levels: int, norm: NormFactory, activation: str,
                 separable: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.convs = nn.ModuleList(head_conv(channels, channels, separable) for _ in range(num_convs))
        self.norms = nn.ModuleList(nn.ModuleList(norm(channels) for _ in range(num_convs)) for _ in range(num_levels))
        self.act = make_activation(activation)
        for conv in self.convs:
            if separable:  # Keras' default initializers: Glorot-uniform kernels
                for layer in conv:
                    nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(conv[1].bias)
            else:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, level: int) -> Tensor:
        for conv, norm in zip(self.convs, self.norms[level]):
            x = self.act(norm(conv(x)))
        return x


class SpineNetRetinaNetHead(FusedSetting, nn.Module):
    """Class and box towers over P3…P7 with the official init, prior bias and protocol-C losses.

    Losses (architecture.md §7): sigmoid focal loss (α, γ) summed over non-ignored anchors; Huber (δ) of the
    box deltas averaged over the 4 coordinates of each positive anchor (Keras ``Huber`` as used by the
    official code), summed, × ``box_loss_weight``; both divided by (positive anchors in the batch + 1).
    ``fused``: True computes them with the fused ``retinanet_loss`` op (one forward and one backward kernel for the
    batch), False with torchvision's ops image by image, ``"auto"`` fused on a GPU with Triton. Same values.
    ``separable``: Keras-style separable convs (depthwise 3×3, then 1×1 with bias) in the towers and predictors, as
    SpineNet-Mobile's head has (Model Garden's init; the towers run eagerly).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        num_levels: int = 5,
        num_convs: int = 4,
        activation: str = "swish",
        norm: NormFactory = nn.BatchNorm2d,
        prior_probability: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 1.5,
        huber_delta: float = 0.1,
        box_loss_weight: float = 50.0,
        fused: bool | str = "auto",
        separable: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(fused, bool) and fused != "auto":
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        self.fused, self.activation = fused, activation
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.separable = separable
        self.class_tower = SharedTower(in_channels, num_convs, num_levels, norm, activation, separable)
        self.box_tower = SharedTower(in_channels, num_convs, num_levels, norm, activation, separable)
        self.class_predictor = head_conv(in_channels, num_anchors * num_classes, separable)
        self.box_predictor = head_conv(in_channels, num_anchors * 4, separable)
        for predictor in (self.class_predictor, self.box_predictor):
            for layer in predictor if separable else [predictor]:  # separable: N(0, 0.03²) as Model Garden's
                nn.init.normal_(layer.weight, std=0.03 if separable else 1e-5)
            nn.init.zeros_(predictor[1].bias if separable else predictor.bias)
        prior = -math.log((1 - prior_probability) / prior_probability)
        nn.init.constant_(self.class_predictor[1].bias if separable else self.class_predictor.bias, prior)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.huber_delta, self.box_loss_weight = huber_delta, box_loss_weight

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """features: P3…P7, each (N, C, H_l, W_l) -> ``cls_logits`` (N, ΣHWA, K), ``bbox_regression`` (N, ΣHWA, 4)."""
        if len(features) != len(self.class_tower.norms):
            raise ValueError(f"features must hold {len(self.class_tower.norms)} levels, got {len(features)}")
        if self.runs_fused(features[0]):
            return fused_head_forward(self, features)
        cls_logits, bbox_regression = [], []
        for level, x in enumerate(features):
            cls_logits.append(flatten_per_anchor(self.class_predictor(self.class_tower(x, level)), self.num_classes))
            bbox_regression.append(flatten_per_anchor(self.box_predictor(self.box_tower(x, level)), 4))
        return {"cls_logits": torch.cat(cls_logits, dim=1), "bbox_regression": torch.cat(bbox_regression, dim=1)}

    def uses_fused_ops(self) -> bool:
        """Whether the towers and predictors run on the fused ops: ``fused`` (True, or ``"auto"`` with the parameters on
        a GPU with Triton) and every tower norm a BN (others, e.g. ``FrozenBatchNorm2d``, run eagerly)."""
        return super().uses_fused_ops() and fusable_head(self)

    def uses_fused_loss(self, device: torch.device) -> bool:
        """Whether the losses of outputs on ``device`` go through the fused op (see ``fused``)."""
        return self.fused_on(device)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """matched_idxs[i]: (ΣHWA,) ground-truth index per anchor, −1 background, −2 ignored."""
        if self.uses_fused_loss(head_outputs["cls_logits"].device):
            boxes, labels, _ = pad_targets(targets)
            matched = torch.stack(matched_idxs)
            return self.loss_from_matches(
                head_outputs, torch.stack(anchors), matched, boxes, labels, check_indices=True
            )
        dtype = torch.promote_types(head_outputs["cls_logits"].dtype, torch.float32)  # fp32, or float64
        cls_logits = head_outputs["cls_logits"].to(dtype)
        bbox_regression = head_outputs["bbox_regression"].to(dtype)
        matched = torch.stack(matched_idxs)
        foreground = matched >= 0
        normalizer = foreground.sum() + 1.0

        class_targets = torch.zeros_like(cls_logits)
        box_targets = []
        for i, target in enumerate(targets):
            fg_gt = matched[i][foreground[i]]
            class_targets[i, foreground[i], target["labels"][fg_gt]] = 1.0
            box_targets.append(
                self.box_coder.encode_single(target["boxes"][fg_gt].to(dtype), anchors[i][foreground[i]].to(dtype))
            )
        valid = matched != Matcher.BETWEEN_THRESHOLDS
        class_loss = sigmoid_focal_loss(
            cls_logits[valid], class_targets[valid], alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        huber = F.huber_loss(
            bbox_regression[foreground], torch.cat(box_targets), delta=self.huber_delta, reduction="none"
        )
        box_loss = self.box_loss_weight * huber.mean(dim=-1).sum()
        return {"classification": class_loss / normalizer, "bbox_regression": box_loss / normalizer}

    def loss_from_matches(
        self,
        head_outputs: dict[str, Tensor],
        anchors: Tensor,
        matched: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        *,
        check_indices: bool = False,
    ) -> dict[str, Tensor]:
        """The losses of the whole batch through the fused op: anchors (N, A, 4), matched (N, A) (``compute_loss``'s,
        stacked), padded gt_boxes (N, G, 4) and gt_labels (N, G). ``check_indices``: check that every ``matched`` entry
        is −2, −1 or below G (a device sync; not needed for :func:`~spinenet_fast.detection.matching.match_anchors`'
        result)."""
        sums = retinanet_loss(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], matched, gt_labels, gt_boxes, anchors,
            self.focal_alpha, self.focal_gamma, self.huber_delta, check_indices=check_indices,
        )  # fmt: skip
        normalizer = sums[2].detach() + 1.0
        return {"classification": sums[0] / normalizer, "bbox_regression": self.box_loss_weight * sums[1] / normalizer}
