"""``conv1x1_bn_stats`` (Triton GEMM under the interpreter) against its reference and eager conv + BN."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.ops import bn_finalize, conv1x1_bn_stats, use_backend
from spinenet_fast.ops.conv1x1_bn_stats import _conv1x1_op

from ..conftest import require_backend
from .tolerance import assert_close_by_dtype, assert_low_precision_rule

# Defaults: 37 input channels (several K tiles, the last partial), 70 output channels (several N tiles), 1×5×7
# pixels (a partial M tile), for every tile configuration in kernels/gemm_config.py.


def make_inputs(device, dtype, *, prologue, layout="channels_last", batch=1, c_in=37, c_out=70, h=5, w=7):
    x = torch.randn(batch, c_in, h, w, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(batch, 2 * c_in, h, w, device=device)[:, ::2]
    weight = torch.randn(c_out, c_in, 1, 1, device=device) / c_in**0.5
    scale = torch.randn(c_in, device=device).requires_grad_() if prologue else None
    shift = torch.randn(c_in, device=device).requires_grad_() if prologue else None
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), scale, shift


def run(backend, inputs, activation, grads):
    leaves = [t for t in inputs if t is not None]
    with use_backend(backend):  # the backward chooses its backend when it runs: inside the block
        outputs = conv1x1_bn_stats(*inputs, activation)
        return outputs, torch.autograd.grad(outputs, leaves, grads)


def output_grads(like, c_out):
    """Gradients of y and of the statistics [Σy; Σy²] (the second row smaller: Σy² is larger)."""
    return torch.randn_like(like), torch.randn(2, c_out, device=like.device) * torch.tensor([[1.0], [0.1]])


@pytest.mark.parametrize(("prologue", "activation"), [(False, "identity"), (True, "relu"), (True, "swish")])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_forward_backward_fp32(device, fused_backend, prologue, activation, layout):
    inputs = make_inputs(device, torch.float32, prologue=prologue, layout=layout)
    with use_backend("reference"):
        y = conv1x1_bn_stats(*inputs, activation)[0]
    grads = output_grads(y, 70)
    fused, fused_grads = run(fused_backend, inputs, activation, grads)
    reference, reference_grads = run("reference", inputs, activation, grads)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(device, fused_backend, dtype):
    x, weight, scale, shift = make_inputs(device, dtype, prologue=True, batch=2)
    grads = output_grads(x.new_empty(2, 70, 5, 7), 70)
    (y, stats), _ = run(fused_backend, (x, weight, scale, shift), "swish", grads)
    sums = stats[0]
    fp32 = (x.detach().float(), weight.detach().float(), scale, shift)
    with use_backend("reference"):
        y32, stats32 = conv1x1_bn_stats(*fp32, "swish")
    sums32 = stats32[0]
    eager = F.conv2d(F.silu(x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)), weight)
    assert y.dtype == dtype and sums.dtype == torch.float64
    assert_close_by_dtype(y, y32, eager)
    eager_sums = eager.float().sum((0, 2, 3))
    assert (sums - sums32).abs().max() <= 2 * (eager_sums - sums32).abs().max() + 1e-2 * sums32.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_tolerance_rule(device, fused_backend, dtype):
    """dx, dW, d_scale, d_shift in bf16/fp16 against fp32, no worse than eager's autocast-style maths allows."""
    x, weight, scale, shift = make_inputs(device, dtype, prologue=True, batch=2, h=9, w=11)
    grads = [g.to(dtype) if i == 0 else g for i, g in enumerate(output_grads(x.new_empty(2, 70, 9, 11), 70))]
    _, fused = run(fused_backend, (x, weight, scale, shift), "swish", grads)
    fp32_leaves = [t.detach().float().requires_grad_() for t in (x, weight)] + [scale, shift]
    _, reference = run("reference", fp32_leaves, "swish", [g.float() for g in grads])

    def eager(*leaves):  # the same maths as nn.Conv2d + BN statistics in dtype, as autocast runs them
        xx, ww, ss, bb = leaves
        y = F.conv2d(F.silu(xx * ss.to(xx.dtype).view(1, -1, 1, 1) + bb.to(xx.dtype).view(1, -1, 1, 1)), ww)
        return y, torch.stack([y.float().sum((0, 2, 3)), y.float().pow(2).sum((0, 2, 3))])

    eager_outputs = eager(x, weight, scale, shift)
    eager_grads = torch.autograd.grad(eager_outputs, (x, weight, scale, shift), grads)
    for name, got, want, base in zip(("dx", "dW", "d_scale", "d_shift"), fused, reference, eager_grads):
        assert got.dtype == base.dtype, name
        assert_low_precision_rule(got, want, base)  # the fp32 vectors too: they reduce low-precision products


