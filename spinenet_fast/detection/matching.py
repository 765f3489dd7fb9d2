"""Anchor matching for a whole batch at once, with torchvision ``Matcher`` semantics.

torchvision's ``RetinaNet.compute_loss`` matches image by image (one IoU matrix, one ``Matcher`` call and their
launches per image). Here the ground truth of the batch is padded to (N, G) and every image is matched in the same
launches; the result equals torchvision's per-image computation (tests compare them), low-quality matches and
empty images included.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

# Padded ground truth's IoU: below every real IoU (≥ 0), so padding never wins a max and is never a best match.
PADDING_IOU = -1.0


def pad_targets(targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes (N, G, 4), labels (N, G) int64 and valid (N, G) bool of the batch's targets, G the largest box count
    (zero boxes and label 0 where ``valid`` is False). A fixed number of launches, whatever the batch size."""
    counts = [len(t["labels"]) for t in targets]
    n, g = len(targets), max(counts, default=0)
    boxes, labels = torch.cat([t["boxes"] for t in targets]), torch.cat([t["labels"] for t in targets])
    device = labels.device
    slots = torch.tensor([i * g + j for i, count in enumerate(counts) for j in range(count)], dtype=torch.int64,
                         device=device)  # fmt: skip
    padded_boxes = boxes.new_zeros((n * g, 4)).index_copy_(0, slots, boxes).view(n, g, 4)
    padded_labels = labels.new_zeros(n * g).index_copy_(0, slots, labels).view(n, g)
    valid = torch.arange(g, device=device) < torch.tensor(counts, device=device)[:, None]
    return padded_boxes, padded_labels, valid


def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool = True,
) -> Tensor:
    """The matched ground-truth index of every anchor, (N, A) int64: ≥ 0 a match, −1 (``BELOW_LOW_THRESHOLD``)
    background, −2 (``BETWEEN_THRESHOLDS``) ignored — torchvision ``Matcher(high_threshold, low_threshold,
    allow_low_quality_matches)`` applied to each image's ``box_iou(gt_boxes, anchors)``, and −1 everywhere for an
    image without ground truth (as torchvision's RetinaNet does).

    anchors: (N, A, 4) x1y1x2y2; gt_boxes: (N, G, 4); gt_valid: (N, G) bool, False for padding."""
    n, a = anchors.shape[:2]
    if gt_boxes.shape[1] == 0:
        return torch.full((n, a), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
    iou = torch.vmap(box_iou)(gt_boxes, anchors)  # (N, G, A)
    iou = iou.masked_fill(~gt_valid[:, :, None], PADDING_IOU)
    best_iou, matches = iou.max(dim=1)
    below = best_iou < low_threshold
    between = (best_iou >= low_threshold) & (best_iou < high_threshold)
    matched = matches.masked_fill(below, Matcher.BELOW_LOW_THRESHOLD).masked_fill(between, Matcher.BETWEEN_THRESHOLDS)
    if allow_low_quality_matches:
        # Every anchor that is some ground truth's best (ties included) keeps its best match, however low its IoU.
        best_per_gt = iou.max(dim=2, keepdim=True).values
        is_best = ((iou == best_per_gt) & gt_valid[:, :, None]).any(dim=1)
        matched = torch.where(is_best, matches, matched)
    return matched  # an image without ground truth: only padding, so all −1
