"""Checks shared by the tests of a fused module against its eager twin (same parameters and buffers)."""

import torch

from spinenet_fast.ops import use_backend


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
