"""Padding modes on tiny hand-computed cases, activations and norm factories."""

import pytest
import torch
from torch import nn

from spinenet_fast.models.layers import ConvNorm, MaxPool3x3s2, make_norm_factory
from spinenet_fast.ops.padding import same_padding

GRID = torch.arange(16.0).reshape(1, 1, 4, 4)


def test_same_padding_matches_tf_formula():
    # TF: total = max((ceil(n/s) - 1)·s + k - n, 0), odd pixel after; n = 8 here.
    for kernel_size, stride in [(7, 2), (3, 2), (3, 1), (1, 1), (1, 2)]:
        n = 8
        total = max((-(-n // stride) - 1) * stride + kernel_size - n, 0)
        assert same_padding(kernel_size, stride) == (total // 2, total - total // 2)
    assert same_padding(7, 2) == (2, 3)
    assert same_padding(3, 2) == (0, 1)


def conv3x3s2_of_ones(padding: str) -> torch.Tensor:
    layer = ConvNorm(1, 1, 3, nn.Identity, stride=2, padding=padding)
    nn.init.ones_(layer.conv.weight)
    return layer(GRID)[0, 0]


def test_conv3x3s2_padding_by_hand():
    # tf_same pads (0, 1): window rows/cols 2i..2i+2;  torch pads (1, 1): window 2i-1..2i+1.
    torch.testing.assert_close(conv3x3s2_of_ones("tf_same"), torch.tensor([[45.0, 39.0], [66.0, 50.0]]))
    torch.testing.assert_close(conv3x3s2_of_ones("torch"), torch.tensor([[10.0, 24.0], [51.0, 90.0]]))


def test_maxpool_padding_by_hand_pads_with_minus_inf():
    negative = -(GRID + 1)
    torch.testing.assert_close(MaxPool3x3s2("tf_same")(negative)[0, 0], torch.tensor([[-1.0, -3.0], [-9.0, -11.0]]))
    torch.testing.assert_close(MaxPool3x3s2("torch")(GRID)[0, 0], torch.tensor([[5.0, 7.0], [13.0, 15.0]]))


def test_stem_conv_tf_same_pads_two_then_three():
    layer = ConvNorm(3, 4, 7, nn.BatchNorm2d, stride=2, padding="tf_same")
    assert layer.pad == (2, 3, 2, 3) and layer.conv.padding == (0, 0)
    assert layer(torch.randn(1, 3, 16, 16)).shape == (1, 4, 8, 8)
    assert ConvNorm(3, 4, 7, nn.BatchNorm2d, stride=2).conv.padding == (3, 3)


def test_norm_factory_rejects_non_callable():
    with pytest.raises(TypeError, match="norm_layer"):
        make_norm_factory("batchnorm", 0.01, 1e-3)


@pytest.mark.parametrize(
    ("name", "value", "match"), [("activation", "gelu", "activation"), ("padding", "same", "padding")]
)
def test_unknown_choices(name, value, match):
    with pytest.raises(ValueError, match=match):
        ConvNorm(1, 1, 3, nn.Identity, **{name: value})
