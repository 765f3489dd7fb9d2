"""The README's swap of our backbone into torchvision's own RetinaNet and Faster R-CNN works as written."""

import subprocess
import sys

import pytest
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops import MultiScaleRoIAlign

from spinenet_fast import SpineNet
from spinenet_fast.detection import spinenet_anchor_generator
from spinenet_fast.detection.presets import CUSTOM_SCALINGS

from ..conftest import child_env

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
    with pytest.raises(ValueError, match=r"H=224 must be a positive multiple of 128 .*pad it to 256"):
        model([torch.rand(3, 200, 200)])  # torchvision pads to 224, a multiple of 32 only


def test_import_spinenet_fast_registers_the_detectors():
    """The references do ``import spinenet_fast`` (or any submodule) and then ``get_model``: a fresh interpreter."""
    code = "import spinenet_fast, torchvision\n"
    code += "print(torchvision.models.get_model('retinanet_spinenet49s').head.num_classes)"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "91"


def test_registered_with_torchvision_get_model():
    """torchvision's references build models by name with their builder keywords: ours take them."""
    import torchvision

    from spinenet_fast.detection import SpineNetRetinaNet, torchvision_model_name

    names = set(torchvision.models.list_models())
    assert {torchvision_model_name(i) for i in ("49S", "49", "96", "143", "143L", "190")} <= names
    model = torchvision.models.get_model("retinanet_spinenet49s", weights=None, weights_backbone=None, num_classes=4,
                                         trainable_backbone_layers=None, _skip_resize=True, image_size=128)  # fmt: skip
    assert isinstance(model, SpineNetRetinaNet) and model.head.num_classes == 4 and model.transform._skip_resize
    assert torchvision.models.get_model("retinanet_spinenet49s", image_size=128).head.num_classes == 91
    refused = [
        ({"weights": "COCO_V1"}, "no pretrained weights .*python -m spinenet_fast.convert"),
        ({"weights_backbone": "IMAGENET1K_V1"}, "no pretrained backbone weights"),
        ({"trainable_backbone_layers": 3}, "trainable_backbone_layers must be None or 5"),
    ]
    for kwargs, match in refused:
        with pytest.raises(ValueError, match=match):
            torchvision.models.get_model("retinanet_spinenet49s", **kwargs)
