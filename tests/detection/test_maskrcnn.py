"""The Mask R-CNN-SpineNet builder: a torchvision MaskRCNN with the official parts, parameter counts and checks."""

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

from spinenet_fast.detection import maskrcnn_spinenet
from spinenet_fast.detection.presets import CUSTOM_SCALINGS

# Model Garden's own Mask R-CNN (``factory.build_maskrcnn``, config ``maskrcnn_spinenet_coco`` with the TPU repo's
# per-model head widths), trainable variables counted in TensorFlow; the TPU MODEL_ZOO rounds 49 / 96 / 143 to
# 40.8 / 55.2 / 79.2 M.
OFFICIAL_PARAMS = {"49S": 13_946_608, "49": 40_753_521, "96": 55_185_009, "143": 79_169_649}
# SpineNet-49's heads in Model Garden: RPN, detection head (incl. predictors), mask head (incl. predictor).
OFFICIAL_HEAD_PARAMS = {"rpn": 596_495, "box": 15_676_871, "mask": 2_648_667}


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_id", list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_model_gardens(model_id):
    with torch.device("meta"):
        model = maskrcnn_spinenet(model_id)
    assert isinstance(model, MaskRCNN) and trainable(model) == OFFICIAL_PARAMS[model_id]


def test_head_parameter_counts_and_recipe():
    with torch.device("meta"):
        model = maskrcnn_spinenet("49")
    heads = model.roi_heads
    assert trainable(model.rpn.head) == OFFICIAL_HEAD_PARAMS["rpn"]
    assert trainable(heads.box_head) + trainable(heads.box_predictor) == OFFICIAL_HEAD_PARAMS["box"]
    assert trainable(heads.mask_head) + trainable(heads.mask_predictor) == OFFICIAL_HEAD_PARAMS["mask"]
    assert model.transform.min_size == (640,) and model.transform.max_size == 640
    assert model.transform.size_divisible == 128
    assert [s for (s,) in model.rpn.anchor_generator.sizes] == [24, 48, 96, 192, 384]
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    assert (heads.box_roi_pool.output_size, heads.mask_roi_pool.output_size) == ((7, 7), (14, 14))
    assert heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio == 1
    assert heads.box_roi_pool.featmap_names == ["p3", "p4", "p5", "p6", "p7"]
    assert (model.rpn._pre_nms_top_n, model.rpn._post_nms_top_n) == (
        {"training": 2000, "testing": 1000},
        {"training": 1000, "testing": 1000},
    )
    assert (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())  # ReLU throughout, as the official configs
    assert model.backbone.stochastic_depth_rate == 0.0
    assert maskrcnn_spinenet("96", image_size=None).transform.min_size == (1024,)


@pytest.fixture(scope="module")
def small_maskrcnn():
    torch.manual_seed(0)
    return maskrcnn_spinenet(CUSTOM_SCALINGS["49XS-custom"], 3, image_size=128)


def _targets(images):
    targets = []
    for image in images:
        masks = torch.zeros(2, *image.shape[-2:], dtype=torch.uint8)
        masks[0, 10:60, 20:70] = 1
        masks[1, 50:90, 30:100] = 1
        targets.append({"boxes": torch.tensor([[20.0, 10.0, 70.0, 60.0], [30.0, 50.0, 100.0, 90.0]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})  # fmt: skip
    return targets


def test_trains_and_predicts_masks(small_maskrcnn):
    model = small_maskrcnn.train()
    images = [torch.rand(3, 128, 112), torch.rand(3, 100, 128)]
    losses = model(images, _targets(images))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.stem.conv.conv.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_logits.weight.grad.abs().sum() > 0
    model.eval()
    model.roi_heads.score_thresh = 0.0  # an untrained model's scores are low: keep every detection
    with torch.no_grad():
        predictions = model(images)
    for image, prediction in zip(images, predictions):
        k = len(prediction["boxes"])
        assert k > 0 and prediction["masks"].shape == (k, 1, *image.shape[-2:])
    model.roi_heads.score_thresh = 0.05


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda t: t.pop("masks"),
            TypeError,
            r"\['masks'\] must be a real tensor of shape \(2, 128, 112\), got NoneType",
        ),
        (lambda t: t.update(masks=t["masks"][:1]), TypeError, r"targets\[0\]\['masks'\] must be .*got"),
        (lambda t: t.update(labels=torch.tensor([1, 3])), ValueError, r"labels'\] must be class indices in \[0, 3\)"),
    ],
)
def test_bad_targets(small_maskrcnn, change, error, match):
    images = [torch.rand(3, 128, 112)]
    targets = _targets(images)
    change(targets[0])
    with pytest.raises(error, match=match):
        small_maskrcnn.train()(images, targets)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 200}, "image_size must be a positive multiple of 128, got 200"),
        ({"num_classes": 1}, r"num_classes must be an int >= 2 \(background included\), got 1"),
        ({"fc_dims": 0}, "fc_dims must be an int >= 1, got 0"),
        ({"rpn_num_convs": 0}, "rpn_num_convs must be an int >= 1, got 0"),
        ({"box_nms_thresh": 2.0}, r"nms_thresh must be a number in \[0, 1\], got 2.0"),
        ({"activation": "gelu"}, "activation must be one of"),
    ],
)
def test_unusable_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        maskrcnn_spinenet(CUSTOM_SCALINGS["49XS-custom"], **{"num_classes": 3, **kwargs})
