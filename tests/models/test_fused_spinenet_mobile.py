"""SpineNet-Mobile with fused cross-scale connections (depthwise resampling chains, 1×1 convs, BNs, merges) against
the eager model: same weights, same numbers, same running statistics."""

import copy

import pytest
import torch
from torch import nn

from spinenet_fast.detection import retinanet_spinenet_mobile
from spinenet_fast.models import SpineNetMobile
from spinenet_fast.ops import backends, use_backend

from ..conftest import require_backend
from .test_fused_spinenet import assert_close_scaled, train_steps
from .twin_checks import assert_checkpointed_twin_matches


def twins(model_id="49XS", dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    eager = SpineNetMobile(model_id, stochastic_depth_rate=0.0, fused=False, **kwargs).to(dtype)
    for bn in eager.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial affine maps
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    fused = copy.deepcopy(eager)
    for merge in fused.fusable_modules():
        merge.fused = True
    return eager, fused


def gradient_scale(model) -> float:
    return max(p.grad.double().abs().max().item() for p in model.parameters())


# 256 px: at 128 px P7 is 1×1, and training-mode BN over 2 values per channel is chaotic in any precision.
@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize(
    ("model_id", "kwargs", "steps"), [("49XS", {}, 2), ("49S", {"activation": "relu", "padding": "torch"}, 1)]
)
def test_float64_training_equals_eager(monkeypatch, backend, model_id, kwargs, steps):
    """Endpoints and every gradient of the first step, parameters and running statistics after ``steps`` SGD steps.
    A BN's β feeding only other BNs has a gradient of 0 up to rounding: gradients are judged against the largest."""
    require_backend(backend)
    eager, fused = twins(model_id, torch.float64, **kwargs)
    images = [torch.randn(2, 3, 256, 256, dtype=torch.float64) for _ in range(2)]
    expected = train_steps(eager.train(), images, steps)
    used = []
    real_choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda op, *a: used.append(real_choose(op, *a)) or used[-1])
    with use_backend(backend):
        got = train_steps(fused.train(), images, steps)
    assert set(used) == {backend} and len(used) > 50
    for name in expected[0]:
        assert_close_scaled(got[0][name], expected[0][name], name)
    scale = max(g.double().abs().max().item() for g in expected[1].values())
    for name in expected[1]:
        error = (got[1][name].double() - expected[1][name].double()).abs().max().item()
        assert error <= 1e-7 * scale, (name, error, scale)
    eager_state, fused_state = eager.state_dict(), fused.state_dict()
    for name in eager_state:
        assert_close_scaled(fused_state[name], eager_state[name], name)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_activation_checkpointing_gives_eager_gradients(backend):
    require_backend(backend)
    eager, fused = twins("49XS", torch.float64)
    assert_checkpointed_twin_matches(fused, eager, torch.randn(2, 3, 256, 256, dtype=torch.float64), backend)


@pytest.mark.heavy
def test_triton_kernels_train_the_whole_model_as_accurately_as_eager(monkeypatch):
    """fp32 under the interpreter, each op on the backend ``auto`` takes on a GPU (depthwise and 1×1 Triton kernels,
    the extension's or Triton's merge): endpoints and gradients judged against float64, no worse than eager fp32."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eager, fused = twins()
    exact = copy.deepcopy(eager).double()
    images = torch.randn(2, 3, 128, 128)
    selected = []
    real_select = backends.select
    monkeypatch.setattr(backends, "select", lambda op, *a: selected.append(op) or real_select(op, *a))
    outputs = {}
    for name, model, x in (("exact", exact, images.double()), ("eager", eager, images), ("fused", fused, images)):
        with backends.gpu_auto_order_on_cpu(), use_backend(None):
            out = model.train()(x)
            sum((o.float() ** 2).mean() for o in out.values()).backward()
        outputs[name] = (out, {n: p.grad for n, p in model.named_parameters()})
    fused_ops = {"conv3x3_bn_forward", "conv3x3_bn_backward", "expand_merge_forward", "expand_merge_backward"}
    assert fused_ops <= set(selected)
    reference, eager_run, fused_run = outputs["exact"], outputs["eager"], outputs["fused"]
    for level in reference[0]:
        eager_error = (eager_run[0][level].double() - reference[0][level]).abs().max().item()
        fused_error = (fused_run[0][level].double() - reference[0][level]).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-5, (level, fused_error, eager_error)
    scale = gradient_scale(exact)
    for name, grad in reference[1].items():
        eager_error = (eager_run[1][name].double() - grad).abs().max().item()
        fused_error = (fused_run[1][name].double() - grad).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-5 * scale, (name, fused_error, eager_error)


def test_eval_mode_uses_running_statistics():
    eager, fused = twins()
    images = torch.randn(2, 3, 128, 128)
    eager.train()(images)  # non-trivial running statistics for both
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad(), use_backend("triton"):
        got = fused.eval()(images)
    expected = eager.eval()(images)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def test_empty_training_batch_gives_what_eager_gives():
    eager, fused = twins()
    images = torch.randn(0, 3, 128, 128, requires_grad=True)
    expected = eager.train()(images)
    with use_backend("reference"):
        got = fused.train()(images)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    eager_state, fused_state = eager.state_dict(), fused.state_dict()
    for name in eager_state:
        torch.testing.assert_close(fused_state[name], eager_state[name], msg=name)


def test_compile_fullgraph_and_the_detector_setting():
    """``torch.compile(fullgraph=True)`` traces the fused merges; ``retinanet_spinenet_mobile(fused=...)`` sets the
    backbone's merges and the loss, and ``"auto"`` is eager on the CPU."""
    torch._dynamo.reset()
    _, fused = twins()
    compiled = torch.compile(fused.train(), fullgraph=True, backend="aot_eager")
    with use_backend("reference"):
        out = compiled(torch.randn(2, 3, 128, 128))
        sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in fused.parameters())
    detector = retinanet_spinenet_mobile("49XS", 3, fused=True)
    assert all(merge.uses_fused_ops() for merge in detector.backbone.merges) and detector.head.fused is True
    assert not any(merge.uses_fused_ops() for merge in SpineNetMobile("49XS").merges)
    with pytest.raises(ValueError, match="fused must be True, False or 'auto', got 'yes'"):
        SpineNetMobile("49XS", fused="yes")
