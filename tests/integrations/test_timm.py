"""timm: after ``register()``, ``timm.create_model("spinenet49", features_only=True)`` is our backbone with a
timm ``FeatureInfo``, and its features equal the SpineNet's own."""

import pytest
import torch

from spinenet_fast import SpineNet
from spinenet_fast.integrations.timm import SpineNetFeatures, register

from ..conftest import require_optional


@pytest.fixture(scope="module")
def timm():
    timm = require_optional("timm")
    names = register()
    assert register() == names  # idempotent
    return timm


def test_features_only_model(timm):
    assert {"spinenet49s", "spinenet49", "spinenet190"} <= set(timm.list_models("spinenet*"))
    model = timm.create_model("spinenet49s", features_only=True).eval()
    assert isinstance(model, SpineNetFeatures) and isinstance(model.body, SpineNet)
    assert model.feature_info.channels() == [128] * 5
    assert model.feature_info.reduction() == [8, 16, 32, 64, 128]
    assert model.feature_info.module_name() == [f"endpoints.p{level}" for level in range(3, 8)]
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        features = model(x)
        reference = list(model.body(x).values())
    assert [f.shape[-2:] for f in features] == [(128 // s, 256 // s) for s in (8, 16, 32, 64, 128)]
    for actual, expected in zip(features, reference):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_out_indices_kwargs_and_plain_model(timm):
    model = timm.create_model("spinenet49", features_only=True, out_indices=(1, 3), drop_path_rate=0.1)
    assert model.feature_info.channels() == [256, 256] and model.feature_info.reduction() == [16, 64]
    assert model.body.stochastic_depth_rate == 0.1
    with torch.no_grad():
        assert [f.shape for f in model.eval()(torch.randn(1, 3, 128, 128))] == [(1, 256, 8, 8), (1, 256, 2, 2)]
    plain = timm.create_model("spinenet96", activation="relu")
    assert isinstance(plain, SpineNet) and plain.scaling.block_repeats == 2 and plain.activation == "relu"
    assert plain.pretrained_cfg["input_size"] == (3, 1024, 1024)
    with pytest.raises(ValueError, match="spinenet49 has no pretrained timm weights"):
        timm.create_model("spinenet49", pretrained=True)
