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


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("low_quality", [True, False])
def test_every_backend_equals_torchvision(backend, low_quality):
    """Each backend of the op, forced, on a batch with ties, an empty image and several thresholds' outcomes."""
    from spinenet_fast.ops import use_backend

    generator = torch.Generator().manual_seed(3)
    anchors = [grid_anchors()] * 3
    targets = random_targets((4, 0, 6), generator)
    boxes, _, valid = pad_targets(targets)
    with use_backend(backend):
        matched = match_anchors(torch.stack(anchors), boxes, valid, 0.5, 0.4, low_quality)
    expected = torchvision_matches(anchors, targets, 0.5, 0.4, low_quality)
    torch.testing.assert_close(matched, expected, rtol=0, atol=0)
    assert {-2, -1} <= set(matched.unique().tolist()) and (matched >= 0).any()


def test_batched_box_iou_is_torchvisions_to_the_last_bit():
    from torchvision.ops import box_iou

    from spinenet_fast.ops.match_anchors import batched_box_iou

    generator = torch.Generator().manual_seed(2)
    gt = torch.stack([t["boxes"] for t in random_targets((5, 5), generator)])
    anchors = torch.rand(2, 40, 2, generator=generator) * 30
    anchors = torch.cat([anchors, anchors + torch.rand(2, 40, 2, generator=generator) * 9 + 0.5], -1)
    want = torch.stack([box_iou(g, a) for g, a in zip(gt, anchors)])
    torch.testing.assert_close(batched_box_iou(gt, anchors), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    from spinenet_fast.ops import use_backend
    from spinenet_fast.ops.match_anchors import _match_anchors_op

    boxes, _, valid = pad_targets(random_targets((2, 1), torch.Generator().manual_seed(1)))
    with use_backend(backend):
        torch.library.opcheck(_match_anchors_op, (torch.stack([grid_anchors()] * 2), boxes, valid, 0.5, 0.4, True))


def test_bad_arguments():
    anchors, boxes, valid = torch.zeros(2, 5, 4), torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"anchors must be a floating-point \(N, A, 4\) tensor, got torch.int64"):
        match_anchors(anchors.long(), boxes, valid, 0.5, 0.4)
    with pytest.raises(TypeError, match=r"gt_boxes must be a torch.float32 \(N=2, G, 4\) tensor on cpu"):
        match_anchors(anchors, boxes[:1], valid, 0.5, 0.4)
    with pytest.raises(TypeError, match=r"gt_valid must be a bool tensor of shape \(2, 3\) on cpu, got torch.int64"):
        match_anchors(anchors, boxes, valid.long(), 0.5, 0.4)
    with pytest.raises(ValueError, match=r"low_threshold \(0.6\) must not exceed high_threshold \(0.5\)"):
        match_anchors(anchors, boxes, valid, 0.5, 0.6)
    with pytest.raises(ValueError, match=r"high_threshold must be a number in \[0, 1\], got 1.5"):
        match_anchors(anchors, boxes, valid, 1.5, 0.4)
