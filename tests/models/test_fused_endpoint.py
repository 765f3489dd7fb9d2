"""A backbone endpoint on the fused ops (``models.endpoint``): equal to the eager 1×1 conv + BN + activation — output,
every gradient, running statistics — in training and eval mode, frozen BN included."""

import copy

import pytest
import torch
from torch import nn

from spinenet_fast.models import SpineNet
from spinenet_fast.models.endpoint import Endpoint
from spinenet_fast.ops import use_backend

from .twin_checks import (
    assert_autocast_twin_keeps_the_rule,
    assert_eager_paths,
    assert_float64_twin_matches,
    assert_twin_matches,
)


def twins(in_channels=12, out_channels=8, activation="swish", dtype=torch.float32, norm=nn.BatchNorm2d):
    """An eager endpoint with non-trivial BN affine and running statistics, and its fused twin."""
    eager = Endpoint(in_channels, out_channels, norm, activation).to(dtype)
    with torch.no_grad():
        eager.bn.weight.uniform_(0.5, 1.5)
        eager.bn.bias.uniform_(-0.2, 0.2)
        eager.bn.running_mean.normal_()
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def run(endpoint, x, grad):
    out = endpoint(x)
    return out, torch.autograd.grad(out, [x, *endpoint.parameters()], grad)


@pytest.mark.parametrize("activation", ["swish", "relu"])
def test_float64_fused_endpoint_equals_eager(activation):
    """float64, reference backend, training then eval mode: the eager layer's maths to rounding (odd sizes)."""
    eager, fused = twins(activation=activation, dtype=torch.float64)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    assert_float64_twin_matches(fused, eager, run, x, grad)


def test_fused_backends_equal_eager(fused_backend):
    """fp32 on Triton (the interpreter here) and the extension: batch 1, a channel-strided (non-contiguous) input."""
    eager, fused = twins()
    x = torch.randn(1, 24, 6, 6)[:, ::2].requires_grad_()
    grad = torch.randn(1, 8, 6, 6)
    want = run(eager, x, grad)
    with use_backend(fused_backend):
        got = run(fused, x, grad)
    assert_twin_matches(fused, eager, got, want, (1e-5, 1e-5), (1e-4, 1e-4), (1e-5, 1e-5))


def test_fused_endpoint_under_autocast_keeps_the_tolerance_rule(fused_backend):
    """bf16 autocast (fp32 parameters): output and gradients against fp32 no worse than twice the eager layer's in
    bf16, plus 1e-2; the parameters' gradients stay fp32."""
    torch.manual_seed(0)
    eager, fused = twins(48, 16)
    x = torch.randn(4, 48, 6, 6, requires_grad=True)
    assert_autocast_twin_keeps_the_rule(fused, eager, run, x, torch.randn(4, 16, 6, 6), fused_backend)


def test_frozen_bn_and_eager_paths():
    """A frozen BN (torchvision's) normalises with its statistics on the fused path too; ``"auto"`` on a CPU and an
    empty batch take the eager modules (the BN counter advances as eager's)."""
    assert_eager_paths(lambda norm: twins(norm=norm), torch.randn(2, 12, 4, 4))


def test_spinenet_endpoints_hold_the_fused_setting():
    """The backbone's endpoints are ``Endpoint`` layers (a ``ConvNorm``'s state_dict keys) among its fusable
    modules, taking the model's ``fused`` setting."""
    model = SpineNet("49S", fused=True)
    endpoints = list(model.endpoints.values())
    assert all(isinstance(e, Endpoint) and e.fused is True for e in endpoints)
    assert all(any(e is m for m in model.fusable_modules()) for e in endpoints)
    assert "endpoints.p3.conv.weight" in model.state_dict() and "endpoints.p3.bn.running_var" in model.state_dict()
