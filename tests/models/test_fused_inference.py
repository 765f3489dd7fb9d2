"""The fused SpineNet in eval mode (every BN an affine map of its running statistics): its convs take no statistics,
all its norms' maps are computed once per forward (``SpineNet.model_running_affines``), and it matches eager —
outputs, and the gradients of an eval-mode model (frozen statistics, trainable γ and β) — whatever changes the
running statistics between forwards."""

import pytest
import torch
from torch import nn

from spinenet_fast.ops import use_backend

from ..conftest import AtenOps
from .test_fused_spinenet import assert_close_scaled, twins


def with_running_statistics(eager, fused) -> None:
    """Give both models the same non-trivial running statistics (one training forward of the eager model)."""
    eager.train()(torch.randn(2, 3, 128, 128, dtype=next(eager.parameters()).dtype))
    fused.load_state_dict(eager.state_dict())


def test_eval_forward_takes_no_statistics_and_computes_the_affine_maps_once():
    eager, fused = twins("49S")
    with_running_statistics(eager, fused)
    images = torch.randn(1, 3, 128, 128)
    merge = fused.merges[0]
    inputs = []
    handle = merge.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad(), use_backend("reference"), AtenOps() as seen:
        fused.eval()(images)
    handle.remove()
    foreach = sorted(op for op in seen.ops if op.startswith("_foreach"))
    assert foreach == ["_foreach_add", "_foreach_addcmul", "_foreach_mul", "_foreach_rsqrt"]  # all norms at once
    assert not {"zeros", "zero_", "sum", "stack", "rsqrt", "batch_norm", "native_batch_norm"} & set(seen.ops)
    with torch.no_grad(), use_backend("reference"), AtenOps() as seen:  # a module on its own: its norms at once
        merge(inputs[0])
    assert sorted(op for op in seen.ops if op.startswith("_foreach")) == foreach


@pytest.mark.parametrize(("family", "dtype", "rel"), [("49S", torch.float64, 1e-9), ("49S", torch.float32, 1e-5),
                                                      ("mobile", torch.float32, 1e-5)])  # fmt: skip
def test_eval_mode_outputs_and_gradients_equal_eager(family, dtype, rel):
    """An eval-mode model trained further (frozen running statistics, trainable γ, β: the affine maps' gradients):
    outputs and every parameter's gradient as eager's — fp32 weights' gradients added into their modules'
    workspaces (one fill per module), a second backward's into gradients of its own."""
    if family == "mobile":
        from .test_fused_spinenet_mobile import twins as mobile_twins

        eager, fused = mobile_twins(dtype=dtype)
    else:
        eager, fused = twins(family, dtype=dtype)
    with_running_statistics(eager, fused)
    images = torch.randn(2, 3, 128, 128, dtype=dtype)
    results = []
    for model, backend in ((eager, "reference"), (fused, "reference")):
        model.eval().zero_grad()
        with use_backend(backend):
            out = model(images)
            sum((feat * feat).mean() for feat in out.values()).backward(retain_graph=True)
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            sum((feat * feat).mean() for feat in out.values()).backward()  # the workspaces are the first's
        results.append((out, grads, {name: p.grad for name, p in model.named_parameters()}))
    (want, want_grads, want_again), (got, got_grads, got_again) = results
    for name in want:
        assert_close_scaled(got[name], want[name], name, rel=rel)
    for name, grad in want_grads.items():
        assert_close_scaled(got_grads[name], grad, name, rel=rel)
        assert_close_scaled(got_again[name], want_again[name], name, rel=rel)
    assert any(isinstance(m, nn.BatchNorm2d) and m.weight.grad.abs().sum() > 0 for m in fused.modules())


