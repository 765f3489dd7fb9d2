"""``spinenet_fast.models.get_model``: every listed name builds the model its name says."""

import pytest
from torchvision.models.detection import MaskRCNN, RetinaNet

from spinenet_fast import SpineNet
from spinenet_fast.models import SpineNetMobile, get_model, list_models


def test_names():
    names = list_models()
    assert names[:6] == ["spinenet49s", "spinenet49", "spinenet96", "spinenet143", "spinenet143l", "spinenet190"]
    assert names[6:12] == [f"retinanet_{name}" for name in names[:6]]
    assert names[12:18] == [f"maskrcnn_{name}" for name in names[:6]]
    assert names[18:24] == [f"{name}_cls" for name in names[:6]]
    mobile = ["spinenet_mobile49", "spinenet_mobile49s", "spinenet_mobile49xs"]
    assert names[24:] == mobile + [f"retinanet_{name}" for name in mobile]


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


def test_mobile_models_by_name():
    """Model Garden's parameter counts (test_spinenet_mobile, test_mobile); torchvision's registry builds the
    RetinaNets too."""
    import torchvision

    backbone = get_model("spinenet_mobile49XS", fused=False)
    assert isinstance(backbone, SpineNetMobile) and n_params(backbone) == 842_456 and backbone.fused is False
    assert n_params(get_model("retinanet_spinenet_mobile49")) == 2_337_579
    detector = torchvision.models.get_model("retinanet_spinenet_mobile49s", weights=None, num_classes=3)
    assert isinstance(detector, RetinaNet) and isinstance(detector.backbone, SpineNetMobile)
    assert detector.backbone.model_id == "49S"


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
