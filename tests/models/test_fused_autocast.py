"""bf16 autocast through the fused ops: activations in bf16, statistics fp32, error within the tolerance rule.

Gradients are judged on a merge without max-pools (a ↓2 and a ↑2 parent): a max-pool's gradient goes to its
window's argmax, and bf16 rounding moves near-tied argmaxes in eager and fused alike, but differently, so the
gradients of a merge with pools differ from fp32 by whatever the moved argmaxes carry — a different amount per
seed for eager and fused (seen: 7× the rule's bound, on the reference backend too). The ↓4 merge (conv + one
max-pool) is judged on its outputs, which are continuous in its inputs. Both over several seeds, with weights drawn
the same way on every torch version (torch 2.11's module initialisation drew other weights from the same seed, and
one of those broke the rule: the cause was the fused path's rounding, since fixed, not the Triton version).

The squeezes are 16 channels wide: the rule compares maximum errors, and over a 4-channel BN vector (the first
version of this test) that maximum is chance — on an AVX2 CPU one seed in 16 put a 4-vector where eager happened to
be accurate 5% past the bound, while every other tensor of that seed was more accurate fused than eager. With 16
channels, the largest ratio over 16 seeds (reference backend, AVX2) is 0.80 of the bound (seed 11, a squeeze BN's γ).
"""

import pytest
import torch
from torch import nn

from spinenet_fast.models.layers import make_norm_factory
from spinenet_fast.models.resample import CrossScaleMerge, Resample
from spinenet_fast.ops import use_backend

from ..conftest import require_backend
from ..ops.tolerance import assert_low_precision_rule

SEEDS = (0, 8, 11, 12)  # 11: the seed closest to the rule's bound (0.80 of it)
DOWN_CHANNELS, UP_CHANNELS = 128, 32  # bottleneck / 4 · α 0.5 and residual · α 0.5: both squeezes 16 wide


def make_merge(seed: int, down_levels: int) -> CrossScaleMerge:
    """A ↓2^down_levels bottleneck parent (128 channels) and a ↑2 residual parent (32) into 16 channels at level 5, with
    weights drawn from a generator (the same on every torch version): convs N(0, 1/fan_in), BN γ ∈ [0.5, 1.5],
    β ∈ [-0.2, 0.2]."""
    norm = make_norm_factory(nn.BatchNorm2d, 0.1, 1e-3)
    down = Resample(DOWN_CHANNELS, "bottleneck", 5 - down_levels, 16, 5, 0.5, norm, "swish", "torch")
    up = Resample(UP_CHANNELS, "residual", 6, 16, 5, 0.5, norm, "swish", "torch")
    merge = CrossScaleMerge([down, up], (0, 1), (), "swish", fused=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in merge.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0, module.weight[0].numel() ** -0.5, generator=g)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.uniform_(-0.2, 0.2, generator=g)
    return merge.train()


def inputs(seed: int, down_levels: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    side = 4 << down_levels
    return [torch.randn(4, DOWN_CHANNELS, side, side, generator=g), torch.randn(4, UP_CHANNELS, 2, 2, generator=g)]


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
def test_bf16_autocast_outputs_and_gradients_without_max_pools(backend, seed):
    require_backend(backend)
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
