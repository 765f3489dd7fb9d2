"""Batched anchor matching equals torchvision's per-image ``Matcher`` on ``box_iou``, as its RetinaNet runs it."""

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from spinenet_fast.detection.matching import match_anchors, pad_targets


def torchvision_matches(anchors, targets, high, low, allow_low_quality=True):
    """torchvision ``RetinaNet.compute_loss``'s matching loop."""
    matcher = Matcher(high, low, allow_low_quality_matches=allow_low_quality)
    out = []
    for anchors_per_image, target in zip(anchors, targets):
        if target["boxes"].numel() == 0:
            out.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64))
            continue
        out.append(matcher(box_iou(target["boxes"], anchors_per_image)))
    return torch.stack(out)


def grid_anchors(step=4, size=32):
    """Anchors on an integer grid in two sizes: many exact IoU ties (duplicates, symmetric overlaps)."""
    xs = torch.arange(0, size, step, dtype=torch.float32)
    y, x = torch.meshgrid(xs, xs, indexing="ij")
    corners = [torch.stack([x, y, x + side, y + side], -1).reshape(-1, 4) for side in (6.0, 10.0)]
    return torch.cat([*corners, corners[0][:5]])  # five duplicated anchors


def random_targets(counts, generator, size=32):
    targets = []
    for count in counts:
        xy = torch.randint(0, size - 4, (count, 2), generator=generator).float()
        wh = torch.randint(2, 14, (count, 2), generator=generator).float()
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 5, (count,))})
    return targets


@pytest.mark.parametrize("counts", [(3, 1, 5), (0, 2), (0, 0), (1,), (7, 0, 4, 2)])
@pytest.mark.parametrize(("high", "low", "low_quality"), [(0.5, 0.5, True), (0.5, 0.4, True), (0.6, 0.3, False)])
def test_equals_torchvision_per_image(counts, high, low, low_quality):
    generator = torch.Generator().manual_seed(sum(counts) + int(10 * low))
    anchors = [grid_anchors()] * len(counts)
    targets = random_targets(counts, generator)
    boxes, _, valid = pad_targets(targets)
    matched = match_anchors(torch.stack(anchors), boxes, valid, high, low, low_quality)
    expected = torchvision_matches(anchors, targets, high, low, low_quality)
    assert matched.dtype == torch.int64
    torch.testing.assert_close(matched, expected, rtol=0, atol=0)
    if counts == (3, 1, 5) and (high, low) == (0.5, 0.5):
        assert (matched >= 0).any() and (matched == -1).any()  # the case exercises both outcomes


def test_low_quality_matches_keep_every_tied_best_anchor():
    # The only ground truth overlaps no anchor above 0.5: its best anchors (two exact duplicates) are still matched.
    anchors = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]])
    boxes = torch.tensor([[[0.0, 0, 4, 4]]])
    matched = match_anchors(anchors, boxes, torch.ones(1, 1, dtype=torch.bool), 0.5, 0.4)
    assert matched.tolist() == [[0, 0, -1]]
    assert match_anchors(anchors, boxes, torch.ones(1, 1, dtype=torch.bool), 0.5, 0.4, False).tolist() == [[-1] * 3]


def test_padding_never_matches():
    # A zero-area anchor: its IoU with the zero-area padding box is 0 / 0 (NaN) unless padding is masked.
    anchors = torch.tensor([[[0.0, 0, 10, 10], [40, 40, 50, 50], [5, 5, 5, 5]]] * 2)
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [40, 40, 50, 50]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([3])}]  # fmt: skip
    boxes, labels, valid = pad_targets(targets)
    assert valid.tolist() == [[True, True], [True, False]] and labels.tolist() == [[1, 2], [3, 0]]
    # The second image's padding box (all zeros) must not become the best match of any anchor.
    assert match_anchors(anchors, boxes, valid, 0.5, 0.5).tolist() == [[0, 1, -1], [0, -1, -1]]
