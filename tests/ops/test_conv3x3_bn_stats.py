"""``conv3x3_bn_stats`` against the eager model's module and its reference, in both padding modes and both strides."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.models.layers import ConvNorm
from spinenet_fast.ops import conv3x3_bn_stats, use_backend
from spinenet_fast.ops.conv3x3_bn_stats import _conv3x3_op

from ..conftest import require_backend
from .tolerance import assert_close_by_dtype, assert_low_precision_rule


def eager_conv(a, weight, padding, stride):
    """The eager 3×3 conv of the activated input a: TF ``SAME`` at stride 2 pads one pixel after only."""
    if padding == "tf_same" and stride == 2:
        return F.conv2d(F.pad(a, (0, 1, 0, 1)), weight, stride=2)
    return F.conv2d(a, weight, stride=stride, padding=1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("prologue", [False, True])
def test_conv3x3_matches_the_eager_module(padding, prologue, stride):
    x = torch.randn(1, 5, 6, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = ConvNorm(5, 7, 3, nn.Identity, stride=stride, padding=padding)
    scale = torch.randn(5, requires_grad=True) if prologue else None
    shift = torch.randn(5, requires_grad=True) if prologue else None
    a = F.silu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) if prologue else x
    expected = layer(a)
    y, (sums, sumsq) = conv3x3_bn_stats(x, layer.conv.weight, scale, shift, "swish", padding, stride=stride)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, expected.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sumsq, expected.double().pow(2).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(y)
    leaves = [t for t in (x, layer.conv.weight, scale, shift) if t is not None]
    got = torch.autograd.grad((y * grad).sum() + sums.sum() + sumsq.sum() / 10, leaves)
    want = torch.autograd.grad((expected * grad).sum() + expected.sum() + expected.pow(2).sum() / 10, leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_strided_scale_and_shift(backend, stride):
    """scale/shift slices of a wider tensor (stride 2): the kernels address them densely, so they are compacted."""
    require_backend(backend)
    x = torch.randn(2, 5, 4, 6)
    table = torch.randn(5, 2)
    weight = torch.randn(6, 5, 3, 3)
    with use_backend(backend):
        got = conv3x3_bn_stats(x, weight, table[:, 0], table[:, 1], "swish", "torch", stride=stride)
    with use_backend("reference"):
        want = conv3x3_bn_stats(x, weight, table[:, 0].contiguous(), table[:, 1].contiguous(), "swish", "torch",
                                stride=stride)  # fmt: skip
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def conv_inputs(device, dtype, layout, prologue=True, batch=1, size=(6, 10)):
    x = torch.randn(batch, 37, *size, device=device)  # 37 channels, 70 outputs: several K and N tiles
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(batch, 37, size[0], 2 * size[1], device=device)[..., ::2]
    weight = torch.randn(70, 37, 3, 3, device=device) / 20
    scale = torch.randn(37, device=device).requires_grad_() if prologue else None
    shift = torch.randn(37, device=device).requires_grad_() if prologue else None
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), scale, shift


@pytest.mark.parametrize(("stride", "size"), [(1, (5, 7)), (2, (6, 10))])  # stride 1: odd sizes
@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize(("layout", "prologue"), [("channels_last", True), ("contiguous", False), ("strided", True)])
def test_conv3x3_fused_backends_match_the_reference(device, fused_backend, padding, layout, prologue, stride, size):
    inputs = conv_inputs(device, torch.float32, layout, prologue, size=size)
    leaves = [t for t in inputs if t is not None]
    results = {}
    for backend in (fused_backend, "reference"):
        with use_backend(backend):
            y, stats = conv3x3_bn_stats(*inputs, "swish", padding, stride=stride)
            grads = torch.autograd.grad((y * y).sum() / 100 + stats[0].sum() + stats[1].sum() / 100, leaves)
        results[backend] = (y, stats, *grads)
    for a, b in zip(results[fused_backend], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert results[fused_backend][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv3x3_fused_low_precision_tolerance_rule(device, fused_backend, dtype, stride):
    x, weight, scale, shift = conv_inputs(device, dtype, "channels_last", batch=2)
    with use_backend(fused_backend):
        y, (sums, _) = conv3x3_bn_stats(x, weight, scale, shift, "swish", "tf_same", stride=stride)
    with use_backend("reference"):
        y32, (sums32, _) = conv3x3_bn_stats(x.detach().float(), weight.detach().float(), scale, shift, "swish",
                                            "tf_same", stride=stride)  # fmt: skip
    a = F.silu(x * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1))
    eager = eager_conv(a, weight, "tf_same", stride)
    assert_close_by_dtype(y, y32, eager)
    eager_sums = eager.float().sum((0, 2, 3))
    assert (sums - sums32).abs().max() <= 2 * (eager_sums - sums32).abs().max() + 1e-2 * sums32.abs().max()


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_triton_opcheck(stride):
    x, weight, scale, shift = (t.detach() if t is not None else None for t in conv_inputs("cpu", torch.float32, "x"))
    with use_backend("triton"):
        torch.library.opcheck(_conv3x3_op, (x, weight, scale, shift, "relu", "torch", stride, None))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv3x3_fused_low_precision_gradients_tolerance_rule(device, fused_backend, dtype, stride):
    """dx, dW, d_scale, d_shift through the statistics too, against fp32, no worse than eager's maths allows."""
    x, weight, scale, shift = conv_inputs(device, dtype, "channels_last", batch=2)
    grad_y = torch.randn(2, 70, 6 // stride, 10 // stride, device=device)
    d_sums, d_sumsqs = torch.randn(70, device=device), torch.randn(70, device=device) / 10

    def loss(y, stats):
        return (y.float() * grad_y).sum() + (stats[0] * d_sums).sum() + (stats[1] * d_sumsqs).sum()

    with use_backend(fused_backend):
        fused = torch.autograd.grad(loss(*conv3x3_bn_stats(x, weight, scale, shift, "swish", "tf_same", stride=stride)),
                                    (x, weight, scale, shift))  # fmt: skip
    leaves32 = [x.detach().float().requires_grad_(), weight.detach().float().requires_grad_(), scale, shift]
    with use_backend("reference"):
        reference = torch.autograd.grad(loss(*conv3x3_bn_stats(*leaves32, "swish", "tf_same", stride=stride)), leaves32)
    a = F.silu(x * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1))
    eager_y = eager_conv(a, weight, "tf_same", stride)
    eager_y32 = eager_y.float()
    eager_stats = torch.stack([eager_y32.sum((0, 2, 3)), eager_y32.pow(2).sum((0, 2, 3))])
    eager = torch.autograd.grad(loss(eager_y, eager_stats), (x, weight, scale, shift))
    for got, want, base in zip(fused, reference, eager):
        assert got.dtype == base.dtype
        assert_low_precision_rule(got, want, base)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_fp32_master_weight_with_low_precision_input(backend, stride):
    """An fp32 weight with a bf16 x gives the forward of the bf16-rounded weight and an fp32 weight gradient."""
    require_backend(backend)
    x, weight, scale, shift = conv_inputs("cpu", torch.bfloat16, "channels_last", batch=2)
    master = weight.detach().float().requires_grad_()
    with use_backend(backend):
        y, stats = conv3x3_bn_stats(x, master, scale, shift, "swish", "torch", stride=stride)
        y_rounded, stats_rounded = conv3x3_bn_stats(x, weight, scale, shift, "swish", "torch", stride=stride)
        (d_master,) = torch.autograd.grad((y.float() ** 2).sum() + stats.sum(), (master,))
        (d_rounded,) = torch.autograd.grad((y_rounded.float() ** 2).sum() + stats_rounded.sum(), (weight,))
    torch.testing.assert_close(y, y_rounded, rtol=0, atol=0)
    torch.testing.assert_close(stats, stats_rounded, rtol=1e-6, atol=1e-3)  # atomic adds in any order
    assert d_master.dtype == torch.float32
    torch.testing.assert_close(d_master, d_rounded.float(), rtol=2e-2, atol=2e-2)


