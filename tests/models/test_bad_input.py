"""Bad arguments and inputs raise ValueError/TypeError naming the argument, the expectation and the value."""

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from spinenet_fast import SpineNet
from spinenet_fast.models import SpineNetMobile
from spinenet_fast.ops import use_backend


@pytest.fixture(scope="module")
def model():
    return SpineNet("49S").eval()


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 100, 128), r"H=100 must be a positive multiple of 128.*pad it to 128"),
        ((1, 3, 128, 200), r"W=200 must be a positive multiple of 128.*pad it to 256"),
        ((1, 3, 0, 0), r"H=0 must be a positive multiple of 128.*pad it to 128"),
        ((1, 1, 128, 128), r"x must have 3 channels.*got 1"),
        ((3, 128, 128), r"x must be 4-D.*got shape \(3, 128, 128\)"),
    ],
)
def test_bad_image_shapes(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))


def test_bad_image_types(model):
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        model([[0.0]])
    with pytest.raises(TypeError, match=r"floating-point.*uint8"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"x must have the model's dtype torch\.float32 .*got torch\.float64"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be on the model's device cpu, got meta"):
        model(torch.zeros(1, 3, 128, 128, device="meta"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_id": "50"}, ValueError, r"model_id must be one of \['49S', '49', '96', '143', '143L', '190'\].*'50'"),
        ({"model_id": 49}, TypeError, "model_id must be a str or a scaling dict, got int"),
        ({"model_id": {"filter_size_scale": 1.0}}, ValueError, "model_id as a dict must have exactly the keys"),
        ({"activation": "gelu"}, ValueError, r"activation must be one of \['relu', 'swish'\], got 'gelu'"),
        ({"padding": "same"}, ValueError, r"padding must be one of \['tf_same', 'torch'\], got 'same'"),
        ({"fused": "yes"}, ValueError, "fused must be True, False or 'auto', got 'yes'"),
        ({"min_level": 2}, ValueError, "min_level.*got min_level=2"),
        ({"max_level": 3.0}, TypeError, "max_level must be an int, got float"),
        ({"stochastic_depth_rate": 1.5}, ValueError, "stochastic_depth_rate must be None or a number in"),
        (
            {
                "model_id": {
                    "filter_size_scale": float("inf"),
                    "resample_alpha": 0.5,
                    "block_repeats": 1,
                    "endpoints_num_filters": 48,
                }
            },
            ValueError,
            "must be a finite positive number, got inf",
        ),
        ({"bn_momentum": 5}, ValueError, r"bn_momentum must be a number in \(0, 1\]"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpineNet(**kwargs)


@pytest.mark.parametrize("fused", [False, True])
def test_training_on_one_value_per_channel_says_so(fused):
    """One 128 px image leaves 1×1 at level 7: a training-mode BN there has one value per channel. Eager's
    nn.BatchNorm2d and the fused ops both refuse it, saying so (the fused ops: which map, which shape)."""
    model = SpineNet("49S", fused=fused).train()
    match = "more than 1 value per channel" + (r".*got 1 \(N·H·W of the conv's output, for x of shape" if fused else "")
    with use_backend("reference"), pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, 128, 128))
    with use_backend("reference"):
        model(torch.randn(1, 3, 128, 256))  # two values per channel at level 7


@pytest.mark.parametrize("cls", [SpineNet, SpineNetMobile])
def test_norm_layers_the_fused_ops_cannot_run(cls):
    """A norm layer that is no BatchNorm (GroupNorm here): fused=True says so, "auto" runs eagerly (the eager
    model's numbers), False is untouched; FrozenBatchNorm2d is an affine map the fused ops run."""
    group_norm = lambda channels: nn.GroupNorm(1, channels)  # noqa: E731
    with pytest.raises(ValueError, match=r"fused=True needs BatchNorm-type norm layers .* makes GroupNorm"):
        cls("49S", norm_layer=group_norm, fused=True)
    torch.manual_seed(0)
    auto = cls("49S", norm_layer=group_norm, fused="auto", stochastic_depth_rate=0.0).train()
    assert auto.fused is False and not any(m.uses_fused_ops() for m in auto.fusable_modules())
    eager = cls("49S", norm_layer=group_norm, fused=False, stochastic_depth_rate=0.0).train()
    eager.load_state_dict(auto.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with use_backend("reference"):  # (eager: no fused op runs)
        for name, value in auto(x).items():
            torch.testing.assert_close(value, eager(x)[name])
    assert cls("49S", norm_layer=FrozenBatchNorm2d, fused=True).fused is True
