"""SpineNet with fused cross-scale connections against the eager model: same weights, same numbers."""

import pytest
import torch
from torch import nn

from spinenet_fast import SpineNet
from spinenet_fast.ops import backends, use_backend

from ..conftest import require_backend
from .twin_checks import assert_checkpointed_twin_matches


def twins(model_id="49S", dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    eager = SpineNet(model_id, stochastic_depth_rate=0.0, fused=False, **kwargs).to(dtype)
    fused = SpineNet(model_id, stochastic_depth_rate=0.0, fused=True, **kwargs).to(dtype)
    fused.load_state_dict(eager.state_dict())
    for model in (eager, fused):
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):  # non-trivial affine and running statistics
                nn.init.uniform_(bn.weight, 0.5, 1.5)
                nn.init.uniform_(bn.bias, -0.2, 0.2)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 1e-6) -> None:
    """float64 agreement up to summation order: max |got − expected| <= rel · max |expected|."""
    error = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale + 1e-12, f"{name}: error {error} for values up to {scale}"


def train_steps(model, images, steps):
    """``steps`` SGD steps; returns the endpoints and gradients of the first."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    first = None
    for step in range(steps):
        out = model(images[step % len(images)])
        loss = sum((feat * feat).mean() for feat in out.values())
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = ({k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return first


# ReLU's kinks turn float64 rounding differences into different max-pool/ReLU decisions within a few SGD
# steps (both models are right; they diverge like any chaotic system), so that variant compares one step.
@pytest.mark.parametrize(
    ("model_id", "kwargs", "steps"),
    [
        ("49", {}, 3),
        ("49S", {"activation": "relu", "padding": "tf_same"}, 1),
        ("49S", {"bn_momentum": None}, 2),  # nn.BatchNorm2d's cumulative average
    ],
)
def test_float64_training_equals_eager(model_id, kwargs, steps):
    # 256 px: at 128 px P7 is 1×1, and training-mode BN over 2 values per channel is chaotic in any precision.
    eager, fused = twins(model_id, torch.float64, **kwargs)
    images = [torch.randn(2, 3, 256, 256, dtype=torch.float64) for _ in range(2)]
    expected = train_steps(eager.train(), images, steps)
    with use_backend("reference"):
        got = train_steps(fused.train(), images, steps)
    for name in expected[0]:
        assert_close_scaled(got[0][name], expected[0][name], name)
    for name in expected[1]:
        assert_close_scaled(got[1][name], expected[1][name], name)
    eager_state, fused_state = eager.state_dict(), fused.state_dict()
    for name in eager_state:  # parameters and running statistics after the steps
        assert_close_scaled(fused_state[name], eager_state[name], name)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_activation_checkpointing_gives_eager_gradients(backend):
    require_backend(backend)
    eager, fused = twins("49S", torch.float64)
    assert_checkpointed_twin_matches(fused, eager, torch.randn(2, 3, 256, 256, dtype=torch.float64), backend)


def test_empty_training_batch_gives_what_eager_gives():
    eager, fused = twins("49S")
    images = torch.randn(0, 3, 128, 128, requires_grad=True)
    expected = eager.train()(images)
    with use_backend("reference"):
        got = fused.train()(images)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    sum(v.sum() for v in got.values()).backward()
    assert images.grad.shape == images.shape
    eager_state, fused_state = eager.state_dict(), fused.state_dict()
    for name in eager_state:
        torch.testing.assert_close(fused_state[name], eager_state[name], msg=name)


@pytest.mark.parametrize("kwargs", [{}, {"activation": "relu", "padding": "tf_same"}])
def test_float64_training_with_the_extension_backend_equals_eager(monkeypatch, kwargs):
    """SPINENET_FAST_BACKEND=cuda on a CPU: the extension's CPU kernels (merge, max-pool, BN) and ATen's GEMMs."""
    require_backend("cuda")
    monkeypatch.setenv("SPINENET_FAST_BACKEND", "cuda")
    eager, fused = twins("49S", torch.float64, **kwargs)
    images = [torch.randn(2, 3, 256, 256, dtype=torch.float64)]
    used = []
    real_choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda op, *a: used.append(real_choose(op, *a)) or used[-1])
    expected = train_steps(eager.train(), images, 1)
    got = train_steps(fused.train(), images, 1)
    assert set(used) == {"cuda"} and len(used) > 100
    for name in expected[0]:
        assert_close_scaled(got[0][name], expected[0][name], name)
    for name in expected[1]:
        assert_close_scaled(got[1][name], expected[1][name], name)
    eager_state, fused_state = eager.state_dict(), fused.state_dict()
    for name in eager_state:
        assert_close_scaled(fused_state[name], eager_state[name], name)


def test_float32_training_error_is_that_of_eager():
    """fp32 training-mode BN is ill-conditioned at tiny levels: judge fused and eager fp32 against float64."""
    eager, fused = twins("49", torch.float32)
    exact = SpineNet("49", stochastic_depth_rate=0.0, fused=False).double()
    exact.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 256, 256)
    reference = exact.train()(images.double())
    eager_out = eager.train()(images)
    with use_backend("reference"):
        fused_out = fused.train()(images)
    for name in reference:
        eager_error = (eager_out[name].double() - reference[name]).abs().max().item()
        fused_error = (fused_out[name].double() - reference[name]).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-5, (name, fused_error, eager_error)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_float32_error_on_unnormalised_images_is_that_of_eager(backend):
    """Raw pixel values (mean 200, spread 20: images fed without normalisation) give the stem's BN an input whose mean
    dwarfs its spread: the fused fp32 forward stays as far from float64 as eager's (RMS per level, ≤ 1.5×; it was
    ~5× with fp32 statistics, ~1.0× with the float64 ones)."""
    require_backend(backend)
    eager, fused = twins("49S", torch.float32)
    exact = SpineNet("49S", stochastic_depth_rate=0.0, fused=False).double()
    exact.load_state_dict(eager.state_dict())
    images = 200 + 20 * torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = exact.train()(images.double())
        eager_out = eager.train()(images)
        with use_backend(backend):
            fused_out = fused.train()(images)
    for name, exact_out in reference.items():
        fused_rms, eager_rms = ((out[name].double() - exact_out).pow(2).mean().sqrt().item()
                                for out in (fused_out, eager_out))  # fmt: skip
        assert fused_rms <= 1.5 * eager_rms, (name, fused_rms, eager_rms)


def test_eval_mode_uses_running_statistics():
    eager, fused = twins("49S")
    images = torch.randn(2, 3, 128, 128)
    eager.train()(images)  # give both models the same non-trivial running statistics
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad(), use_backend("reference"):
        expected, got = eager.eval()(images), fused.eval()(images)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def test_triton_kernels_in_the_whole_model(monkeypatch):
    """Automatic choice under TRITON_INTERPRET=1: every op with Triton kernels runs them, the rest ATen (the
    connections and the blocks; the demo's narrow scaling keeps the interpreter's time small)."""
    from spinenet_fast.detection.presets import CUSTOM_SCALINGS

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eager, fused = twins(CUSTOM_SCALINGS["49XS-custom"])
    images = torch.randn(1, 3, 128, 128)
    eager.train()(torch.randn(2, 3, 128, 128))
    fused.load_state_dict(eager.state_dict())
    used = []
    real_select = backends.select
    monkeypatch.setattr(backends, "select", lambda op, *a: used.append(op) or real_select(op, *a))
    with torch.no_grad(), use_backend(None):
        got = fused.eval()(images)
    triton_functions = {op: impl["triton"].fn for op, impl in backends._registry.items() if "triton" in impl}
    with_kernels = {"merge", "conv1x1_bn_stats", "conv3x3_bn_stats", "bn_finalize"}
    assert with_kernels <= set(triton_functions) and with_kernels - {"bn_finalize"} <= set(used)
    assert backends.select("merge", *merge_args()) is triton_functions["merge"]
    expected = eager.eval()(images)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def merge_args():
    """The merge op's arguments: parents, scales, shifts, ratios, extra, row_scale, activation."""
    parents = [torch.randn(1, 3, 2, 2), torch.randn(1, 3, 1, 1)]
    return parents, [torch.ones(3)] * 2, [torch.zeros(3)] * 2, [1, 2], None, None, "relu"