def test_conv3x3_weight_on_another_device_is_rejected():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="weight must be on cpu like x, got meta"):
        conv3x3_bn_stats(x, torch.empty(3, 2, 3, 3, device="meta"), stride=2)


@pytest.mark.parametrize(("stride", "padding"), [(1, "torch"), (2, "tf_same")])
def test_gradcheck_float64_through_the_op(stride, padding):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def conv(x, weight, scale, shift, bias):
        return _conv3x3_op(x, weight, scale, shift, "swish", padding, stride, bias)

    with use_backend("reference"):
        assert torch.autograd.gradcheck(conv, (x, weight, scale, shift, bias))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck(backend, prologue, stride):
    require_backend(backend)
    x = torch.randn(1, 2, 4, 4)
    scale, shift = (torch.randn(2), torch.randn(2)) if prologue else (None, None)
    with use_backend(backend):
        torch.library.opcheck(_conv3x3_op, (x, torch.randn(3, 2, 3, 3), scale, shift, "relu", "torch", stride, None))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_opcheck_with_bias(backend):
    """The bias and its gradient (added into a zeroed buffer by the backward op) through opcheck's autograd checks."""
    require_backend(backend)
    x, weight, scale, shift = (t.detach() for t in conv_inputs("cpu", torch.float32, "channels_last", size=(4, 6)))
    with use_backend(backend):
        torch.library.opcheck(_conv3x3_op, (x, weight, scale, shift, "relu", "torch", 1, torch.randn(70)))


