"""The RetinaNet head on the fused ops (``SpineNetRetinaNetHead(fused=True)``): the same outputs, gradients and BN
buffers as its eager forward, the tower convs' gradients shared across levels, eager where it cannot fuse."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from spinenet_fast.detection import SpineNetRetinaNetHead
from spinenet_fast.detection.fused_head import SharedParameter, levels_mode
from spinenet_fast.ops import use_backend

from ..conftest import require_backend
from ..ops.tolerance import assert_low_precision_rule

SIZES = [(8, 6), (4, 3), (2, 2), (1, 1), (1, 1)]  # P3…P7 of a 64×48 image


def make_heads(dtype=torch.float64, num_convs=2, channels=8, norm=nn.BatchNorm2d):
    """An eager head with random parameters and BN buffers (not the near-zero official init: every path matters)
    and its fused copy."""
    eager = SpineNetRetinaNetHead(channels, 3, 5, num_convs=num_convs, norm=norm, fused=False)
    for module in eager.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.2)
            nn.init.normal_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    eager = eager.to(dtype)
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def features(dtype=torch.float64, batch=2, channels=8, sizes=SIZES):
    return [torch.randn(batch, channels, h, w, dtype=dtype, requires_grad=True) for h, w in sizes]


def loss_and_grads(head, feats, **grad_kwargs):
    out = head(feats)
    weights = {k: torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v) for k, v in out.items()}
    loss = sum((out[k].float() * weights[k].float()).sum() for k in out)
    return out, torch.autograd.grad(loss, [*feats, *head.parameters()], **grad_kwargs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_head_equals_eager_in_float64(mode):
    """Outputs, the gradients of the features and of every parameter, and every BN buffer (running statistics,
    counters), float64 on the reference backend."""
    eager, fused = make_heads()
    getattr(eager, mode)()
    getattr(fused, mode)()
    feats = features()
    want_out, want = loss_and_grads(eager, feats)
    with use_backend("reference"):
        assert fused.uses_fused_ops()
        got_out, got = loss_and_grads(fused, feats)
    for name in want_out:
        assert got_out[name].shape == want_out[name].shape
        torch.testing.assert_close(got_out[name], want_out[name], rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for (name, a), b in zip(fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_level_by_level_towers_share_one_gradient_buffer_per_layer_and_a_second_backward():
    """BNs the one-launch-per-layer path does not take (a cumulative moving average: momentum None) run the towers
    level by level: fp32 parameters in training mode, each tower layer's five levels add the shared weight's and
    bias' gradients into one buffer (autograd receives it once, no per-level gradient); a second backward through the
    same graph (``retain_graph``) returns the same gradients; the running statistics follow eager's."""
    eager, fused = make_heads(torch.float32, channels=16)
    for head in (eager, fused):
        for module in head.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
    assert levels_mode(fused.class_tower, 5) is None
    feats = features(torch.float32, channels=16, sizes=[(8, 8), (6, 6), (4, 4), (3, 3), (2, 2)])
    _, want = loss_and_grads(eager, feats)
    with use_backend("reference"):
        out = fused(feats)
        weights = [torch.linspace(-1, 1, v.numel()).view_as(v) for v in out.values()]
        loss = sum((o * w).sum() for o, w in zip(out.values(), weights))
        leaves = [*feats, *fused.parameters()]
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
    for got in (first, second):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    for a, b in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def testlevels_mode_of_each_kind_of_tower():
    """All batch statistics alike: one launch per layer; running statistics (eval): likewise; a tower mixing the two
    or BNs of one layer with different momenta: level by level."""
    _, fused = make_heads(torch.float32)
    assert levels_mode(fused.class_tower, 5) == "batch"
    fused.eval()
    assert levels_mode(fused.class_tower, 5) == "running"
    fused.class_tower.norms[2][0].train()
    assert levels_mode(fused.class_tower, 5) is None
    fused.train()
    fused.class_tower.norms[2][0].momentum = 0.5
    assert levels_mode(fused.class_tower, 5) is None