def test_fp32_master_weight_with_low_precision_input(fused_backend):
    """An fp32 weight with a bf16 x is rounded as autocast rounds it; its gradient comes back fp32."""
    x, weight, scale, shift = make_inputs("cpu", torch.bfloat16, prologue=True, batch=2)
    master = weight.detach().float().requires_grad_()
    grads = output_grads(x.new_empty(2, 70, 5, 7), 70)
    rounded, rounded_grads = run(fused_backend, (x, master.detach().bfloat16().requires_grad_(), scale, shift),
                                 "swish", grads)  # fmt: skip
    outputs, leaf_grads = run(fused_backend, (x, master, scale, shift), "swish", grads)
    for a, b in zip(outputs, rounded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert leaf_grads[1].dtype == torch.float32
    torch.testing.assert_close(leaf_grads[1], rounded_grads[1].float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError, match=r"weight must be torch\.float32 on cpu like x, got torch\.bfloat16"):
        conv1x1_bn_stats(x.float(), weight, scale, shift, "swish")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_strided_vectors_and_expanded_statistic_gradients(backend):
    """scale/shift slices of a wider tensor and stride-0 gradients of Σ, Σ² (what ``sum().backward()`` passes)."""
    require_backend(backend)
    x, weight, _, _ = make_inputs("cpu", torch.float32, prologue=False, batch=2)
    table = torch.randn(37, 2, requires_grad=True)
    scale, shift = table[:, 0], table[:, 1]
    with use_backend(backend):
        y, stats = conv1x1_bn_stats(x, weight, scale, shift, "swish")
        got = torch.autograd.grad((y * y).sum() + stats.sum(), (x, weight, table))
    with use_backend("reference"):
        y_ref, stats_ref = conv1x1_bn_stats(x, weight, scale.contiguous(), shift.contiguous(), "swish")
        want = torch.autograd.grad((y_ref * y_ref).sum() + stats_ref.sum(), (x, weight, table))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_chain_with_bn_finalize_equals_conv_then_batchnorm(backend):
    require_backend(backend)  # bn_finalize's cuda backend is the compiled extension
    x, weight, _, _ = make_inputs("cpu", torch.float32, prologue=False, batch=2)
    bn = nn.BatchNorm2d(70, eps=1e-3, momentum=0.01)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    expected = bn(F.conv2d(x, weight))
    with use_backend(backend):
        y, stats = conv1x1_bn_stats(x, weight)
        scale, shift = bn_finalize(stats, 2 * 5 * 7, bn.weight, bn.bias, eps=1e-3)
    out = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    leaves = (x, weight, bn.weight, bn.bias)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64_through_the_op():
    x, weight, scale, shift = make_inputs("cpu", torch.float64, prologue=True, c_in=3, c_out=4, h=2, w=3)
    scale, shift = (t.detach().double().requires_grad_() for t in (scale, shift))
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *t: _conv1x1_op(*t, "swish"), (x, weight, scale, shift))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("prologue", [False, True])
def test_opcheck(backend, prologue):
    x, weight, scale, shift = make_inputs("cpu", torch.float32, prologue=prologue, c_in=5, c_out=6, h=2, w=3)
    scale, shift = (t.detach() if t is not None else None for t in (scale, shift))
    with use_backend(backend):
        torch.library.opcheck(_conv1x1_op, (x, weight, scale, shift, "relu"))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(x=a["x"][0]), TypeError, r"x must be a floating \(N, C, H, W\) tensor"),
        (lambda a: a.update(weight=torch.zeros(6, 4, 1, 1)), ValueError, r"weight must have shape \(C_out, 5, 1, 1\)"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight must be torch.float32"),
        (lambda a: a.update(shift=None), ValueError, "scale and shift must be given together"),
        (lambda a: a.update(scale=torch.zeros(4)), ValueError, r"scale must be a float32 \(5,\) tensor"),
        (lambda a: a.update(activation="tanh"), ValueError, "activation must be one of"),
    ],
)
def test_bad_input_is_rejected_before_any_launch(change, error, match):
    x, weight, scale, shift = make_inputs("cpu", torch.float32, prologue=True, c_in=5, c_out=6, h=2, w=3)
    args = dict(x=x, weight=weight, scale=scale, shift=shift, activation="relu")
    change(args)
    with pytest.raises(error, match=match):
        conv1x1_bn_stats(**args)
