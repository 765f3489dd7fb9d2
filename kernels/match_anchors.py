"""Triton kernels of batched anchor matching (torchvision ``Matcher`` on ``box_iou``), without an IoU matrix.

Two launches over (anchor blocks) × (images), each looping over the image's G (padded) ground-truth boxes and
recomputing IoU as ``box_iou`` does (same fp32 operations, IEEE division): the first takes every ground truth's best IoU
over the image's anchors (an atomic max into a (N, G) buffer filled with −1), the second each anchor's best ground
truth (the first of equal IoUs, as ``max`` returns), its thresholds, and whether the anchor is some ground truth's
best (a low-quality match). anchors (N, A, 4), gt_boxes (N, G, 4) fp32 and gt_valid (N, G) int8 are contiguous.
"""

import torch
import triton
import triton.language as tl

BLOCK_A = 256


@triton.jit
def _iou(ax1, ay1, ax2, ay2, area_a, boxes_ptr, box):
    """IoU of one ground-truth box (at ``boxes_ptr + 4·box``) with a block of anchors, as ``box_iou`` computes it."""
    gx1 = tl.load(boxes_ptr + box * 4)
    gy1 = tl.load(boxes_ptr + box * 4 + 1)
    gx2 = tl.load(boxes_ptr + box * 4 + 2)
    gy2 = tl.load(boxes_ptr + box * 4 + 3)
    width = tl.maximum(tl.minimum(gx2, ax2) - tl.maximum(gx1, ax1), 0.0)
    height = tl.maximum(tl.minimum(gy2, ay2) - tl.maximum(gy1, ay1), 0.0)
    inter = width * height
    return tl.math.div_rn(inter, (gx2 - gx1) * (gy2 - gy1) + area_a - inter)


@triton.jit
def _anchor_block(anchors_ptr, A, BLOCK_A: tl.constexpr):
    """This program's anchors of image ``program_id(1)``: indices, mask, corners and areas."""
    a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask = a < A
    row = anchors_ptr + (tl.program_id(1) * A + a) * 4
    ax1 = tl.load(row, mask=mask, other=0.0)
    ay1 = tl.load(row + 1, mask=mask, other=0.0)
    ax2 = tl.load(row + 2, mask=mask, other=0.0)
    ay2 = tl.load(row + 3, mask=mask, other=0.0)
    return a, mask, ax1, ay1, ax2, ay2, (ax2 - ax1) * (ay2 - ay1)


@triton.jit
def _best_per_gt_kernel(best_ptr, anchors_ptr, boxes_ptr, valid_ptr, A, G, BLOCK_A: tl.constexpr):
    """best[n, g] = max over this block's anchors of IoU(g, anchor), atomically (valid ground truth only)."""
    n = tl.program_id(1)
    _, mask, ax1, ay1, ax2, ay2, area_a = _anchor_block(anchors_ptr, A, BLOCK_A)
    for g in range(G):
        if tl.load(valid_ptr + n * G + g) != 0:
            iou = _iou(ax1, ay1, ax2, ay2, area_a, boxes_ptr, n * G + g)
            tl.atomic_max(best_ptr + n * G + g, tl.max(tl.where(mask, iou, -1.0), axis=0))


@triton.jit
def _match_kernel(
    matched_ptr, best_ptr, anchors_ptr, boxes_ptr, valid_ptr, A, G, high, low,
    LOW_QUALITY: tl.constexpr, BLOCK_A: tl.constexpr,
):  # fmt: skip
    """matched[n, a]: the anchor's best ground truth where its IoU ≥ high (or it is some ground truth's best), −2
    where low ≤ IoU < high, −1 below low."""
    n = tl.program_id(1)
    a, mask, ax1, ay1, ax2, ay2, area_a = _anchor_block(anchors_ptr, A, BLOCK_A)
    best_iou = tl.full([BLOCK_A], -1.0, tl.float32)
    best_gt = tl.zeros([BLOCK_A], tl.int64)
    is_best = tl.zeros([BLOCK_A], tl.int32)  # int32, not int1: Triton 3.2's interpreter has no int1 zeros
    for g in range(G):
        if tl.load(valid_ptr + n * G + g) != 0:
            iou = _iou(ax1, ay1, ax2, ay2, area_a, boxes_ptr, n * G + g)
            better = iou > best_iou
            best_gt = tl.where(better, g, best_gt)
            best_iou = tl.where(better, iou, best_iou)
            if LOW_QUALITY:
                is_best = is_best | (iou == tl.load(best_ptr + n * G + g)).to(tl.int32)
    matched = tl.where(best_iou < low, -1, tl.where(best_iou < high, -2, best_gt))  # Matcher's two codes
    if LOW_QUALITY:
        matched = tl.where(is_best != 0, best_gt, matched)
    tl.store(matched_ptr + n * A + a, matched, mask=mask)


def match_anchors_triton(anchors, gt_boxes, gt_valid, high_threshold, low_threshold, allow_low_quality_matches):
    """(N, A) int64 matches (see ``spinenet_fast.ops.match_anchors``)."""
    n, a = anchors.shape[:2]
    g = gt_boxes.shape[1]
    matched = torch.empty((n, a), dtype=torch.int64, device=anchors.device)
    if matched.numel() == 0:
        return matched
    anchors, boxes = anchors.contiguous(), gt_boxes.contiguous()
    valid = gt_valid.to(torch.int8).contiguous()
    best = torch.full((n, g), -1.0, dtype=torch.float32, device=anchors.device)
    grid = (triton.cdiv(a, BLOCK_A), n)
    if allow_low_quality_matches and g:
        _best_per_gt_kernel[grid](best, anchors, boxes, valid, a, g, BLOCK_A=BLOCK_A)
    _match_kernel[grid](
        matched, best, anchors, boxes, valid, a, g, float(high_threshold), float(low_threshold),
        LOW_QUALITY=bool(allow_low_quality_matches), BLOCK_A=BLOCK_A,
    )  # fmt: skip
    return matched
