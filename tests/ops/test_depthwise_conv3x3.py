"""The depthwise 3×3 conv ((C, 1, 3, 3) weights: SpineNet-Mobile's resampling) through ``conv3x3_bn_stats`` and
``conv3x3_bn``: against eager ``F.conv2d(groups=C)`` (+ ``nn.BatchNorm2d``) and the reference, every backend, both
strides and paddings, odd sizes, batch 1, non-contiguous inputs, bf16/fp16 by the tolerance rule, float64 gradcheck
and opcheck."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.models.layers import ConvNorm
from spinenet_fast.ops import conv3x3_bn, conv3x3_bn_stats, use_backend
from spinenet_fast.ops.conv3x3_bn import _conv3x3_bn_backward_op, _conv3x3_bn_forward_op
from spinenet_fast.ops.conv3x3_bn_stats import _conv3x3_op

from ..conftest import require_backend
from .tolerance import assert_close_by_dtype, assert_low_precision_rule

CHANNELS = 37  # two channel blocks of the Triton kernels, the second partial


def inputs(dtype=torch.float32, layout="channels_last", prologue=True, batch=2, size=(6, 10), channels=CHANNELS):
    x = torch.randn(batch, channels, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(batch, channels, size[0], 2 * size[1])[..., ::2]
    weight = torch.randn(channels, 1, 3, 3) / 3
    scale = (torch.rand(channels) + 0.5).requires_grad_() if prologue else None
    shift = torch.randn(channels).requires_grad_() if prologue else None
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), scale, shift


def activated(x, scale, shift):
    return x if scale is None else F.silu(x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1))


def eager_depthwise(a, weight, padding, stride, bias=None):
    """The eager depthwise conv of the activated input a: TF ``SAME`` at stride 2 pads one pixel after only."""
    if padding == "tf_same" and stride == 2:
        return F.conv2d(F.pad(a, (0, 1, 0, 1)), weight, bias, stride=2, groups=a.shape[1])
    return F.conv2d(a, weight, bias, stride=stride, padding=1, groups=a.shape[1])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_matches_the_eager_depthwise_module(backend, padding, stride):
    """The Mobile resampling's depthwise ``ConvNorm`` conv: output, statistics and every gradient."""
    require_backend(backend)
    x, _, scale, shift = inputs()
    layer = ConvNorm(CHANNELS, CHANNELS, 3, nn.Identity, stride=stride, padding=padding, groups=CHANNELS)
    expected = layer(activated(x, scale, shift))
    with use_backend(backend):
        y, (sums, sumsq) = conv3x3_bn_stats(x, layer.conv.weight, scale, shift, "swish", padding, stride=stride)
        grad = torch.randn_like(y)
        leaves = [x, layer.conv.weight, scale, shift]
        got = torch.autograd.grad((y * grad).sum() + sums.sum() + sumsq.sum() / 10, leaves)
    want = torch.autograd.grad((expected * grad).sum() + expected.sum() + expected.pow(2).sum() / 10, leaves)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, expected.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sumsq, expected.double().pow(2).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("stride", "size", "batch"), [(1, (5, 7), 1), (2, (6, 10), 2)])  # stride 1: odd sizes
