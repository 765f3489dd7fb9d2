"""``conv1x1_bn_pair`` — two 1×1 conv + training-mode BN of one input, their backward one launch — against eager
``F.conv2d`` + ``nn.BatchNorm2d`` twice and against its reference backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.ops import conv1x1_bn_pair, use_backend
from spinenet_fast.ops.conv1x1_bn_pair import _conv1x1_bn_pair_backward_op

from ..conftest import require_backend
from .tolerance import assert_low_precision_rule

BACKENDS = ["reference", "triton", "cuda"]
WIDTHS = (70, 45)  # the two convs' output channels (odd, more than one tile of the first)


def make_case(dtype=torch.float32, *, layout="channels_last", batch=2, c_in=37, h=5, w=7):
    """Leaves x and the two weights, and the two BN modules (random affine parameters, different eps)."""
    x = torch.randn(batch, 2 * c_in if layout == "strided" else c_in, h, w)
    x = x[:, ::2] if layout == "strided" else x
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weights = [(torch.randn(c, c_in, 1, 1) / c_in**0.5).to(dtype).requires_grad_() for c in WIDTHS]
    bns = [nn.BatchNorm2d(c, eps=eps) for c, eps in zip(WIDTHS, (1e-3, 1e-5))]
    for bn in bns:
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    return x.to(dtype).requires_grad_(), weights, bns


def bn_kwargs(bn: nn.BatchNorm2d) -> dict:
    buffers = dict(running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked)
    return dict(bn_weight=bn.weight, bn_bias=bn.bias, eps=bn.eps, momentum=bn.momentum, **buffers)


def fused(x, weights, bns) -> list[torch.Tensor]:
    """BN_a(conv_a(x)), BN_b(conv_b(x)) from the pair op (on the backend in use), the BNs' buffers updated."""
    y_a, scale_a, shift_a, y_b, scale_b, shift_b = conv1x1_bn_pair(x, *weights, bn_a=bn_kwargs(bns[0]),
                                                                   bn_b=bn_kwargs(bns[1]))  # fmt: skip
    return [y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) for y, scale, shift in
            ((y_a, scale_a, shift_a), (y_b, scale_b, shift_b))]  # fmt: skip


def eager(x, weights, bns) -> list[torch.Tensor]:
    return [bn(F.conv2d(x, weight)) for weight, bn in zip(weights, bns)]


def copy_of(bn: nn.BatchNorm2d, dtype=torch.float32) -> nn.BatchNorm2d:
    twin = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    twin.load_state_dict(bn.state_dict())
    return twin.to(dtype)


def leaves(x, weights, bns) -> list[torch.Tensor]:
    return [x, *weights, *(p for bn in bns for p in (bn.weight, bn.bias))]


