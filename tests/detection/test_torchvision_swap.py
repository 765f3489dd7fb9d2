"""The README's swap of our backbone into torchvision's own RetinaNet and Faster R-CNN works as written."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops import MultiScaleRoIAlign

from spinenet_fast import SpineNet
from spinenet_fast.detection import spinenet_anchor_generator
from spinenet_fast.detection.presets import CUSTOM_SCALINGS

TARGETS = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])}] * 2


def _backbone():
    return SpineNet(CUSTOM_SCALINGS["49XS-custom"], stochastic_depth_rate=0.0)


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_torchvision_detectors_train_and_predict(detector):
    if detector == "retinanet":
        model = RetinaNet(_backbone(), num_classes=3, anchor_generator=spinenet_anchor_generator(3),
                          size_divisible=128, min_size=128, max_size=128)  # fmt: skip
    else:
        model = FasterRCNN(_backbone(), num_classes=3, size_divisible=128, min_size=128, max_size=128,
                           box_roi_pool=MultiScaleRoIAlign(["p3", "p4", "p5", "p6"], 7, 2))  # fmt: skip
    images = [torch.rand(3, 128, 96), torch.rand(3, 100, 128)]  # batch 2: level 7 is 1×1 in training BN
    losses = model(images, TARGETS)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        prediction = model(images)[0]
    assert prediction["boxes"].shape[1] == 4


def test_without_size_divisible_128_the_backbone_says_what_to_do():
    model = RetinaNet(_backbone(), num_classes=3, anchor_generator=spinenet_anchor_generator(3), min_size=200,
                      max_size=200).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"H=224 must be a multiple of 128 .*pad it to 256"):
        model([torch.rand(3, 200, 200)])  # torchvision pads to 224, a multiple of 32 only
