"""The RetinaNet-SpineNet builder: a torchvision RetinaNet with §7's parts, parameter counts and target checks."""

import copy
from math import nan

import pytest
import torch
from torchvision.models.detection import RetinaNet

from spinenet_fast.detection import retinanet_spinenet, spinenet_anchor_generator
from spinenet_fast.detection.retinanet import checked_targets

DETECTOR_PARAMS = {("49S", 91): 11_265_942, ("49S", 80): 11_151_795, ("49", 91): 28_543_383, ("49", 80): 28_315_188}
SLOW_DETECTOR_PARAMS = {
    ("96", 91): 42_974_871,
    ("96", 80): 42_746_676,
    ("143", 91): 66_959_511,
    ("143", 80): 66_731_316,
    ("190", 91): 163_637_351,
    ("190", 80): 163_181_060,
}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("model_id", "num_classes"), list(DETECTOR_PARAMS))
def test_parameter_counts(model_id, num_classes):
    assert trainable(retinanet_spinenet(model_id, num_classes)) == DETECTOR_PARAMS[(model_id, num_classes)]


@pytest.mark.parametrize(("model_id", "num_classes"), list(SLOW_DETECTOR_PARAMS))
def test_parameter_counts_large_models(model_id, num_classes):
    assert trainable(retinanet_spinenet(model_id, num_classes)) == SLOW_DETECTOR_PARAMS[(model_id, num_classes)]


def test_recipe_parts():
    model = retinanet_spinenet("49S", 80)
    assert isinstance(model, RetinaNet)
    assert model.transform.size_divisible == 128
    assert model.transform.min_size == (640,) and model.transform.max_size == 640
    assert model.proposal_matcher.high_threshold == 0.5 and model.proposal_matcher.low_threshold == 0.5
    assert model.proposal_matcher.allow_low_quality_matches
    assert model.head.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (
        0.05,
        0.5,
        100,
        5000,
    )
    assert len(model.head.class_tower.convs) == 4
    assert retinanet_spinenet("143", 80).anchor_generator.sizes[0][0] == 4 * 8
    assert retinanet_spinenet("49S", 80, score_thresh=0.3, image_size=256).score_thresh == 0.3


def test_anchor_sizes_scales_and_ratios():
    generator = spinenet_anchor_generator(3)
    assert generator.num_anchors_per_location() == [9] * 5
    assert generator.sizes[0] == pytest.approx((24, 24 * 2 ** (1 / 3), 24 * 2 ** (2 / 3)))
    assert generator.sizes[4][0] == 3 * 128
    assert generator.aspect_ratios[0] == (0.5, 1.0, 2.0)