def gradients(outputs, inputs, grads) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(outputs, inputs, grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("layout", "batch"), [("channels_last", 2), ("contiguous", 1), ("strided", 1)])
def test_equals_two_convs_then_batchnorms(backend, layout, batch):
    """Both outputs, every gradient (x: both convs' summed; the weights, γ, β), running statistics and counters (fp32;
    batch 1, NCHW and channel-strided inputs)."""
    require_backend(backend)
    x, weights, bns = make_case(layout=layout, batch=batch)
    twins = [copy_of(bn) for bn in bns]
    expected = eager(x, weights, twins)
    grads = [torch.randn_like(e) for e in expected]
    with use_backend(backend):  # the backward picks its backend when it runs
        out = fused(x, weights, bns)
        got = gradients(out, leaves(x, weights, bns), grads)
    want = gradients(expected, leaves(x, weights, twins), grads)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    for bn, twin in zip(bns, twins):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(twin, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_without_a_gradient(backend):
    """Autograd passes no gradient for the unused conv's outputs: its terms are zeros, its parameters get zeros."""
    require_backend(backend)
    x, weights, bns = make_case()
    twins = [copy_of(bn) for bn in bns]
    with use_backend(backend):
        out = fused(x, weights, bns)
        grad = torch.randn_like(out[1])
        got = gradients(out[1], [x, weights[0], weights[1]], grad)
    want = gradients(eager(x, weights, twins)[1], [x, weights[1]], grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(got[2], want[1], rtol=1e-4, atol=2e-4)
    assert not got[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradients_into_buffers_and_a_second_backward(backend):
    """``weight_grad_buffer`` (and the statistics' buffers) in each BN's arguments: the first backward adds dW into
    them (autograd passes the buffers on as the gradients); a second backward through the same graph
    (``retain_graph``) gets its own, equal ones."""
    require_backend(backend)
    x, weights, bns = make_case()
    expected = eager(x, weights, [copy_of(bn) for bn in bns])
    grads = [torch.randn_like(e) for e in expected]
    want = gradients(expected, [x, *weights], grads)
    buffers = [torch.zeros(w.shape) for w in weights]
    kwargs = [bn_kwargs(bn) | dict(weight_grad_buffer=b, stats_buffer=torch.zeros(2, c, dtype=torch.float64))
              for bn, b, c in zip(bns, buffers, WIDTHS)]  # fmt: skip
    with use_backend(backend):
        y_a, scale_a, shift_a, y_b, scale_b, shift_b = conv1x1_bn_pair(x, *weights, bn_a=kwargs[0], bn_b=kwargs[1])
        out = [y_a * scale_a.view(1, -1, 1, 1) + shift_a.view(1, -1, 1, 1),
               y_b * scale_b.view(1, -1, 1, 1) + shift_b.view(1, -1, 1, 1)]  # fmt: skip
        first = torch.autograd.grad(out, [x, *weights], grads, retain_graph=True)
        second = torch.autograd.grad(out, [x, *weights], grads)
    assert [g.data_ptr() for g in first[1:]] == [b.data_ptr() for b in buffers]
    for got in (first, second, (first[0], *buffers)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_tolerance_rule(backend, dtype):
    """Every gradient in bf16/fp16 against fp32, no worse than eager conv + BN in the same dtype (37 input channels:
    one tile, so the Triton backward's fp16 tensor-core dots recompute y_a, y_b from the x tile instead of reading
    them; fp32 and, under the interpreter, bf16 take IEEE dots and read them)."""
    require_backend(backend)
    x, weights, bns = make_case(dtype, h=10, w=12)
    with use_backend(backend):
        out = fused(x, weights, bns)
        grads = [torch.randn(o.shape) for o in out]
        got = gradients(out, leaves(x, weights, bns), [g.to(o.dtype) for g, o in zip(grads, out)])
    fp32 = [x.detach().float().requires_grad_(), [w.detach().float().requires_grad_() for w in weights]]
    with use_backend("reference"):
        out32 = fused(*fp32, bns)
    want = gradients(out32, leaves(*fp32, bns), grads)
    lows = [copy_of(bn, dtype) for bn in bns]
    eager_grads = gradients(eager(x, weights, lows), leaves(x, weights, lows), [g.to(dtype) for g in grads])
    for got_, want_, base in zip(got, want, eager_grads):
        assert_low_precision_rule(got_, want_, base)


def test_gradcheck_float64():
    x, weights, _ = make_case(torch.float64, c_in=3, h=3, w=4)
    weights = [w[:4].detach().requires_grad_() for w in weights]  # 4 output channels each
    params = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(4)]

    def fn(x, weight_a, weight_b, gamma_a, beta_a, gamma_b, beta_b):
        return conv1x1_bn_pair(x, weight_a, weight_b, bn_a=dict(bn_weight=gamma_a, bn_bias=beta_a, eps=1e-3),
                               bn_b=dict(bn_weight=gamma_b, bn_bias=beta_b, eps=1e-5))  # fmt: skip

    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, *weights, *params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_matches_the_reference_and_opcheck(backend):
    """The backward op against its reference (dx summed, each conv's dW and [dγ; dβ]), dW returned or added into the
    caller's zeroed buffers; opcheck both ways."""
    require_backend(backend)
    x = torch.randn(2, 5, 4, 6).contiguous(memory_format=torch.channels_last)
    convs = []
    for c_out in (6, 3):
        weight = torch.randn(c_out, 5, 1, 1)
        y = F.conv2d(x, weight).contiguous(memory_format=torch.channels_last)
        vectors = [torch.randn(c_out), torch.randn(c_out), torch.randn(c_out), torch.randn(c_out),
                   torch.rand(c_out) + 0.5]  # fmt: skip
        convs.append([torch.randn_like(y), *vectors[:2], y, weight, *vectors[2:], 1e-3])
    args = lambda d_a, d_b: (x, *convs[0], d_a, *convs[1], d_b, 48)  # noqa: E731
    with use_backend("reference"):
        want = _conv1x1_bn_pair_backward_op(*args(None, None))
    with use_backend(backend):
        got = _conv1x1_bn_pair_backward_op(*args(None, None))
        torch.library.opcheck(_conv1x1_bn_pair_backward_op, args(None, None))
        buffers = [torch.zeros_like(conv[4]) for conv in convs]
        into = _conv1x1_bn_pair_backward_op(*args(*buffers))
        torch.library.opcheck(_conv1x1_bn_pair_backward_op, args(*(torch.zeros_like(b) for b in buffers)))
    assert len(got) == len(want) == len(into) == 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert into[1].numel() == into[3].numel() == 0
    for buffer, expected in zip(buffers, (want[1], want[3])):
        torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-4)
    for i in (0, 2, 4):
        torch.testing.assert_close(into[i], want[i], rtol=1e-5, atol=1e-4)


def test_triton_backward_is_one_launch(monkeypatch):
    """Both convs' dgrad and wgrad GEMMs: one launch of the pair kernel, none of the single conv's backward."""
    from spinenet_fast.kernels import conv1x1_backward

    launched = []
    for name in ("conv1x1_bn_pair_backward", "conv1x1_bn_stats_backward"):
        original = getattr(conv1x1_backward, name)
        monkeypatch.setattr(conv1x1_backward, name,
                            lambda *a, _f=original, _n=name, **k: launched.append(_n) or _f(*a, **k))  # fmt: skip
    x, weights, bns = make_case(h=3, w=3)
    with use_backend("triton"):
        out = fused(x, weights, bns)
        torch.autograd.grad(out, leaves(x, weights, bns), [torch.ones_like(o) for o in out])
    assert launched == ["conv1x1_bn_pair_backward"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(bn_a=[1]), TypeError, r"bn_a must be a dict of bn_weight, bn_bias, eps"),
        (lambda a: a["bn_b"].pop("eps"), TypeError, r"bn_b must be a dict of .* got \['bn_bias', 'bn_weight'\]"),
        (lambda a: a["bn_a"].update(prologue_grad_buffer=None), TypeError, "bn_a must be a dict"),
        (lambda a: a["bn_b"].update(bn_weight=torch.ones(5)), ValueError, r"weight must be a float tensor of shape"),
        (lambda a: a["bn_a"].update(eps=0.0), ValueError, "eps must be positive"),
        (
            lambda a: a.update(weight_b=torch.zeros(3, 4, 1, 1)),
            ValueError,
            r"weight must have shape \(C_out, 5, 1, 1\)",
        ),
        (lambda a: a.update(x=a["x"][:1, :, :1, :1]), ValueError, r"count must be an int >= 2"),
    ],
)
def test_bad_input_is_rejected_before_any_launch(change, error, match):
    x = torch.randn(2, 5, 2, 3)
    bn = lambda c: dict(bn_weight=torch.ones(c), bn_bias=torch.zeros(c), eps=1e-3)  # noqa: E731
    args = dict(x=x, weight_a=torch.randn(6, 5, 1, 1), weight_b=torch.randn(3, 5, 1, 1), bn_a=bn(6), bn_b=bn(3))
    change(args)
    with pytest.raises(error, match=match):
        conv1x1_bn_pair(**args)
