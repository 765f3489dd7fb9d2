"""``statistics=False`` on the conv ops (``conv1x1_bn_stats``, ``conv3x3_bn_stats`` dense and depthwise): the conv of
a BN that normalises with its running statistics (eval mode), or of a head's predictor, takes no statistics — no fill,
no reductions — and returns the same y and gradients as with them, on every backend."""

import pytest
import torch

from spinenet_fast.ops import conv1x1_bn_stats, conv3x3_bn_stats, use_backend
from spinenet_fast.ops.conv1x1_bn_stats import _conv1x1_backward_op, _conv1x1_op
from spinenet_fast.ops.conv3x3_bn_stats import _conv3x3_backward_op, _conv3x3_op

from ..conftest import AtenOps, require_backend

BACKENDS = ["reference", "triton", "cuda"]
# (kind, stride): 37 input channels (a partial K tile), 70 output channels (a partial N tile) — 37 for depthwise
CONVS = [("1x1", 1), ("3x3", 1), ("3x3", 2), ("depthwise", 1), ("depthwise", 2)]


def conv_inputs(kind: str, dtype=torch.float32, c_in=37, c_out=70, size=(6, 10)):
    """``(x, weight, scale, shift, bias)``: x channels_last (N = 2), a prologue, a bias for the 3×3 convs."""
    x = torch.randn(2, c_in, *size, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    shape = {"1x1": (c_out, c_in, 1, 1), "3x3": (c_out, c_in, 3, 3), "depthwise": (c_in, 1, 3, 3)}[kind]
    weight = (torch.randn(shape, dtype=dtype) / 3).requires_grad_()
    scale = (torch.rand(c_in, dtype=dtype) + 0.5).requires_grad_()
    shift = torch.randn(c_in, dtype=dtype).requires_grad_()
    bias = None if kind == "1x1" else torch.randn(shape[0], dtype=dtype).requires_grad_()
    return x, weight, scale, shift, bias


def call(kind: str, stride: int, inputs, statistics: bool):
    x, weight, scale, shift, bias = inputs
    if kind == "1x1":
        return conv1x1_bn_stats(x, weight, scale, shift, "swish", statistics=statistics)
    return conv3x3_bn_stats(x, weight, scale, shift, "swish", "tf_same", stride=stride, bias=bias,
                            statistics=statistics)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "stride"), CONVS)
def test_same_output_and_gradients_without_statistics(backend, kind, stride):
    require_backend(backend)
    inputs = conv_inputs(kind)
    leaves = [t for t in inputs if t is not None]
    with use_backend(backend):
        with AtenOps() as launched:  # a fill or a reduction would show here
            y, stats = call(kind, stride, inputs, statistics=False)
        grad = torch.randn_like(y)
        with AtenOps() as backward_launched:  # the statistics have no gradient: nothing filled for it
            got = torch.autograd.grad(y, leaves, grad)
        y_with, stats_with = call(kind, stride, inputs, statistics=True)
        want = torch.autograd.grad(y_with, leaves, grad)
    assert stats is None and stats_with.shape == (2, y.shape[1])
    torch.testing.assert_close(y, y_with, rtol=0, atol=0)  # the same launch, its epilogue without the sums
    assert y.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if not (backend == "cuda" and kind == "depthwise"):  # (the extension's depthwise kernel sums them anyway)
        assert not {"zeros", "zero_", "fill_", "sum", "add_", "stack"} & set(launched.ops), launched.ops
    assert not {"zeros", "zeros_like", "zero_", "fill_", "_to_copy"} & set(backward_launched.ops), backward_launched.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "stride"), CONVS)
def test_backward_without_statistics_gradients_never_reads_y(backend, kind, stride):
    """The backward ops given no statistics' gradients (None) compute dy's backward alone and never read y: a NaN y
    changes nothing (read, it would turn every gradient NaN even times the zero gradients it would be folded with)."""
    require_backend(backend)
    if backend == "cuda" and kind == "depthwise":
        pytest.skip("the extension's depthwise backward folds the statistics' gradients always (zeros given here)")
    x, weight, scale, shift, bias = (t.detach() if t is not None else None for t in conv_inputs(kind))
    with use_backend(backend):
        y, _ = call(kind, stride, (x, weight, scale, shift, bias), statistics=False)
        dy, nan_y = torch.randn_like(y), torch.full_like(y, float("nan"))
        zeros = torch.zeros(y.shape[1])
        if kind == "1x1":
            run = lambda d_sum, y_in: _conv1x1_backward_op(dy, d_sum, d_sum, y_in, x, weight, scale, shift, "swish")  # noqa: E731
        else:
            run = lambda d_sum, y_in: _conv3x3_backward_op(dy, d_sum, d_sum, y_in, x, weight, scale, shift, "swish",  # noqa: E731
                                                           "tf_same", stride, True)  # fmt: skip
        got, want = run(None, nan_y), run(zeros, y)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "stride"), [("1x1", 1), ("3x3", 2), ("depthwise", 2)])
def test_opcheck_without_statistics(backend, kind, stride):
    require_backend(backend)
    x, weight, scale, shift, bias = (t.detach() if t is not None else None
                                     for t in conv_inputs(kind, c_in=5, c_out=6, size=(4, 6)))  # fmt: skip
    with use_backend(backend):
        if kind == "1x1":
            torch.library.opcheck(_conv1x1_op, (x, weight, scale, shift, "relu", False))
            y = _conv1x1_op(x, weight, scale, shift, "relu", False)[0]
            backward = (_conv1x1_backward_op, (torch.randn_like(y), None, None, y, x, weight, scale, shift, "relu"))
        else:
            torch.library.opcheck(_conv3x3_op, (x, weight, scale, shift, "relu", "tf_same", stride, bias, False))
            y = _conv3x3_op(x, weight, scale, shift, "relu", "tf_same", stride, bias, False)[0]
            backward = (_conv3x3_backward_op, (torch.randn_like(y), None, None, y, x, weight, scale, shift, "relu",
                                               "tf_same", stride, True))  # fmt: skip
        torch.library.opcheck(*backward)  # the statistics without a gradient (None)


@pytest.mark.parametrize(("kind", "stride"), [("1x1", 1), ("3x3", 2), ("depthwise", 1)])
def test_gradcheck_float64_without_statistics(kind, stride):
    inputs = conv_inputs(kind, torch.float64, c_in=3, c_out=4, size=(2, 4))
    leaves = [t for t in inputs if t is not None]

    def conv(*tensors):
        return call(kind, stride, (*tensors, None) if kind == "1x1" else tensors, statistics=False)[0]

    with use_backend("reference"):
        assert torch.autograd.gradcheck(conv, leaves)


@pytest.mark.parametrize("flag", [1, None, "no"])
def test_statistics_must_be_a_bool(flag):
    inputs = conv_inputs("1x1", c_in=5, c_out=6, size=(2, 2))
    with pytest.raises(TypeError, match="statistics must be a bool"):
        call("1x1", 1, inputs, statistics=flag)
    with pytest.raises(TypeError, match="statistics must be a bool"):
        call("3x3", 1, conv_inputs("3x3", c_in=5, c_out=6, size=(2, 2)), statistics=flag)