def test_tf_anchor_style_centres_cells_with_exact_sides():
    """The official placement (TF Model Garden ``Anchor``): the first anchor of a level is centred at (s/2, s/2),
    sides anchor_size·s·2^(i/3)·(√r_w, 1/√r_w) unrounded; torchvision's centres at 0 with rounded sides."""
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(1, 3, 256, 128), [(256, 128)])
    features = [torch.zeros(1, 1, 256 // 2**level, 128 // 2**level) for level in range(3, 8)]
    tf_anchors = spinenet_anchor_generator(3, style="tf")(images, features)[0]
    tv_anchors = spinenet_anchor_generator(3)(images, features)[0]
    assert tf_anchors.shape == tv_anchors.shape == (9 * sum(f.shape[-1] * f.shape[-2] for f in features), 4)
    side = 3 * 8 * 2 ** (1 / 3)  # level 3, scale 1; aspect 0.5 (h/w) is index 0: wider than tall
    expected = torch.tensor([4 - side / 2**0.5, 4 - side / 2**1.5, 4 + side / 2**0.5, 4 + side / 2**1.5])
    torch.testing.assert_close(tf_anchors[1], expected)
    torch.testing.assert_close(tv_anchors[1], (expected - 4).round())
    level7 = tf_anchors[-9 * 2 :]  # 2 × 1 cells at level 7: the last cell is centred at (64, 192)
    torch.testing.assert_close(level7[-5].view(2, 2).mean(0), torch.tensor([64.0, 192.0]))
    with pytest.raises(ValueError, match=r"style must be one of \['tf', 'torchvision'\], got 'keras'"):
        spinenet_anchor_generator(3, style="keras")


@pytest.fixture(scope="module")
def small_detector():
    torch.manual_seed(0)
    return retinanet_spinenet("49S", 3, image_size=128, stochastic_depth_rate=0.0)


def test_train_and_eval_any_image_size(small_detector):
    images = [torch.rand(3, 128, 128), torch.rand(3, 97, 131)]  # odd sizes are resized and padded to 128s
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    small_detector.train()
    losses = small_detector(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    small_detector.eval()
    with torch.no_grad():
        detections = small_detector(images)
    assert len(detections) == 2 and set(detections[1]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (
            {"boxes": torch.tensor([[10.0, 10, 5, 60]]), "labels": torch.tensor([1])},
            ValueError,
            r"x1 < x2.*10\.0, 10\.0, 5\.0",
        ),
        ({"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1.0])}, TypeError, "must be an integer"),
        (
            {"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([-1])},
            ValueError,
            r"in \[0, 3\), got -1",
        ),
        ({"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([3])}, ValueError, r"in \[0, 3\), got 3"),
        ({"boxes": torch.tensor([[10.0, nan, 50, 60]]), "labels": torch.tensor([1])}, ValueError, "must be finite"),
        ({"boxes": torch.tensor([[True, True, True, True]]), "labels": torch.tensor([1])}, TypeError, "real tensor"),
        ({"boxes": torch.tensor([10.0, 10, 50, 60]), "labels": torch.tensor([1])}, TypeError, r"shape \(K, 4\)"),
    ],
)
def test_bad_targets(small_detector, target, error, match):
    """What torchvision's RetinaNet rejects (degenerate boxes) and what is invalid for any detector."""
    small_detector.train()
    with pytest.raises(error, match=match):
        small_detector([torch.rand(3, 128, 128)], [target])


def test_targets_torchvision_accepts_are_accepted(small_detector):
    """Integer boxes (torchvision's v2 transforms keep COCO's), int32 labels and a box a hair past the image edge
    train as their float / int64 equivalents; the caller's dicts are left as they were."""
    image = torch.rand(3, 128, 128)
    as_given = {
        "boxes": torch.tensor([[10, 10, 50, 60]], dtype=torch.int32),
        "labels": torch.tensor([1], dtype=torch.int32),
    }
    edge = {"boxes": torch.tensor([[10.0, 10.0, 128.00001, 60.0]]), "labels": torch.tensor([2])}
    small_detector.train()
    torch.manual_seed(0)
    got = small_detector([image, image], [as_given, edge])
    torch.manual_seed(0)
    want = small_detector([image, image], [{"boxes": as_given["boxes"].float(), "labels": torch.tensor([1])}, edge])
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    assert as_given["boxes"].dtype == torch.int32 and as_given["labels"].dtype == torch.int32


def test_target_checks_are_batched_and_name_the_bad_target():
    """One set of launches (and one host sync) for the whole batch's value checks, whatever its size; a bad value in
    any image is reported with that image's index."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    good = {"boxes": torch.tensor([[10.0, 10, 50, 60], [0, 0, 5, 5]]), "labels": torch.tensor([1, 2])}
    images = [torch.zeros(3, 8, 8)] * 5
    counts = []
    for batch in (2, 5):
        with Ops() as ops:
            checked_targets(images[:batch], [good] * batch, 3)
        counts.append(ops.names)
    assert counts[0] == counts[1] and counts[0].count("aten::_local_scalar_dense") == 1  # one host sync
    bad = {"boxes": torch.tensor([[10.0, 10, 50, 60], [0, 0, 5, 5]]), "labels": torch.tensor([1, 3])}
    with pytest.raises(ValueError, match=r"targets\[3\]\['labels'\] must be class indices in \[0, 3\), got 3"):
        checked_targets(images[:4], [good, good, good, bad], 3)


def test_bad_images_and_sizes(small_detector):
    small_detector.eval()
    with pytest.raises(TypeError, match="floating"):
        small_detector([torch.zeros(3, 128, 128, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 128, got 100"):
        retinanet_spinenet("49S", 3, image_size=100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"anchor_size": 0}, "anchor_size must be a finite positive number"),
        ({"anchor_size": -3}, "anchor_size must be a finite positive number"),
        ({"head_num_convs": -1}, "head_num_convs must be an int >= 0, got -1"),
        ({"score_thresh": 2}, r"score_thresh must be a number in \[0, 1\], got 2"),
        ({"nms_thresh": nan}, "nms_thresh must be a number in"),
        ({"detections_per_img": 0}, "detections_per_img must be an int >= 1"),
        ({"fg_iou_thresh": 0.4}, r"bg_iou_thresh \(0.5\) must not exceed fg_iou_thresh \(0.4\)"),
        ({"bn_momentum": 5}, r"bn_momentum must be a number in \(0, 1\]"),
        ({"bn_eps": 0.0}, "bn_eps must be a finite positive number"),
    ],
)
def test_unusable_detector_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retinanet_spinenet("49S", 3, image_size=128, **kwargs)


def loss_and_grads(detector, images, targets):
    losses = detector(images, targets)
    params = [p for p in detector.parameters() if p.requires_grad]
    return losses, torch.autograd.grad(sum(losses.values()), params, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_loss_equals_torchvision_per_image(dtype):
    """The fused loss (batched matching + ``retinanet_loss``; float64: the reference backend, fp32: Triton under the
    interpreter) against torchvision's per-image matching and losses, on one detector: losses and every gradient.
    Targets: several boxes, one too small for any anchor to reach IoU 0.5 (a low-quality match), an empty image."""
    torch.manual_seed(0)
    detector = retinanet_spinenet("49S", 3, image_size=128, stochastic_depth_rate=0.0, fused=False).to(dtype).train()
    images = [torch.rand(3, 128, 128, dtype=dtype) for _ in range(3)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 50, 60], [60, 20, 120, 90], [70, 70, 73, 74]]),
         "labels": torch.tensor([1, 2, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[0.0, 0, 128, 128]]), "labels": torch.tensor([2])},
    ]  # fmt: skip
    eager_losses, eager_grads = loss_and_grads(detector, images, targets)
    detector.head.fused = True
    detector.head.uses_fused_ops = lambda: False  # the towers stay eager: this test is about the loss
    fused_losses, fused_grads = loss_and_grads(detector, images, targets)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for name in eager_losses:
        torch.testing.assert_close(fused_losses[name], eager_losses[name], **tolerance)
    for fused, eager in zip(fused_grads, eager_grads):
        torch.testing.assert_close(fused, eager, **tolerance)
    assert eager_losses["bbox_regression"] > 0


def test_fused_detector_training_equals_eager_in_float64():
    """The whole detector fused (cross-scale connections, head towers and predictors, loss: batched matching +
    ``retinanet_loss``) trains as the eager one in float64: the same losses and, after two SGD steps, the same
    parameters and BN running statistics, up to summation order (256 px: at 128 px P7 is 1×1, and training-mode BN
    over 2 values per channel is chaotic in any precision)."""
    torch.manual_seed(0)
    eager = retinanet_spinenet("49S", 3, image_size=256, stochastic_depth_rate=0.0, fused=False).double().train()
    fused = copy.deepcopy(eager)
    for merge in fused.backbone.merges:
        merge.fused = True
    fused.head.fused = True
    images = [torch.rand(3, 256, 256, dtype=torch.float64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[20.0, 20, 100, 120], [140, 140, 146, 148]]), "labels": torch.tensor([1, 0])},
        {"boxes": torch.tensor([[60.0, 10, 240, 200]]), "labels": torch.tensor([2])},
    ]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) for model in (eager, fused)]
    for _ in range(2):
        losses = []
        for model, optimizer in zip((eager, fused), optimizers):
            optimizer.zero_grad()
            step_losses = model(images, targets)
            sum(step_losses.values()).backward()
            optimizer.step()
            losses.append(step_losses)
        for name in losses[0]:
            torch.testing.assert_close(losses[1][name], losses[0][name], rtol=1e-7, atol=0, msg=name)
    for (name, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
        error, scale = (b - a).abs().max().item(), a.abs().max().item()
        assert error <= 1e-6 * scale + 1e-12, f"{name}: error {error} for values up to {scale}"