@pytest.mark.parametrize(("stride", "size"), [(1, (5, 7)), (2, (6, 10))])
@pytest.mark.parametrize("prologue", [False, True])
def test_conv3x3_bias_matches_the_eager_conv(device, fused_backend, prologue, stride, size):
    """y = conv + bias, its statistics and every gradient (the bias' too) against ``F.conv2d`` with a bias."""
    x, weight, scale, shift = conv_inputs(device, torch.float32, "channels_last", prologue, batch=2, size=size)
    bias = torch.randn(70, device=device, requires_grad=True)
    leaves = [t for t in (x, weight, bias, scale, shift) if t is not None]
    a = F.silu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) if prologue else x
    expected = F.conv2d(a, weight, bias, stride=stride, padding=1)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad((expected * grad).sum() + expected.sum() + expected.pow(2).sum() / 100, leaves)
    with use_backend(fused_backend):
        y, stats = conv3x3_bn_stats(x, weight, scale, shift, "swish" if prologue else "identity", "torch",
                                    stride=stride, bias=bias)  # fmt: skip
        got = torch.autograd.grad((y * grad).sum() + stats[0].sum() + stats[1].sum() / 100, leaves)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[0], expected.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv3x3_bias_low_precision_tolerance_rule(device, fused_backend, dtype):
    """An fp32 master bias with a low-precision x (the head under autocast): y and d_bias by the tolerance rule."""
    x, weight, scale, shift = conv_inputs(device, dtype, "channels_last", batch=2)
    bias = torch.randn(70, device=device, requires_grad=True)
    grad_y = torch.randn(2, 70, 6, 10, device=device)
    with use_backend(fused_backend):
        y, _ = conv3x3_bn_stats(x, weight, scale, shift, "swish", "torch", stride=1, bias=bias)
        (d_bias,) = torch.autograd.grad((y.float() * grad_y).sum(), (bias,))
    leaves32 = [x.detach().float(), weight.detach().float(), scale, shift]
    bias32 = bias.detach().to(dtype).float().requires_grad_()
    with use_backend("reference"):
        y32, _ = conv3x3_bn_stats(*leaves32, "swish", "torch", stride=1, bias=bias32)
        (d_bias32,) = torch.autograd.grad((y32 * grad_y).sum(), (bias32,))
    a = F.silu(x * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1))
    eager = F.conv2d(a, weight, bias.to(dtype), padding=1)
    (d_bias_eager,) = torch.autograd.grad((eager.float() * grad_y).sum(), (bias,))
    assert d_bias.dtype == torch.float32
    assert_low_precision_rule(y, y32, eager)
    assert_low_precision_rule(d_bias, d_bias32, d_bias_eager)


def test_bad_input():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"x must have even H and W"):
        conv3x3_bn_stats(torch.randn(1, 2, 5, 4), torch.randn(3, 2, 3, 3), stride=2)
    message = r"weight must be a torch.float32 \(C_out, 2, 3, 3\) or \(C_out, 2, 7, 7\) tensor \(dense\) or \(2, 1, 3"
    for shape in ((3, 2, 1, 1), (3, 2, 5, 5), (2, 1, 7, 7)):  # a 1×1, a 5×5, a depthwise 7×7
        with pytest.raises(ValueError, match=message):
            conv3x3_bn_stats(x, torch.randn(shape), stride=1)
    with pytest.raises(ValueError, match="padding must be one of"):
        conv3x3_bn_stats(x, torch.randn(3, 2, 3, 3), padding="same", stride=1)
    with pytest.raises(ValueError, match=r"bias must be None or a torch.float32 \(3,\) tensor on cpu, got"):
        conv3x3_bn_stats(x, torch.randn(3, 2, 3, 3), stride=1, bias=torch.randn(4))
    with pytest.raises(ValueError, match=r"bias must be None or a torch.float32 \(3,\) tensor"):
        conv3x3_bn_stats(x, torch.randn(3, 2, 3, 3), stride=1, bias=torch.randn(3, dtype=torch.float64))
    for stride in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match=f"stride must be 1 or 2, got {stride!r}"):
            conv3x3_bn_stats(x, torch.randn(3, 2, 3, 3), stride=stride)
    assert conv3x3_bn_stats(torch.randn(1, 2, 5, 3), torch.randn(3, 2, 3, 3), stride=1)[0].shape == (1, 3, 5, 3)


