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


def test_a_subset_of_endpoints_trains_every_parameter_it_keeps(timm):
    """``out_indices`` a subset: the endpoints and blocks no picked endpoint reads are dropped, so every remaining
    parameter gets a gradient (DDP needs no ``find_unused_parameters``); outputs equal the full model's."""
    full = timm.create_model("spinenet49s", features_only=True).eval()
    model = timm.create_model("spinenet49s", features_only=True, out_indices=(0, 2)).eval()
    assert set(model.body.endpoints) == {"p3", "p5"}
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    model.body.load_state_dict({k: v for k, v in full.body.state_dict().items() if k in model.body.state_dict()})
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        for got, want in zip(model(x), [full(x)[i] for i in (0, 2)]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    sum(f.sum() for f in model.train()(x)).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features_only": True, "out_indices": (5,)}, r"out_indices must be .* got \(5,\)"),
        ({"features_only": True, "out_indices": ()}, "out_indices must be a non-empty tuple"),
        ({"in_chans": 1}, "in_chans must be 3, got 1"),
    ],
)
def test_bad_timm_arguments(timm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("spinenet49s", **kwargs)
