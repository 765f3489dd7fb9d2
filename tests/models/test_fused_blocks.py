"""Block groups on the fused ops (``fused_block``): equal to the eager blocks — output, every gradient, running
statistics — with identity and projection shortcuts, with and without stochastic depth, in training and eval mode."""

import copy

import pytest
import torch
from torch import nn

from spinenet_fast.models.blocks import BlockGroup
from spinenet_fast.ops import use_backend

from ..ops.tolerance import assert_low_precision_rule
from .twin_checks import assert_float64_twin_matches, assert_twin_matches

# (block type, input channels, filters): the first block projects its shortcut where the widths differ.
GROUPS = [("bottleneck", 12, 4), ("bottleneck", 16, 4), ("residual", 6, 8), ("residual", 8, 8)]


def twin_groups(block_type, in_channels, filters, drop_rate, dtype=torch.float32):
    """An eager group of two blocks with non-trivial BN affines and running statistics, and its fused twin."""
    eager = BlockGroup(block_type, in_channels, filters, 2, nn.BatchNorm2d, "swish", "torch", drop_rate).to(dtype)
    for bn in eager.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
            nn.init.normal_(bn.running_mean)
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def run(group, x, grad, seed=2):
    """Output and the gradients of x and every parameter; the stochastic depth draws from ``seed`` (2: of the two
    blocks' draws at batch 1 or 2, some drop a sample and some keep one — ``test_the_seed_drops_and_keeps``)."""
    torch.manual_seed(seed)
    out = group(x)
    return out, torch.autograd.grad(out, [x, *group.parameters()], grad)


@pytest.mark.parametrize(("batch", "dtype"), [(1, torch.float32), (2, torch.float64), (2, torch.float32)])
def test_the_seed_drops_and_keeps(batch, dtype):
    """The stochastic-depth tests below see a dropped and a kept sample: the draws two eager blocks make from
    ``run``'s seed at the tests' batch sizes and dtypes."""
    eager = BlockGroup("residual", 8, 8, 2, nn.BatchNorm2d, "swish", "torch", 0.3).to(dtype)
    x = torch.randn(batch, 8, 3, 3, dtype=dtype)
    kept = []
    hooks = [b.drop_path.register_forward_hook(lambda m, i, o: kept.append((o != 0).flatten(1).any(1))) for b in eager]
    run(eager, x.requires_grad_(), torch.ones(batch, 8, 3, 3, dtype=dtype))
    for hook in hooks:
        hook.remove()
    kept = torch.cat(kept)
    assert kept.any() and not kept.all(), kept


@pytest.mark.parametrize(("block_type", "in_channels", "filters"), GROUPS)
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_float64_fused_blocks_equal_eager(block_type, in_channels, filters, drop_rate):
    """float64, reference backend: the fused blocks are the eager blocks' maths to rounding."""
    eager, fused = twin_groups(block_type, in_channels, filters, drop_rate, torch.float64)
    x = torch.randn(2, in_channels, 6, 5, dtype=torch.float64, requires_grad=True)  # odd sizes
    grad = torch.randn(2, eager.out_channels, 6, 5, dtype=torch.float64)
    assert_float64_twin_matches(fused, eager, run, x, grad)


@pytest.mark.parametrize(("block_type", "in_channels", "filters"), [GROUPS[0], GROUPS[3]])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_fused_backends_equal_eager(fused_backend, block_type, in_channels, filters, drop_rate):
    """fp32 on Triton (the interpreter here) and the extension: output, gradients, running statistics; batch 1."""
    eager, fused = twin_groups(block_type, in_channels, filters, drop_rate)
    x = torch.randn(1, in_channels, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(1, eager.out_channels, 6, 6)
    want = run(eager, x, grad)
    with use_backend(fused_backend):
        got = run(fused, x, grad)
    assert_twin_matches(fused, eager, got, want, (1e-5, 1e-5), (1e-4, 2e-4), (1e-5, 1e-5))


@pytest.mark.parametrize("seed", [0, 1])  # 1: the closest to the bound seen (0.83 of it, Triton bf16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_blocks_under_autocast_keep_the_tolerance_rule(fused_backend, dtype, seed):
    """Autocast (fp32 parameters, low-precision activations): the fused blocks' output and gradients against fp32 no
    worse than twice the eager blocks' in the same dtype, plus 1e-2. BN vectors are 16 wide: the rule compares
    maximum errors, and over 4-channel vectors that maximum is chance (``test_fused_autocast`` says more)."""
    torch.manual_seed(seed)
    eager, fused = twin_groups("bottleneck", 48, 16, 0.0)
    reference = copy.deepcopy(eager)
    x = torch.randn(4, 48, 6, 6, requires_grad=True)
    grad = torch.randn(4, 64, 6, 6)
    want, want_grads = run(reference, x, grad)
    with torch.autocast("cpu", dtype=dtype):
        base, base_grads = run(eager, x, grad.to(dtype))
        with use_backend(fused_backend):
            got, got_grads = run(fused, x, grad.to(dtype))
    assert got.dtype == base.dtype == dtype
    assert all(g.dtype == torch.float32 for g in got_grads[1:])  # parameter gradients stay fp32
    assert_low_precision_rule(got, want, base)
    for a, b, c in zip(got_grads, want_grads, base_grads):
        assert_low_precision_rule(a, b, c)


def test_eager_paths_where_the_fused_one_does_not_apply():
    """``"auto"`` on a CPU and an empty batch take the eager modules (the BN counters advance as eager's)."""
    eager, fused = twin_groups("bottleneck", 12, 4, 0.0)
    fused.fused = "auto"
    assert not fused.uses_fused_ops()
    fused.fused = True
    assert fused.uses_fused_ops()
    empty = torch.randn(0, 12, 4, 4)
    assert fused(empty).shape == (0, 16, 4, 4)
    eager(empty)
    for a, b in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)
