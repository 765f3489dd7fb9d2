"""The RetinaNet head: torchvision contract, official init, per-level BN and the protocol-C losses by hand."""

import math

import pytest
import torch
from torch import nn

from spinenet_fast.detection import SpineNetRetinaNetHead


def make_head(num_classes=3, channels=16, num_anchors=9, fused="auto"):
    return SpineNetRetinaNetHead(channels, num_anchors, num_classes, num_convs=2, activation="relu", fused=fused)


def test_output_shapes_follow_torchvision_contract():
    head = make_head()
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]
    out = head([torch.randn(2, 16, h, w) for h, w in sizes])
    total = sum(h * w for h, w in sizes) * 9
    assert out["cls_logits"].shape == (2, total, 3)
    assert out["bbox_regression"].shape == (2, total, 4)


def test_anchor_order_matches_torchvision_flattening():
    head = make_head(num_classes=2, num_anchors=3).eval()
    x = torch.randn(1, 16, 2, 2)
    raw = head.class_predictor(head.class_tower(x, 0))  # (1, A·K, H, W)
    flat = head([x] + [torch.randn(1, 16, 1, 1)] * 4)["cls_logits"][0, : 2 * 2 * 3]
    # Row (y, x, a) holds channels a·K … a·K + K − 1 at (y, x).
    torch.testing.assert_close(flat[(1 * 2 + 0) * 3 + 2], raw[0, 4:6, 1, 0])


def test_convs_shared_across_levels_and_bn_per_level():
    head = SpineNetRetinaNetHead(128, 9, 91, num_convs=4)
    assert len(head.class_tower.convs) == 4 and all(conv.bias is not None for conv in head.class_tower.convs)
    assert len(head.class_tower.norms) == 5 and all(len(level) == 4 for level in head.class_tower.norms)
    assert head.class_tower.norms[0][0] is not head.class_tower.norms[1][0]
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 5 * 4


def test_official_init():
    head = SpineNetRetinaNetHead(128, 9, 91)
    torch.testing.assert_close(head.class_predictor.bias, torch.full((9 * 91,), -math.log(99.0)))
    assert torch.all(head.box_predictor.bias == 0)
    assert head.class_predictor.weight.std().item() == pytest.approx(1e-5, rel=0.05)
    assert head.class_tower.convs[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(head.class_tower.convs[0].bias == 0)


def focal_by_hand(logit: float, target: float, alpha=0.25, gamma=1.5) -> float:
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def huber_by_hand(d: float, delta=0.1) -> float:
    return 0.5 * d * d if abs(d) < delta else delta * (abs(d) - 0.5 * delta)


def encode_by_hand(gt, anchor):
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
    gx, gy = gt[0] + gw / 2, gt[1] + gh / 2
    return [(gx - ax) / aw, (gy - ay) / ah, math.log(gw / aw), math.log(gh / ah)]


@pytest.mark.parametrize("fused", [False, True])
def test_losses_against_a_hand_computed_case(fused):
    head = make_head(num_classes=2, num_anchors=1, fused=fused)
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.3], [-3.0, 4.0]], [[-0.2, 1.5], [1.0, -2.0], [0.0, 0.0]]])
    regression = torch.tensor(
        [
            [[0.05, -0.02, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
            [[0.2, 0.01, -0.1, 0.05], [0.0, 0.3, 0.02, -0.4], [0.5, 0.5, 0.5, 0.5]],
        ]
    )
    anchors = [torch.tensor([[0.0, 0, 8, 8], [8, 8, 24, 24], [0, 0, 32, 32]])] * 2
    targets = [
        {"boxes": torch.tensor([[1.0, 0, 10, 9]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[6.0, 6, 26, 20], [0, 0, 6, 7]]), "labels": torch.tensor([0, 1])},
    ]
    matched = [torch.tensor([0, -1, -2]), torch.tensor([1, 0, -1])]
    losses = head.compute_loss(targets, {"cls_logits": logits, "bbox_regression": regression}, anchors, matched)

    normalizer = 3 + 1  # three positive anchors in the batch, plus one
    class_sum, box_sum = 0.0, 0.0
    for i in range(2):
        for a in range(3):
            m = int(matched[i][a])
            if m == -2:
                continue
            label = int(targets[i]["labels"][m]) if m >= 0 else None
            class_sum += sum(focal_by_hand(float(logits[i, a, k]), k == label) for k in range(2))
            if m >= 0:
                deltas = encode_by_hand(targets[i]["boxes"][m].tolist(), anchors[i][a].tolist())
                box_sum += sum(huber_by_hand(float(regression[i, a, c]) - deltas[c]) for c in range(4)) / 4
    assert losses["classification"].item() == pytest.approx(class_sum / normalizer, rel=1e-5)
    assert losses["bbox_regression"].item() == pytest.approx(50 * box_sum / normalizer, rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        make_head(num_classes=0)
    with pytest.raises(ValueError, match="features must hold 5 levels, got 2"):
        make_head()([torch.randn(1, 16, 4, 4)] * 2)
    with pytest.raises(ValueError, match="fused must be True, False or 'auto', got 'yes'"):
        make_head(fused="yes")


def test_compile_fullgraph_through_batched_matching_and_the_fused_loss():
    """torch.compile traces the fused loss path whole (no data-dependent shapes, no host syncs): matching and loss,
    forward and backward, equal to eager."""
    from spinenet_fast.detection.matching import match_anchors
    from spinenet_fast.ops import use_backend

    torch._dynamo.reset()
    head = make_head(num_classes=4, num_anchors=1, fused=True)
    anchors = torch.tensor([[0.0, 0, 8, 8], [8, 8, 24, 24], [0, 0, 32, 32], [4, 4, 12, 12]]).expand(2, 4, 4)
    boxes = torch.tensor([[[1.0, 0, 10, 9], [6, 6, 26, 20]], [[0.0, 0, 6, 7], [0, 0, 0, 0]]])
    labels, valid = torch.tensor([[1, 3], [2, 0]]), torch.tensor([[True, True], [True, False]])

    def loss(logits, regression):
        matched = match_anchors(anchors, boxes, valid, 0.5, 0.4)
        losses = head.loss_from_matches({"cls_logits": logits, "bbox_regression": regression}, anchors, matched, boxes,
                                        labels)  # fmt: skip
        return losses["classification"] + losses["bbox_regression"]

    inputs = [torch.randn(2, 4, 4, requires_grad=True), torch.randn(2, 4, 4, requires_grad=True)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with use_backend("reference"):
        got, want = compiled(*inputs), loss(*inputs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs))
