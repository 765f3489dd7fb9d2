"""``spinenet_fast.models.get_model``: every listed name builds the model its name says."""

import pytest
from torchvision.models.detection import MaskRCNN, RetinaNet

from spinenet_fast import SpineNet
from spinenet_fast.models import get_model, list_models


def test_names():
    names = list_models()
    assert names[:6] == ["spinenet49s", "spinenet49", "spinenet96", "spinenet143", "spinenet143l", "spinenet190"]
    assert names[6:12] == [f"retinanet_{name}" for name in names[:6]]
    assert names[12:18] == [f"maskrcnn_{name}" for name in names[:6]]
    assert names[18:] == [f"{name}_cls" for name in names[:6]]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_backbone_and_detector_by_name_with_keyword_arguments():
    backbone = get_model("SpineNet49S", activation="relu")
    assert isinstance(backbone, SpineNet) and n_params(backbone) == 9_089_215  # architecture.md §8
    detector = get_model("retinanet_spinenet49s", num_classes=80)
    assert isinstance(detector, RetinaNet) and n_params(detector) == 11_151_795
    assert n_params(get_model("retinanet_spinenet49s")) == 11_265_942  # 91 classes by default
    mask_rcnn = get_model("maskrcnn_spinenet49s", num_classes=4)
    assert isinstance(mask_rcnn, MaskRCNN) and mask_rcnn.roi_heads.box_predictor.cls_score.out_features == 4


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("spinenet50", ValueError, r"name must be one of \['spinenet49s'"),
        ("retinanet_spinenet", ValueError, "name must be one of"),
        ("resnet50", ValueError, "name must be one of"),
        (49, TypeError, "name must be a str"),
    ],
)
def test_unknown_names_are_refused(name, error, match):
    with pytest.raises(error, match=match):
        get_model(name)