def saved_bytes(module, feats):
    """Bytes of the distinct storages autograd saves for one forward of ``module``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(feats)
    inputs = {f.untyped_storage().data_ptr() for f in feats}
    return sum(n for ptr, n in storages.items() if ptr not in inputs)


def test_fused_connection_saves_fewer_bytes_than_eager():
    eager, fused = twins("49")
    x = torch.randn(2, 3, 256, 256)
    feats = []
    with torch.no_grad():
        y = eager.stem(x)
        for group in eager.init_groups:
            y = group(y)
            feats.append(y)
        for merge, group in zip(eager.merges[:11], eager.groups[:11]):
            feats.append(group(merge(feats)))
    feats = [f.requires_grad_() for f in feats]
    for k in (2, 11):  # block 3 (L2 and L4 parents into L3) and block 12 (P3: ↑4 and ↓2 parents)
        with use_backend("reference"):
            fused_bytes = saved_bytes(fused.merges[k].train(), feats)
        eager_bytes = saved_bytes(eager.merges[k].train(), feats)
        assert fused_bytes < eager_bytes, (k, fused_bytes, eager_bytes)


def test_compile_fullgraph_through_the_fused_model():
    torch._dynamo.reset()
    _, fused = twins("49S")
    compiled = torch.compile(fused.train(), fullgraph=True, backend="aot_eager")
    images = torch.randn(2, 3, 128, 128)
    with use_backend("reference"):
        out = compiled(images)
        sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_auto_is_eager_on_the_cpu():
    model = SpineNet("49S", fused="auto")
    assert not any(merge.uses_fused_ops() for merge in model.merges)
    assert all(merge.uses_fused_ops() for merge in SpineNet("49S", fused=True).merges)
