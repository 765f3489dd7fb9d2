"""``match_anchors``: torchvision's ``Matcher`` on ``box_iou`` for every image of a padded batch at once.

anchors (N, A, 4) and gt_boxes (N, G, 4) x1y1x2y2 in one float dtype, gt_valid (N, G) bool (False for padding)
-> (N, A) int64: the matched ground-truth index, −1 (``Matcher.BELOW_LOW_THRESHOLD``) for background, −2
(``BETWEEN_THRESHOLDS``) for ignored anchors; −1 everywhere for an image without ground truth (as torchvision's
RetinaNet does). The Triton kernels never write the (N, G, A) IoU matrix: two launches recompute IoU per anchor block.
"""

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_area

from . import backends, op_spec
from .checks import describe
from .op_spec import Backend

# Padded ground truth's IoU: below every real IoU (≥ 0), so padding never wins a max and is never a best match.
PADDING_IOU = -1.0


def check_match_args(anchors, gt_boxes, gt_valid, high_threshold, low_threshold) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one batch's matching."""
    if (
        not isinstance(anchors, Tensor)
        or anchors.dim() != 3
        or anchors.shape[2] != 4
        or not anchors.is_floating_point()
    ):
        raise TypeError(f"anchors must be a floating-point (N, A, 4) tensor, got {describe(anchors)}")
    n = anchors.shape[0]
    fits = isinstance(gt_boxes, Tensor) and gt_boxes.dim() == 3 and gt_boxes.shape[0] == n and gt_boxes.shape[2] == 4
    if not (fits and gt_boxes.dtype == anchors.dtype and gt_boxes.device == anchors.device):
        raise TypeError(f"gt_boxes must be a {anchors.dtype} (N={n}, G, 4) tensor on {anchors.device}, got "
                        f"{describe(gt_boxes)}")  # fmt: skip
    shape = tuple(gt_boxes.shape[:2])
    if not (isinstance(gt_valid, Tensor) and gt_valid.dtype == torch.bool and tuple(gt_valid.shape) == shape
            and gt_valid.device == anchors.device):  # fmt: skip
        raise TypeError(
            f"gt_valid must be a bool tensor of shape {shape} on {anchors.device}, got {describe(gt_valid)}"
        )
    for name, value in (("high_threshold", high_threshold), ("low_threshold", low_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, G, 4), (N, A, 4) -> (N, G, A): torchvision's ``box_iou`` of each image's pair, with its operations in its
    order (so its values to the last bit); written out because ``box_iou`` takes no batch dimension (and ``vmap``
    inside a custom op defeats ``opcheck``'s schema check)."""
    area1 = box_area(boxes1.reshape(-1, 4)).view(boxes1.shape[:2])
    area2 = box_area(boxes2.reshape(-1, 4)).view(boxes2.shape[:2])
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, :, None] + area2[:, None, :] - inter)


def match_anchors_reference(anchors, gt_boxes, gt_valid, high_threshold, low_threshold, allow_low_quality_matches):
    """One (N, G, A) IoU matrix (:func:`batched_box_iou`) and ``Matcher``'s rules, in ATen ops."""
    n, a = anchors.shape[:2]
    if gt_boxes.shape[1] == 0:
        return torch.full((n, a), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
    iou = batched_box_iou(gt_boxes, anchors)
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


def _triton_reasons(anchors, gt_boxes, *args) -> list[str]:
    reasons = backends.triton_reasons(anchors, gt_boxes)
    if anchors.dtype != torch.float32:
        reasons.append(
            f"the Triton matcher computes IoU in float32 as box_iou does on float32 boxes, got {anchors.dtype}"
        )
    return reasons


@op_spec.custom_op(
    "match_anchors",
    fake=lambda anchors, *args: anchors.new_empty(anchors.shape[:2], dtype=torch.int64),
    implementations={
        "reference": Backend(match_anchors_reference),
        "triton": Backend(op_spec.kernel("match_anchors", "match_anchors_triton"), _triton_reasons),
        # ATen's kernels (what the reference launches): the matcher has no extension kernel.
        "cuda": Backend(match_anchors_reference, lambda anchors, *args: backends.library_reasons(anchors)),
    },
    auto_order=op_spec.FUSED_FIRST,
)
def _match_anchors_op(
    anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, high_threshold: float, low_threshold: float,
    allow_low_quality_matches: bool,
) -> Tensor:  # fmt: skip
    """(N, A) int64 matches: see the module docstring."""


def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool = True,
) -> Tensor:
    """The matched ground-truth index of every anchor (see the module docstring) — torchvision ``Matcher(
    high_threshold, low_threshold, allow_low_quality_matches)`` on each image's ``box_iou(gt_boxes, anchors)``;
    checks its arguments first."""
    check_match_args(anchors, gt_boxes, gt_valid, high_threshold, low_threshold)
    return _match_anchors_op(
        anchors, gt_boxes, gt_valid, float(high_threshold), float(low_threshold), bool(allow_low_quality_matches)
    )
