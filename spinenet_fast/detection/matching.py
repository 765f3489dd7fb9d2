"""Anchor matching for a whole batch at once, with torchvision ``Matcher`` semantics.

torchvision's ``RetinaNet.compute_loss`` matches image by image (one IoU matrix, one ``Matcher`` call and their
launches per image). Here the ground truth of the batch is padded to (N, G) and every image is matched in the same
launches (:func:`~spinenet_fast.ops.match_anchors`, fused on a GPU: no IoU matrix); the result equals torchvision's
per-image computation (tests compare them), low-quality matches and empty images included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.match_anchors import match_anchors

__all__ = ["match_anchors", "pad_targets"]


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
