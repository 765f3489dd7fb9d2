"""bf16 autocast through the fused ops: activations in bf16, statistics fp32, error within the tolerance rule."""

import pytest
import torch
from torch import nn

from spinenet_fast.ops import use_backend

from ..conftest import require_backend
from ..ops.tolerance import assert_low_precision_rule
from .test_fused_sync_bn import global_batch, make_merge


def run(module, feats, autocast: bool):
    leaves = [f.clone().requires_grad_() for f in feats]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [*leaves, *module.parameters()], grad.to(out.dtype))
    return out, grads


# auto: Triton under the interpreter for every op that has Triton kernels, ATen for the max-pool.
@pytest.mark.parametrize("backend", [pytest.param(None, id="auto"), "cuda"])
def test_bf16_autocast_through_the_fused_merge(backend):
    require_backend(backend)
    feats = global_batch()
    fused, eager32, eager16 = (make_merge(nn.BatchNorm2d) for _ in range(3))
    eager32.fused = eager16.fused = False
    reference, reference_grads = run(eager32, feats, autocast=False)
    eager_out, eager_grads = run(eager16, feats, autocast=True)
    with use_backend(backend):
        out, grads = run(fused, feats, autocast=True)
    assert out.dtype == torch.bfloat16 and eager_out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[len(feats) :])  # parameter gradients stay fp32
    assert_low_precision_rule(out, reference, eager_out)
    for got, want, eager_grad in zip(grads, reference_grads, eager_grads):
        assert_low_precision_rule(got, want, eager_grad)
    running = [m.running_var for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(r.dtype == torch.float32 for r in running)
