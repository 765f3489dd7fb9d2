"""The fused endpoint (``conv1x1_bn`` + a one-parent ``merge``) against its eager ``ConvNorm`` path."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from spinenet_fast.models.endpoint import Endpoint
from spinenet_fast.models.layers import make_norm_factory
from spinenet_fast.ops import use_backend

from ..conftest import require_backend


def twins(norm_layer=None, dtype=torch.float64):
    torch.manual_seed(0)
    eager = Endpoint(24, 16, make_norm_factory(norm_layer, 0.1, 1e-3), activation="swish", padding="torch").to(dtype)
    if isinstance(eager.bn, nn.BatchNorm2d):
        nn.init.uniform_(eager.bn.weight, 0.5, 1.5)
        nn.init.uniform_(eager.bn.bias, -0.2, 0.2)
        nn.init.normal_(eager.bn.running_mean)
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def step(model, x, grad):
    out = model(x)
    return out, torch.autograd.grad(out, [x, *model.parameters()], grad)


@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_fused_endpoint_equals_eager(backend):
    """Training (output, input and parameter gradients, running statistics, counter) and eval, in float64 on the
    reference and extension backends (fp32 on Triton's interpreter)."""
    require_backend(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    eager, fused = twins(dtype=dtype)
    x = torch.randn(2, 24, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16, 5, 7, dtype=dtype)
    assert fused.uses_fused_ops() and not eager.uses_fused_ops()
    with use_backend(backend):
        for mode in (True, False):
            got, got_grads = step(fused.train(mode), x, grad)
            want, want_grads = step(eager.train(mode), x, grad)
            torch.testing.assert_close(got, want, **tolerance)
            for a, b in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(a, b, **tolerance)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(fused.bn, name), getattr(eager.bn, name), **tolerance)


def test_frozen_norm_and_empty_batch_run_eagerly():
    _, fused = twins(FrozenBatchNorm2d)
    assert not fused.uses_fused_ops()
    _, fused = twins()
    assert fused(torch.zeros(0, 24, 4, 4, dtype=torch.float64)).shape == (0, 16, 4, 4)
    assert fused.bn.num_batches_tracked == 1  # advanced as nn.BatchNorm2d does, by the eager path