@pytest.mark.parametrize(("layout", "prologue"), [("contiguous", False), ("strided", True)])
def test_fused_backends_match_the_reference_with_a_bias(fused_backend, layout, prologue, stride, size, batch):
    x, weight, scale, shift = inputs(layout=layout, prologue=prologue, batch=batch, size=size)
    bias = torch.randn(CHANNELS, requires_grad=True)
    leaves = [t for t in (x, weight, bias, scale, shift) if t is not None]
    results = {}
    for backend in (fused_backend, "reference"):
        with use_backend(backend):
            y, stats = conv3x3_bn_stats(x, weight, scale, shift, "relu", "tf_same", stride=stride, bias=bias)
            grads = torch.autograd.grad((y * y).sum() / 100 + stats[0].sum() + stats[1].sum() / 100, leaves)
        results[backend] = (y, stats, *grads)
    for a, b in zip(results[fused_backend], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    a = F.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) if prologue else x
    torch.testing.assert_close(y, eager_depthwise(a, weight, "tf_same", stride, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(fused_backend, dtype, stride):
    """y, its statistics and dx, dW, d_scale, d_shift against fp32, no worse than eager's maths in the dtype."""
    x, weight, scale, shift = inputs(dtype)
    grad_y = torch.randn(2, CHANNELS, 6 // stride, 10 // stride)
    d_sums, d_sumsqs = torch.randn(CHANNELS), torch.randn(CHANNELS) / 10

    def loss(y, stats):
        return (y.float() * grad_y).sum() + (stats[0] * d_sums).sum() + (stats[1] * d_sumsqs).sum()

    with use_backend(fused_backend):
        y, stats = conv3x3_bn_stats(x, weight, scale, shift, "swish", "tf_same", stride=stride)
        fused = torch.autograd.grad(loss(y, stats), (x, weight, scale, shift))
    leaves32 = [x.detach().float().requires_grad_(), weight.detach().float().requires_grad_(), scale, shift]
    with use_backend("reference"):
        y32, stats32 = conv3x3_bn_stats(*leaves32, "swish", "tf_same", stride=stride)
        reference = torch.autograd.grad(loss(y32, stats32), leaves32)
    eager_y = eager_depthwise(activated(x, scale, shift), weight, "tf_same", stride)
    eager_y32 = eager_y.float()
    eager_stats = torch.stack([eager_y32.sum((0, 2, 3)), eager_y32.pow(2).sum((0, 2, 3))])
    eager = torch.autograd.grad(loss(eager_y, eager_stats), (x, weight, scale, shift))
    assert_close_by_dtype(y, y32, eager_y)
    assert_low_precision_rule(stats, stats32, eager_stats)
    for got, want, base in zip(fused, reference, eager):
        assert got.dtype == base.dtype
        assert_low_precision_rule(got, want, base)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize(("stride", "prologue"), [(1, True), (2, False), (2, True)])
def test_opcheck(backend, stride, prologue):
    require_backend(backend)
    x, weight, scale, shift = (t if t is None else t.detach() for t in inputs(size=(4, 6), prologue=prologue))
    with use_backend(backend):
        torch.library.opcheck(_conv3x3_op, (x, weight, scale, shift, "swish", "tf_same", stride, torch.randn(CHANNELS)))


@pytest.mark.parametrize(("stride", "padding"), [(1, "torch"), (2, "tf_same")])
def test_gradcheck_float64(stride, padding):
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    scale, shift, bias = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def conv(*args):
        return _conv3x3_op(*args[:4], "swish", padding, stride, args[4])

    for backend in ("reference", "cuda"):  # Triton has no float64 (its kernels are checked in fp32 above)
        require_backend(backend)
        with use_backend(backend):
            assert torch.autograd.gradcheck(conv, (x, weight, scale, shift, bias))


def bn_case(dtype=torch.float32, prologue=True, layout="channels_last", batch=2):
    x, weight, scale, shift = inputs(dtype, layout, prologue, batch)
    bn = nn.BatchNorm2d(CHANNELS, eps=1e-3, momentum=0.1)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return x, weight, scale, shift, bn


def fused_bn(backend, x, weight, scale, shift, bn, stride=2):
    with use_backend(backend):
        y, out_scale, out_shift = conv3x3_bn(
            x, weight, scale, shift, "swish" if scale is not None else "identity", "tf_same", stride=stride,
            bn_weight=bn.weight, bn_bias=bn.bias, eps=bn.eps, running_mean=bn.running_mean,
            running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked, momentum=bn.momentum,
        )  # fmt: skip
    return y * out_scale.view(1, -1, 1, 1) + out_shift.view(1, -1, 1, 1)


def twin(bn, dtype=torch.float32):
    copy = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    copy.load_state_dict(bn.state_dict())
    return copy.to(dtype)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize(("stride", "prologue", "layout", "batch"), [(2, True, "channels_last", 2),
                                                                     (2, False, "strided", 1),
                                                                     (1, True, "contiguous", 1)])  # fmt: skip
def test_conv3x3_bn_equals_depthwise_conv_then_batchnorm(backend, stride, prologue, layout, batch):
    """With its training-mode BN: output, every gradient (x, W, scale, shift, γ, β), running statistics, counter."""
    require_backend(backend)
    x, weight, scale, shift, bn = bn_case(prologue=prologue, layout=layout, batch=batch)
    bn_eager = twin(bn)
    expected = bn_eager(eager_depthwise(activated(x, scale, shift), weight, "tf_same", stride))
    grad = torch.randn_like(expected)
    leaves = [t for t in (x, weight, scale, shift) if t is not None]
    with use_backend(backend):
        out = fused_bn(backend, x, weight, scale, shift, bn, stride)
        got = torch.autograd.grad(out, [*leaves, bn.weight, bn.bias], grad)
    want = torch.autograd.grad(expected, [*leaves, bn_eager.weight, bn_eager.bias], grad)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_eager, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv3x3_bn_low_precision_gradients_tolerance_rule(fused_backend, dtype):
    x, weight, scale, shift, bn = bn_case(dtype)
    with use_backend(fused_backend):
        out = fused_bn(fused_backend, x, weight, scale, shift, bn)
        grad = torch.randn(out.shape)
        got = torch.autograd.grad(out, [x, weight, scale, shift, bn.weight, bn.bias], grad.to(out.dtype))
    fp32 = [x.detach().float().requires_grad_(), weight.detach().float().requires_grad_(), scale, shift]
    out32 = fused_bn("reference", *fp32, bn)
    want = torch.autograd.grad(out32, [*fp32, bn.weight, bn.bias], grad)
    bn_low = twin(bn, dtype)
    eager_out = bn_low(eager_depthwise(activated(x, scale, shift), weight, "tf_same", 2))
    eager = torch.autograd.grad(eager_out, [x, weight, scale, shift, bn_low.weight, bn_low.bias], grad.to(dtype))
    for got_, want_, base in zip(got, want, eager):
        assert_low_precision_rule(got_, want_, base)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_conv3x3_bn_ops_opcheck(backend):
    """The training forward (BN finalized in the conv's last program on Triton) and its backward op."""
    x, weight, scale, shift = (t.detach() for t in inputs(size=(4, 6)))
    gamma, beta = torch.rand(CHANNELS) + 0.5, torch.randn(CHANNELS)
    stats, counter = torch.zeros(2, CHANNELS), torch.zeros(1, dtype=torch.int32)
    running = (torch.zeros(CHANNELS), torch.ones(CHANNELS), torch.zeros((), dtype=torch.long))
    forward_args = (x, weight, scale, shift, "swish", "tf_same", 2, None, stats, counter, 12, gamma, beta, 1e-3,
                    *running, 0.1, 12 / 11)  # fmt: skip
    with use_backend(backend):
        torch.library.opcheck(_conv3x3_bn_forward_op, forward_args, test_utils=("test_schema", "test_faketensor"))
        y, _, _, mean, var = _conv3x3_bn_forward_op(*forward_args)
        backward_args = (torch.randn_like(y), torch.randn(CHANNELS), torch.randn(CHANNELS), y, x, weight, scale,
                         shift, "swish", "tf_same", 2, None, True, gamma, mean, var, 12, 1e-3, torch.zeros(2, CHANNELS),
                         None)  # fmt: skip
        torch.library.opcheck(_conv3x3_bn_backward_op, backward_args, test_utils=("test_schema", "test_faketensor"))


def test_bad_depthwise_weights_are_rejected():
    x = torch.randn(1, 4, 4, 4)
    dense_or_depthwise = r"\(C_out, 4, 3, 3\) or \(C_out, 4, 7, 7\) tensor \(dense\) or \(4, 1, 3, 3\) \(depthwise\)"
    with pytest.raises(ValueError, match=dense_or_depthwise):
        conv3x3_bn_stats(x, torch.randn(5, 1, 3, 3), stride=2)  # a channel multiplier is not supported
    with pytest.raises(ValueError, match=r"or \(4, 1, 3, 3\) \(depthwise\), got"):
        conv3x3_bn_stats(x, torch.randn(4, 2, 3, 3), stride=2)
    with pytest.raises(ValueError, match=r"bias must be None or a torch.float32 \(4,\) tensor"):
        conv3x3_bn_stats(x, torch.randn(4, 1, 3, 3), stride=2, bias=torch.randn(5))
    # one input channel: the dense and the depthwise conv are the same conv
    one = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(conv3x3_bn_stats(one, torch.ones(1, 1, 3, 3), stride=1)[0],
                               F.conv2d(one, torch.ones(1, 1, 3, 3), padding=1))  # fmt: skip