def test_changed_running_statistics_are_used_at_the_next_forward():
    """Nothing is cached across forwards: statistics changed in place through ``.data`` (no version bump), or by
    the fused model's own training step (its kernels update them), are the next eval forward's."""
    eager, fused = twins("49S")
    with_running_statistics(eager, fused)
    images = torch.randn(1, 3, 128, 128)

    def scale_variances(model) -> None:
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var.data.mul_(3.0)

    def train_fused_then_copy(model) -> None:
        if model is fused:
            fused.train()(torch.randn(2, 3, 128, 128))
            eager.load_state_dict(fused.state_dict())

    for change in (scale_variances, train_fused_then_copy):
        with torch.no_grad(), use_backend("reference"):
            before = fused.eval()(images)
            change(fused)
            change(eager)
            expected, got = eager.eval()(images), fused.eval()(images)
        assert not torch.allclose(got["p3"], before["p3"])
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def test_mobile_eval_forward_computes_the_affine_maps_once():
    """SpineNet-Mobile: its fused merges' and endpoints' norms at once per forward (its MBConv blocks and stem stay
    eager: their BNs are eager's), each connection one ``expand_merge_affine``, the same outputs as eager."""
    from .test_fused_spinenet_mobile import twins as mobile_twins

    eager, fused = mobile_twins()
    eager.train()(torch.randn(2, 3, 128, 128))
    fused.load_state_dict(eager.state_dict())
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad(), use_backend("reference"), AtenOps() as seen:
        got = fused.eval()(images)
    assert sorted(op for op in seen.ops if op.startswith("_foreach")) == [
        "_foreach_add", "_foreach_addcmul", "_foreach_mul", "_foreach_rsqrt"
    ]  # fmt: skip
    assert "rsqrt" not in seen.ops
    assert seen.ops.count("expand_merge_affine") == len(fused.merges)
    with torch.no_grad():
        expected = eager.eval()(images)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def test_eval_connections_are_one_expand_merge_affine_each():
    """Eval mode, with gradients or without (an eval-mode model trained further, or inference): each connection's
    expand convs, their BNs and the merge are one ``expand_merge_affine`` (a downsampling parent max-pooled first),
    the outputs eager's. On Triton (the interpreter): a connection with a max-pooled parent on its own, both ways (the
    max-pools, which have no Triton kernel, on ``auto``'s backend), and with gradients every parameter's gradient
    (frozen norms: γ and β through the maps) as eager's."""
    eager, fused = twins("49S")
    with_running_statistics(eager, fused)
    images = torch.randn(1, 3, 128, 128)
    pooled = next(k for k, m in enumerate(fused.merges) if any(r.pools for r in m.resamples))
    inputs = []
    handle = fused.merges[pooled].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        expected = eager.eval()(images)
    fused.eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad), use_backend("reference"), AtenOps() as seen:
            got = fused(images)
        affine_ops = seen.ops.count("expand_merge_affine")
        assert affine_ops == len(fused.merges), (grad, affine_ops)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4, msg=(grad, name))
    handle.remove()
    eager_merge, fused_merge = eager.merges[pooled].eval(), fused.merges[pooled]
    want = eager_merge(inputs[0])
    grad_out = torch.randn_like(want)
    want_grads = dict(zip(dict(eager_merge.named_parameters()),
                          torch.autograd.grad(want, list(eager_merge.parameters()), grad_out)))  # fmt: skip
    for grad in (False, True):
        with torch.set_grad_enabled(grad), use_backend("triton"):
            got = fused_merge(inputs[0])
            if grad:
                names, parameters = zip(*fused_merge.named_parameters())
                got_grads = dict(zip(names, torch.autograd.grad(got, parameters, grad_out)))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"grad={grad}")
    assert got_grads.keys() == want_grads.keys()
    for name, expected in want_grads.items():
        assert_close_scaled(got_grads[name], expected, name, rel=1e-4)


def test_compile_fullgraph_traces_the_inference_forward():
    """``torch.compile(fullgraph=True)`` of the eval-mode model under ``torch.no_grad()`` (the model-level maps, the
    convs without statistics, ``expand_merge_affine``): eager's outputs."""
    eager, fused = twins("49S")
    with_running_statistics(eager, fused)
    images = torch.randn(1, 3, 128, 128)
    compiled = torch.compile(fused.eval(), fullgraph=True, backend="aot_eager")
    with torch.no_grad(), use_backend("reference"):
        got, expected = compiled(images), eager.eval()(images)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
