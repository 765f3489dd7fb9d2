"""``SpineNetClassifier``: the official classification head (TPU repo ``ClassificationHead``, aggregation 'all'),
the official parameter counts, the builders (torchvision-style, ``get_model``, timm) and the fused path."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from spinenet_fast.detection.presets import CUSTOM_SCALINGS
from spinenet_fast.models import SpineNet, SpineNetClassifier, get_model, list_models
from spinenet_fast.models.classifier import CLASSIFICATION_DEFAULTS, aggregate_levels
from spinenet_fast.ops import use_backend

from ..conftest import require_optional

SMALL = CUSTOM_SCALINGS["49XS-custom"]

# TPU repo MODEL_ZOO.md (models/official/detection): parameters in millions of the ImageNet models (1001 classes,
# background included) and of the iNaturalist-2017 ones (5089 classes + background).
OFFICIAL_PARAMS_M = {("49", 1001): 22.1, ("96", 1001): 36.5, ("143", 1001): 60.5, ("190", 1001): 127.1,
                     ("49", 5090): 23.1, ("96", 5090): 37.6, ("143", 5090): 61.6}  # fmt: skip


@pytest.mark.parametrize(("model_id", "num_classes"), list(OFFICIAL_PARAMS_M))
def test_parameter_counts_equal_the_official_models(model_id, num_classes):
    with torch.device("meta"):
        model = SpineNetClassifier(model_id, num_classes, fused=False)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == OFFICIAL_PARAMS_M[model_id, num_classes]
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert count == backbone + (model.num_features + 1) * num_classes  # the dense layer is the whole head


def test_defaults_are_the_official_recipe():
    model = SpineNetClassifier(SMALL, 10)
    bn = model.backbone.stem.conv.bn
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    assert model.backbone.activation == "swish" and model.backbone.stochastic_depth_rate == 0.2
    assert model.num_features == model.backbone.out_channels and model.embedding is None
    assert model.fc.bias.abs().sum() == 0 and 0.005 < model.fc.weight.std().item() < 0.015
    assert CLASSIFICATION_DEFAULTS["label_smoothing"] == 0.1


@pytest.mark.parametrize(("aggregation", "embedding"), [("all", 0), ("all", 24), ("top", 0), ("top", 24)])
def test_head_is_the_official_aggregation(aggregation, embedding):
    """logits = fc(GAP(embedding(aggregate(P3…P7)))): the top-down nearest resize-and-add divided by the level count
    ('all') or P7 alone ('top'), written out here in eager ops, equal to the classifier's."""
    torch.manual_seed(0)
    model = SpineNetClassifier(SMALL, 5, aggregation=aggregation, endpoints_num_filters=embedding, fused=False).eval()
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        levels = list(model.backbone(x).values())
        assert len(levels) == (5 if aggregation == "all" else 1)
        total = levels[-1]
        for level in reversed(levels[:-1]):
            total = nn.functional.interpolate(total, scale_factor=2, mode="nearest") + level
        total = total / len(levels)
        torch.testing.assert_close(aggregate_levels(levels), total)
        if embedding:
            total = model.embedding(total)
        want = model.fc(total.mean((2, 3)))
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert model.num_features == (embedding or model.backbone.out_channels)


def test_fused_classifier_trains_as_the_eager_one_in_float64():
    """The classifier's fused backbone (reference backend, float64): the logits, every gradient and the BN running
    statistics of one training step (stochastic depth included) equal the eager model's."""
    torch.manual_seed(0)
    eager = SpineNetClassifier(SMALL, 4, dropout_rate=0.0, fused=False).double()
    fused = copy.deepcopy(eager)
    for module in fused.modules():
        if hasattr(module, "fused"):
            module.fused = True
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    target = torch.tensor([1, 3])
    results = []
    for model, backend in ((eager, "reference"), (fused, "reference")):
        torch.manual_seed(2)
        with use_backend(backend):
            logits = model.train()(x)
            loss = nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((logits, grads, [b.clone() for b in model.buffers()]))
    (want, want_grads, want_buffers), (got, got_grads, got_buffers) = results
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    for a, b in zip(got_buffers, want_buffers, strict=True):
        torch.testing.assert_close(a, b)


def test_builders():
    assert "spinenet49_cls" in list_models() and "spinenet190_cls" in list_models()
    with torch.device("meta"):  # settings only
        model = get_model("spinenet49S_cls", num_classes=3, dropout_rate=0.2)
        assert isinstance(model, SpineNetClassifier) and model.num_classes == 3 and model.dropout.p == 0.2
        model = torchvision.models.get_model("spinenet49s_cls", weights=None, num_classes=6)
        assert isinstance(model, SpineNetClassifier) and model.num_classes == 6
        assert isinstance(model.backbone, SpineNet) and model.backbone.model_id == "49S"
    with pytest.raises(ValueError, match="no pretrained weights ship with spinenet-fast"):
        torchvision.models.get_model("spinenet49s_cls", weights="IMAGENET1K_V1")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes must be a positive int, got 0"),
        ({"aggregation": "mean"}, r"aggregation must be one of \('all', 'top'\), got 'mean'"),
        ({"endpoints_num_filters": -1}, "endpoints_num_filters must be an int ≥ 0, got -1"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpineNetClassifier(**{"model_id": "49S", **kwargs})


def test_timm_classifier():
    """``timm.create_model("spinenet49s_cls", ...)`` with timm's classifier keywords, its data config and
    ``reset_classifier`` (what timm's train.py and validate.py use)."""
    timm = require_optional("timm")
    from timm.data import resolve_data_config

    from spinenet_fast.integrations.timm import register

    register()
    model = timm.create_model("spinenet49s_cls", num_classes=10, drop_rate=0.1, drop_path_rate=0.05)
    assert isinstance(model, SpineNetClassifier)
    assert (model.num_classes, model.dropout.p, model.backbone.stochastic_depth_rate) == (10, 0.1, 0.05)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 256, 256) and config["crop_pct"] == 1.0
    model.reset_classifier(4)
    assert model.get_classifier().out_features == 4
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 4)
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        timm.create_model("spinenet49s_cls", global_pool="max")
    with pytest.raises(ValueError, match="in_chans must be 3"):
        timm.create_model("spinenet49s_cls", in_chans=1)
