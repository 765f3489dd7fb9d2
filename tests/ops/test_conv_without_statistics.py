"""``statistics=False`` on the conv ops (``conv1x1_bn_stats``, ``conv3x3_bn_stats`` dense and depthwise): the conv of
a BN that normalises with its running statistics (eval mode), or of a head's predictor, takes no statistics — no fill,
no reductions — and returns the same y and gradients as with them, on every backend; its backward neither reads y nor
fills a gradient for the statistics, and adds dW and the prologue's gradients into a caller's zeroed buffers where
given."""

import pytest
import torch

from spinenet_fast.ops import conv1x1_bn_stats, conv3x3_bn_stats, use_backend
from spinenet_fast.ops.conv1x1_bn_stats import _conv1x1_backward_into_op, _conv1x1_backward_op, _conv1x1_op
from spinenet_fast.ops.conv3x3_bn_stats import _conv3x3_backward_into_op, _conv3x3_backward_op, _conv3x3_op

from ..conftest import AtenOps, require_backend

BACKENDS = ["reference", "triton", "cuda"]
# (kind, stride): 37 input channels (a partial K tile), 70 output channels (a partial N tile) — 37 for depthwise
CONVS = [("1x1", 1), ("3x3", 1), ("3x3", 2), ("depthwise", 1), ("depthwise", 2)]
# per stride, x's odd-sized (H, W) — a partial pixel tile, 3 × 5 outputs either way (the interpreter runs a 3×3
# backward's programs per tap: larger maps take tens of seconds)
SIZES = {1: (3, 5), 2: (6, 10)}


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
    inputs = conv_inputs(kind, size=SIZES[stride])
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
    inputs = conv_inputs(kind, size=SIZES[stride])
    x, weight, scale, shift, bias = (t.detach() if t is not None else None for t in inputs)
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


def call_with_buffers(kind: str, stride: int, inputs, prologue_grad_buffer, weight_grad_buffer):
    x, weight, scale, shift, bias = inputs
    buffers = dict(prologue_grad_buffer=prologue_grad_buffer, weight_grad_buffer=weight_grad_buffer)
    if kind == "1x1":
        return conv1x1_bn_stats(x, weight, scale, shift, "swish", statistics=False, **buffers)
    return conv3x3_bn_stats(x, weight, scale, shift, "swish", "tf_same", stride=stride, bias=bias, statistics=False,
                            **buffers)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "stride"), CONVS)
def test_gradient_buffers_take_the_weight_and_prologue_gradients(backend, kind, stride):
    """With ``prologue_grad_buffer`` and ``weight_grad_buffer`` (zeroed slices of a module's one fill) the backward
    adds [d_scale; d_shift] and dW into them — dW is the buffer itself, no copy — and gives the gradients it gives
    without them; a second backward (the buffers used) computes its own."""
    require_backend(backend)
    inputs = conv_inputs(kind, size=SIZES[stride])
    x, weight = inputs[:2]
    leaves = [t for t in inputs if t is not None]
    with use_backend(backend):
        y, _ = call(kind, stride, inputs, statistics=False)
        grad = torch.randn_like(y)
        want = torch.autograd.grad(y, leaves, grad)
        workspace = torch.full((2 * x.shape[1] + weight.numel() + 1,), float("nan"))
        workspace[1:].zero_()  # the slices the op takes are zero; its neighbour is not (NaN: never touched)
        prologue_grad = workspace[1 : 1 + 2 * x.shape[1]].view(2, -1)
        weight_grad = workspace[1 + 2 * x.shape[1] :].view_as(weight)
        y_buffered, stats = call_with_buffers(kind, stride, inputs, prologue_grad, weight_grad)
        got = torch.autograd.grad(y_buffered, leaves, grad, retain_graph=True)
        again = torch.autograd.grad(y_buffered, leaves, grad)
    assert stats is None
    torch.testing.assert_close(y_buffered, y, rtol=0, atol=0)
    for a, b, c in zip(got, want, again):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-6)
    assert got[1].data_ptr() == weight_grad.data_ptr() and again[1].data_ptr() != weight_grad.data_ptr()
    torch.testing.assert_close(prologue_grad, torch.stack(want[2:4]), rtol=1e-6, atol=1e-6)
    assert workspace[0].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "stride"), [("1x1", 1), ("3x3", 2), ("depthwise", 1)])
def test_opcheck_backward_into_buffers(backend, kind, stride):
    require_backend(backend)
    x, weight, scale, shift, bias = (t.detach() if t is not None else None
                                     for t in conv_inputs(kind, c_in=5, c_out=6, size=(4, 6)))  # fmt: skip
    y = call(kind, stride, (x, weight, scale, shift, bias), statistics=False)[0]
    dy, buffers = torch.randn_like(y), (torch.zeros(2, x.shape[1]), torch.zeros_like(weight))
    with use_backend(backend):
        if kind == "1x1":
            torch.library.opcheck(_conv1x1_backward_into_op, (dy, x, weight, scale, shift, "relu", *buffers))
        else:
            d_bias = torch.zeros(weight.shape[0])
            torch.library.opcheck(_conv3x3_backward_into_op, (dy, x, weight, scale, shift, "relu", "tf_same", stride,
                                                              d_bias, *buffers))  # fmt: skip


@pytest.mark.parametrize(("kind", "stride"), [("1x1", 1), ("3x3", 2), ("depthwise", 1)])
def test_gradcheck_float64_with_gradient_buffers(kind, stride):
    inputs = conv_inputs(kind, torch.float64, c_in=3, c_out=4, size=(2, 4))
    leaves = [t for t in inputs if t is not None]

    def conv(*tensors):
        tensors = (*tensors, None) if kind == "1x1" else tensors
        prologue_grad = torch.zeros(2, tensors[0].shape[1], dtype=torch.float64)
        return call_with_buffers(kind, stride, tensors, prologue_grad, None)[0]

    with use_backend("reference"):
        assert torch.autograd.gradcheck(conv, leaves)


def test_gradient_buffers_bad_arguments():
    x, weight, scale, shift, _ = conv_inputs("1x1", c_in=5, c_out=6, size=(4, 6))
    prologue_grad, weight_grad = torch.zeros(2, 5), torch.zeros_like(weight)
    with pytest.raises(ValueError, match="need statistics=False"):
        conv1x1_bn_stats(x, weight, scale, shift, "relu", weight_grad_buffer=weight_grad)
    with pytest.raises(ValueError, match="prologue_grad_buffer needs a prologue"):
        conv1x1_bn_stats(x, weight, statistics=False, prologue_grad_buffer=prologue_grad)
    with pytest.raises(ValueError, match=r"prologue_grad_buffer must be a contiguous float32 \(2, 5\)"):
        conv1x1_bn_stats(x, weight, scale, shift, statistics=False, prologue_grad_buffer=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weight_grad_buffer must be a float32 tensor with the dense weight's shape"):
        conv1x1_bn_stats(x, weight, statistics=False, weight_grad_buffer=torch.zeros(6, 5, 1, 1, dtype=torch.float64))
    x16 = x.detach().bfloat16()
    with pytest.raises(ValueError, match="weight_grad_buffer needs a float32 weight"):
        conv3x3_bn_stats(x16, torch.randn(6, 5, 3, 3, dtype=torch.bfloat16), stride=1, statistics=False,
                         weight_grad_buffer=torch.zeros(6, 5, 3, 3))  # fmt: skip