def test_shared_parameter_passes_its_buffer_once():
    parameter = torch.randn(3, requires_grad=True)
    buffer = torch.zeros(3)
    view = SharedParameter.apply(parameter, buffer)
    buffer.add_(torch.tensor([1.0, 2.0, 3.0]))  # what the convs' backward launches add
    (view * 0).sum().backward(retain_graph=True)  # the gradient autograd passes in is ignored for the buffer...
    torch.testing.assert_close(parameter.grad, torch.tensor([1.0, 2.0, 3.0]))
    (view * 2).sum().backward()  # ...but a second backward passes its own on
    torch.testing.assert_close(parameter.grad, torch.tensor([3.0, 4.0, 5.0]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_match_the_reference_backend(backend):
    """fp32, one conv per tower, batch 1 and channels_last features: Triton (interpreter) and the extension's CPU
    twins against the reference backend's fused head (same maths, other kernels)."""
    require_backend(backend)
    results = {}
    _, head = make_heads(torch.float32, num_convs=1, channels=12)
    sizes = [(6, 5), (5, 4), (4, 4), (3, 4), (3, 3)]  # batch 1: BN over ≥ 9 values, conditioned as fp32 checks need
    feats = [f.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
             for f in features(torch.float32, batch=1, channels=12, sizes=sizes)]  # fmt: skip
    for name in (backend, "reference"):
        twin = copy.deepcopy(head)
        with use_backend(name):
            out, grads = loss_and_grads(twin, feats)
        results[name] = ([*out.values(), *grads], list(twin.buffers()))
    for a, b in zip(*(results[name][0] for name in (backend, "reference"))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(*(results[name][1] for name in (backend, "reference"))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_tolerance_rule(dtype, backend):
    """Under autocast (fp32 parameters; the extension's kernels or Triton's): outputs and parameter gradients against
    fp32 no worse than eager autocast's, by the tolerance rule."""
    require_backend(backend)
    eager, fused = make_heads(torch.float32, num_convs=1, channels=16)
    sizes = [(8, 8), (6, 6), (4, 4), (4, 3), (3, 3)]  # BN over ≥ 9 values per level: no chance-conditioned variance
    feats = features(torch.float32, channels=16, sizes=sizes)
    reference = loss_and_grads(copy.deepcopy(eager), feats)
    with torch.autocast("cpu", dtype=dtype):
        low = loss_and_grads(eager, feats)
        with use_backend(backend):
            got = loss_and_grads(fused, feats)
    for name in reference[0]:
        assert got[0][name].dtype == dtype
        assert_low_precision_rule(got[0][name], reference[0][name], low[0][name])
    for a, b, c in zip(got[1], reference[1], low[1]):
        assert_low_precision_rule(a, b, c)


def test_heads_that_cannot_fuse_run_eagerly():
    """Frozen BN in the towers, or an empty batch: the eager modules (and their results)."""
    eager, fused = make_heads(torch.float32, norm=FrozenBatchNorm2d)
    assert not fused.uses_fused_ops()
    feats = features(torch.float32)
    torch.testing.assert_close(fused(feats)["cls_logits"], eager(feats)["cls_logits"], rtol=0, atol=0)
    _, fused = make_heads(torch.float32)
    empty = fused([torch.randn(0, 8, h, w) for h, w in SIZES])
    assert empty["cls_logits"].shape == (0, sum(h * w for h, w in SIZES) * 3, 5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph_traces_the_levels_ops(mode):
    """``torch.compile(fullgraph=True)`` traces the one-launch-per-layer head (the ops' fakes, the running statistics
    the forward op mutates): the same outputs, gradients and buffers as eager, reference backend, float64."""
    eager, fused = make_heads()
    getattr(eager, mode)()
    getattr(fused, mode)()
    feats = features()
    want_out, want = loss_and_grads(eager, feats)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with use_backend("reference"):
        got_out, got = loss_and_grads(compiled, feats)
    for name in want_out:
        torch.testing.assert_close(got_out[name], want_out[name], rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compile_again_with_another_bn_eps():
    """A second compile of the head's forward with other BN epsilons (``torch.compile``'s automatic dynamic makes a
    changed float symbolic): the argument checks trace with a symbolic eps (found when another test's compile of the
    same code ran first)."""
    for eps in (1e-3, 1e-5):
        eager, fused = make_heads()
        for head in (eager, fused):
            for module in head.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eps = eps
        feats = features()
        want_out, _ = loss_and_grads(eager, feats)
        with use_backend("reference"):
            got_out, _ = loss_and_grads(torch.compile(fused, fullgraph=True, backend="aot_eager"), feats)
        for name in want_out:
            torch.testing.assert_close(got_out[name], want_out[name], rtol=1e-10, atol=1e-10)
