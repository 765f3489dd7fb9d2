"""SpineNet's stem on the fused ops (``models.stem``): equal to the eager 7×7/s2 conv + BN + activation + max-pool —
output, every gradient, running statistics — in training and eval mode, in both padding modes, frozen BN included."""

import copy

import pytest
import torch
from torch import nn

from spinenet_fast.models import SpineNet
from spinenet_fast.models.stem import Stem
from spinenet_fast.ops import use_backend

from .twin_checks import (
    assert_autocast_twin_keeps_the_rule,
    assert_eager_paths,
    assert_float64_twin_matches,
    assert_twin_matches,
)


def twins(channels=8, activation="swish", padding="tf_same", dtype=torch.float32, norm=nn.BatchNorm2d):
    """An eager stem with non-trivial BN affine and running statistics, and its fused twin."""
    eager = Stem(channels, norm, activation, padding).to(dtype)
    with torch.no_grad():
        eager.conv.bn.weight.uniform_(0.5, 1.5)
        eager.conv.bn.bias.uniform_(-0.2, 0.2)
        eager.conv.bn.running_mean.normal_()
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def run(stem, x, grad):
    out = stem(x)
    return out, torch.autograd.grad(out, [x, *stem.parameters()], grad)


@pytest.mark.parametrize(("activation", "padding"), [("swish", "tf_same"), ("relu", "torch")])
def test_float64_fused_stem_equals_eager(activation, padding):
    """float64, reference backend, training then eval mode: the eager stem's maths to rounding."""
    eager, fused = twins(activation=activation, padding=padding, dtype=torch.float64)
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    assert_float64_twin_matches(fused, eager, run, x, grad)


def test_fused_backends_equal_eager(fused_backend):
    """fp32 on Triton (the interpreter here) and the extension: batch 1, a strided (non-contiguous) image."""
    eager, fused = twins()
    x = torch.randn(1, 3, 8, 24)[..., ::2].requires_grad_()
    grad = torch.randn(1, 8, 2, 3)
    want = run(eager, x, grad)
    with use_backend(fused_backend):
        got = run(fused, x, grad)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert_twin_matches(fused, eager, got, want, (1e-5, 1e-5), (1e-4, 1e-4), (1e-5, 1e-5))


def test_fused_stem_under_autocast_keeps_the_tolerance_rule(fused_backend):
    """bf16 autocast (fp32 parameters, an fp32 image): output and gradients against fp32 no worse than twice the
    eager stem's in bf16, plus 1e-2; the parameters' gradients stay fp32."""
    eager, fused = twins(16)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    assert_autocast_twin_keeps_the_rule(fused, eager, run, x, torch.randn(2, 16, 4, 4), fused_backend)


def test_frozen_bn_and_eager_paths():
    """A frozen BN (torchvision's) normalises with its statistics on the fused path too; ``"auto"`` on a CPU and an
    empty batch take the eager modules (the BN counter advances as eager's)."""
    assert_eager_paths(lambda norm: twins(norm=norm), torch.randn(2, 3, 8, 8))


def test_spinenet_stem_holds_the_fused_setting():
    """The backbone's stem is a ``Stem`` (the eager stem's state_dict keys) among its fusable modules, taking the
    model's ``fused`` setting."""
    model = SpineNet("49S", fused=True)
    assert isinstance(model.stem, Stem) and model.stem.fused is True
    assert any(model.stem is m for m in model.fusable_modules())
    assert {"stem.conv.conv.weight", "stem.conv.bn.running_var"} <= set(model.state_dict())