# SpineNet's stem: a 7×7 stride-2 conv of the 3-channel image (no prologue), the op's one window other than 3×3.


def stem_inputs(device, dtype, layout="channels_last", batch=2, size=(10, 14), channels=40):
    x = torch.randn(batch, 3, *size, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(batch, 3, size[0], 2 * size[1], device=device)[..., ::2]
    weight = torch.randn(channels, 3, 7, 7, device=device) / 10  # 40 outputs: two N tiles of the fp32 dot's 32
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()


def eager_stem(weight, padding):
    """The eager model's stem conv layer (``ConvNorm``'s: TF ``SAME`` pads 2 before, 3 after) with a copy of
    ``weight``."""
    layer = ConvNorm(3, weight.shape[0], 7, nn.Identity, stride=2, padding=padding).to(weight.device, weight.dtype)
    layer.conv.weight.data.copy_(weight.detach())
    return layer


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize(
    ("padding", "layout", "batch"),
    [
        ("torch", "channels_last", 2),
        ("tf_same", "channels_last", 2),
        ("torch", "contiguous", 1),
        ("tf_same", "strided", 2),
    ],
)
def test_conv7x7_matches_the_eager_stem(backend, padding, layout, batch):
    """y, its statistics and every gradient (x's too) as the eager stem conv's, fp32."""
    require_backend(backend)
    x, weight = stem_inputs("cpu", torch.float32, layout, batch)
    eager_x, layer = x.detach().clone().requires_grad_(), eager_stem(weight, padding)
    expected = layer(eager_x)
    grad = torch.randn_like(expected)
    with use_backend(backend):
        y, (sums, sumsq) = conv3x3_bn_stats(x, weight, None, None, "identity", padding, stride=2)
        got = torch.autograd.grad((y * grad).sum() + sums.sum() + sumsq.sum() / 10, (x, weight))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums, expected.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(sumsq, expected.double().pow(2).sum((0, 2, 3)), rtol=1e-5, atol=1e-3)
    want = torch.autograd.grad((expected * grad).sum() + expected.sum() + expected.pow(2).sum() / 10,
                               (eager_x, layer.conv.weight))  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv7x7_fused_low_precision_tolerance_rule(device, fused_backend, dtype):
    """y and dx, dW through the statistics, against fp32, no worse than eager's maths allows."""
    x, weight = stem_inputs(device, dtype)
    grad_y = torch.randn(2, 40, 5, 7, device=device)
    d_sums, d_sumsqs = torch.randn(40, device=device), torch.randn(40, device=device) / 10

    def loss(y, stats):
        return (y.float() * grad_y).sum() + (stats[0] * d_sums).sum() + (stats[1] * d_sumsqs).sum()

    with use_backend(fused_backend):
        y, stats = conv3x3_bn_stats(x, weight, None, None, "identity", "tf_same", stride=2)
        fused = torch.autograd.grad(loss(y, stats), (x, weight))
    leaves32 = [x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()]
    with use_backend("reference"):
        y32, stats32 = conv3x3_bn_stats(*leaves32, None, None, "identity", "tf_same", stride=2)
        reference = torch.autograd.grad(loss(y32, stats32), leaves32)
    eager_y = eager_stem(weight, "tf_same")(x)
    eager_stats = torch.stack([eager_y.float().sum((0, 2, 3)), eager_y.float().pow(2).sum((0, 2, 3))])
    assert_close_by_dtype(y, y32, eager_y)
    eager = torch.autograd.grad(loss(eager_y, eager_stats), (x,))
    assert_low_precision_rule(fused[0], reference[0], eager[0])
    assert fused[1].dtype == dtype
    torch.testing.assert_close(fused[1].float(), reference[1], rtol=2e-2, atol=2e-2 * reference[1].abs().max().item())


def test_conv7x7_gradcheck_float64():
    x = torch.randn(1, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 7, 7, dtype=torch.float64, requires_grad=True)

    def conv(x, weight):
        return _conv3x3_op(x, weight, None, None, "identity", "tf_same", 2, None)

    with use_backend("reference"):
        assert torch.autograd.gradcheck(conv, (x, weight))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_conv7x7_opcheck(backend):
    require_backend(backend)
    x, weight = (t.detach() for t in stem_inputs("cpu", torch.float32, size=(6, 8), channels=5))
    with use_backend(backend):
        torch.library.opcheck(_conv3x3_op, (x, weight, None, None, "identity", "tf_same", 2, None))
