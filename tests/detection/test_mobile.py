"""RetinaNet-SpineNet-Mobile: Model Garden's parameter counts, the separable head, sizes, training and inference."""

import pytest
import torch
from torch import nn

from spinenet_fast import SpineNetMobile
from spinenet_fast.detection import retinanet_spinenet_mobile
from spinenet_fast.detection.fused_head import fusable_head
from spinenet_fast.detection.head import SeparableConv2d

# Model Garden's own RetinaNet-SpineNet-Mobile (``retinanet_mobile_coco``, head as wide as the endpoints), 91 classes,
# trainable variables counted in TensorFlow; the paper gives Mobile-49's as 2.32 M.
OFFICIAL_PARAMS = {"49": 2_337_579, "49S": 1_030_653, "49XS": 872_711}
OFFICIAL_HEAD_PARAMS = {"49": 68_871, "49S": 54_975, "49XS": 30_255}


@pytest.mark.parametrize("model_id", list(OFFICIAL_PARAMS))
def test_parameter_counts_and_recipe(model_id):
    model = retinanet_spinenet_mobile(model_id)
    assert isinstance(model.backbone, SpineNetMobile)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[model_id]
    assert sum(p.numel() for p in model.head.parameters()) == OFFICIAL_HEAD_PARAMS[model_id]
    assert model.transform.min_size == ({"49XS": 256}.get(model_id, 384),)
    convs = [*model.head.class_tower.convs, model.head.class_predictor, model.head.box_predictor]
    assert len(model.head.class_tower.convs) == 4 and all(isinstance(c, SeparableConv2d) for c in convs)
    assert not fusable_head(model.head)  # separable convs run eagerly
    assert model.anchor_generator.num_anchors_per_location()[0] == 9


def test_trains_and_predicts():
    torch.manual_seed(0)
    model = retinanet_spinenet_mobile("49XS", 3, image_size=128).train()
    images = [torch.rand(3, 128, 100), torch.rand(3, 90, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.head.class_tower.convs[0][0].weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())  # swish, as the official recipe


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_id": "96"}, r"model_id must be one of \['49', '49S', '49XS'\], got '96'"),
        ({"image_size": 200}, "image_size must be a positive multiple of 128, got 200"),
        ({"anchor_style": "mg"}, "anchor_style must be one of"),
        ({"score_thresh": 2.0}, r"score_thresh must be a number in \[0, 1\]"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retinanet_spinenet_mobile(**kwargs)


def test_training_presets_name_the_mobile_models():
    """``--model mobile-49XS`` in the training CLI: the Mobile RetinaNet with its recipe's stochastic depth unless the
    run set one; Mask R-CNN is not offered on it."""
    from spinenet_fast.detection.presets import MODEL_NAMES, build_detector, detector_from_args

    assert {"mobile-49", "mobile-49S", "mobile-49XS"} <= set(MODEL_NAMES)
    args = {"model": "mobile-49XS", "image_size": 128, "activation": None, "bn_momentum": 0.1,
            "stochastic_depth_rate": None}  # fmt: skip
    model = detector_from_args(args, 3)
    assert isinstance(model.backbone, SpineNetMobile) and model.backbone.stochastic_depth_rate == 0.2
    assert detector_from_args({**args, "stochastic_depth_rate": 0.0}, 3).backbone.stochastic_depth_rate == 0.0
    with pytest.raises(ValueError, match="SpineNet-Mobile models are RetinaNets: --task box, got --task mask"):
        build_detector("mobile-49XS", 3, task="mask")
