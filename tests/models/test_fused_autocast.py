"""bf16 autocast through the fused ops: activations in bf16, statistics fp32, error within the tolerance rule.

Gradients are judged on a merge without max-pools (a ↓2 and a ↑2 parent): a max-pool's gradient goes to its
window's argmax, and bf16 rounding moves near-tied argmaxes in eager and fused alike, but differently, so the
gradients of a merge with pools differ from fp32 by whatever the moved argmaxes carry — a different amount per
seed for eager and fused (seen: 7× the rule's bound, on the reference backend too). The ↓4 merge (conv + one
max-pool) is judged on its outputs, which are continuous in its inputs. Both over several seeds.

Seed 8 is a known failure of the fp32-maths backends (reference, and Triton under the interpreter, which runs bf16
dots in fp32): squeeze.bn.weight's gradient error is 2.7× eager's (bound 2×). The ``cuda`` backend, whose GEMMs
take bf16 operands as eager's and as Triton's on a GPU do, passes it. Left for the fused backward of issue 15.
"""

import pytest
import torch
from torch import nn

from spinenet_fast.models.layers import make_norm_factory
from spinenet_fast.models.resample import CrossScaleMerge, Resample
from spinenet_fast.ops import use_backend

from ..conftest import require_backend
from ..ops.tolerance import assert_low_precision_rule

SEEDS = (0, 3, 6, 8)


def make_merge(seed: int, down_levels: int) -> CrossScaleMerge:
    """A ↓2^down_levels parent (32 channels) and a ↑2 parent (24 channels) into 16 channels at level 5."""
    torch.manual_seed(seed)
    norm = make_norm_factory(nn.BatchNorm2d, 0.1, 1e-3)
    down = Resample(32, "bottleneck", 5 - down_levels, 16, 5, 0.5, norm, "swish", "torch")
    up = Resample(24, "residual", 6, 16, 5, 0.5, norm, "swish", "torch")
    merge = CrossScaleMerge([down, up], (0, 1), (), "swish", fused=True)
    for bn in merge.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    return merge.train()


def inputs(seed: int, down_levels: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    side = 4 << down_levels
    return [torch.randn(4, 32, side, side, generator=g), torch.randn(4, 24, 2, 2, generator=g)]


def run(module, feats, autocast: bool):
    leaves = [f.clone().requires_grad_() for f in feats]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [*leaves, *module.parameters()], grad.to(out.dtype))
    return out, grads


def fused_and_eager(seed: int, down_levels: int, backend):
    """``(fused bf16, eager bf16, eager fp32)`` outputs and gradients, the same weights and inputs."""
    feats = inputs(seed, down_levels)
    fused, eager32, eager16 = (make_merge(seed, down_levels) for _ in range(3))
    eager32.fused = eager16.fused = False
    reference = run(eager32, feats, autocast=False)
    eager = run(eager16, feats, autocast=True)
    with use_backend(backend):
        got = run(fused, feats, autocast=True)
    running = [m.running_var for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(r.dtype == torch.float32 for r in running)
    return got, eager, reference


# auto: Triton under the interpreter for every op that has Triton kernels, ATen for the max-pool.
BACKENDS = ["reference", pytest.param(None, id="auto"), "cuda"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_outputs_and_gradients_without_max_pools(request, backend, seed):
    require_backend(backend)
    if seed == 8 and backend != "cuda":
        reason = "known: fp32-maths backward exceeds the rule on seed 8 (module docstring; issue 15)"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    (out, grads), (eager_out, eager_grads), (reference, reference_grads) = fused_and_eager(seed, 1, backend)
    assert out.dtype == torch.bfloat16 and eager_out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[2:])  # parameter gradients stay fp32
    assert_low_precision_rule(out, reference, eager_out)
    for got, want, eager_grad in zip(grads, reference_grads, eager_grads):
        assert_low_precision_rule(got, want, eager_grad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_outputs_through_a_max_pool(backend, seed):
    require_backend(backend)
    (out, grads), (eager_out, _), (reference, _) = fused_and_eager(seed, 2, backend)
    assert_low_precision_rule(out, reference, eager_out)
    assert all(g.isfinite().all() for g in grads)
