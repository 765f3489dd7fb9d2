"""Checks shared by the tests of a fused module against its eager twin (same parameters and buffers)."""

import copy

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from spinenet_fast.ops import use_backend

from ..ops.tolerance import assert_low_precision_rule


def assert_twin_matches(fused, eager, got, want, out_tol, grad_tol, buffer_tol) -> None:
    """The fused module's output and gradients ``got`` — ``(out, grads)`` — against the eager twin's ``want``, then
    every buffer (running statistics, counters) of the two; each tolerance an ``(rtol, atol)`` pair."""
    (out, grads), (ref, ref_grads) = got, want
    torch.testing.assert_close(out, ref, rtol=out_tol[0], atol=out_tol[1])
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_tol[0], atol=grad_tol[1])
    for a, b in zip(fused.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=buffer_tol[0], atol=buffer_tol[1])


def assert_float64_twin_matches(fused, eager, run, x, grad) -> None:
    """float64 on the reference backend: ``run(module, x, grad)`` (output and gradients) in training mode, the
    buffers after it, then the eval-mode output — the eager module's maths to rounding."""
    want = run(eager, x, grad)
    with use_backend("reference"):
        got = run(fused, x, grad)
    assert_twin_matches(fused, eager, got, want, (1e-10, 1e-10), (1e-9, 1e-9), (1e-12, 1e-12))
    with torch.no_grad(), use_backend("reference"):
        torch.testing.assert_close(fused.eval()(x), eager.eval()(x), rtol=1e-10, atol=1e-10)


def assert_autocast_twin_keeps_the_rule(fused, eager, run, x, grad, backend: str) -> None:
    """bf16 autocast (fp32 parameters) on ``backend``: the fused module's output and gradients against the eager
    twin's in fp32 no worse than twice the eager module's under autocast, plus 1e-2; the parameters' gradients stay
    fp32. ``run(module, x, grad)``: ``(out, [x's gradient, *the parameters'])``."""
    want, want_grads = run(copy.deepcopy(eager), x, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base, base_grads = run(eager, x, grad.bfloat16())
        with use_backend(backend):
            got, got_grads = run(fused, x, grad.bfloat16())
    assert got.dtype == base.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got_grads[1:])
    for a, b, c in zip([got, *got_grads], [want, *want_grads], [base, *base_grads]):
        assert_low_precision_rule(a, b, c)


def assert_eager_paths(make_twins, x) -> None:
    """A frozen BN (torchvision's) normalises with its statistics on the fused path too; ``"auto"`` on a CPU and an
    empty batch take the eager modules (the BN counter advances as eager's). ``make_twins(norm)``: ``(eager, fused)``
    modules with that norm."""
    eager, fused = make_twins(FrozenBatchNorm2d)
    with use_backend("reference"):
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)
    eager, fused = make_twins(nn.BatchNorm2d)
    fused.fused = "auto"
    assert not fused.uses_fused_ops()
    fused.fused = True
    got, want = fused(x[:0]), eager(x[:0])
    assert got.shape == want.shape and got.shape[0] == 0
    for a, b in zip(fused.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def assert_checkpointed_twin_matches(fused, eager, x, backend: str) -> None:
    """Non-reentrant activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) around the whole
    model, float64, one training step: the fused model's forward recomputed in its backward — each saved tensor
    unpacked once, as the checkpoint requires — gives eager's gradients, and both update their running statistics
    twice alike. Judged against the largest gradient: a BN's β feeding only other BNs has a gradient of 0 up to
    rounding."""
    for model, use in ((eager, "reference"), (fused, backend)):
        with use_backend(use):
            out = torch.utils.checkpoint.checkpoint(model.train(), x, use_reentrant=False)
            sum((feat * feat).mean() for feat in out.values()).backward()
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, a), b in zip(fused.named_parameters(), eager.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max().item() <= 1e-9 * scale, name
    for a, b in zip(fused.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
