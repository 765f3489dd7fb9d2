"""``pooled_conv1x1_bn`` (BN + act + max-pools, then 1×1 conv + training-mode BN; on Triton one launch whose
prologue max-pools) against the eager modules and against its reference backend."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.models.layers import MaxPool3x3s2
from spinenet_fast.ops import pooled_conv1x1_bn, use_backend
from spinenet_fast.ops.backends import gpu_auto_order_on_cpu
from spinenet_fast.ops.pooled_conv1x1_bn import _pooled_forward_op, _pooled_into_op

from ..conftest import require_backend
from .tolerance import assert_low_precision_rule

BACKENDS = ["reference", "triton", "cuda"]


@contextlib.contextmanager
def on_backend(backend):
    """``backend`` for every op; "triton" as a GPU chooses, for CPU tensors: Triton wherever it has a kernel, the
    extension's CPU twin for the max-pools' backward gather (which has none)."""
    if backend != "triton":
        with use_backend(backend):
            yield
        return
    require_backend("cuda")
    with use_backend(None), gpu_auto_order_on_cpu():
        yield


def make_case(dtype=torch.float32, *, layout="channels_last", batch=2, c_in=37, c_out=70, h=8, w=12):
    """Leaves x, weight, scale, shift and the BN module."""
    x = torch.randn(batch, 2 * c_in if layout == "strided" else c_in, h, w)
    x = x[:, ::2] if layout == "strided" else x
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weight = torch.randn(c_out, c_in, 1, 1) / c_in**0.5
    scale = torch.randn(c_in).requires_grad_()  # γ < 0 too: the affine comes before the max
    shift = torch.randn(c_in).requires_grad_()
    bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.1)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), scale, shift, bn


def eager(x, weight, scale, shift, bn, activation, num_pools, padding):
    """act(scale·x + shift) → the eager model's max-pools → 1×1 conv → BN (training), in x's dtype."""
    a = x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
    a = {"relu": F.relu, "swish": F.silu, "identity": lambda t: t}[activation](a)
    for _ in range(num_pools):
        a = MaxPool3x3s2(padding)(a)
    return bn(F.conv2d(a, weight))


def fused(backend, x, weight, scale, shift, bn, activation, num_pools, padding, **kwargs):
    """BN(conv(pools)) = out_scale·y + out_shift from the fused op on ``backend``, with ``bn``'s buffers updated."""
    with on_backend(backend):
        y, out_scale, out_shift = pooled_conv1x1_bn(
            x, weight, scale, shift, activation, num_pools, padding, bn_weight=bn.weight, bn_bias=bn.bias, eps=bn.eps,
            running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked,
            momentum=bn.momentum, **kwargs,
        )  # fmt: skip
    return y * out_scale.view(1, -1, 1, 1) + out_shift.view(1, -1, 1, 1)


def copy_of(bn: nn.BatchNorm2d, dtype=torch.float32) -> nn.BatchNorm2d:
    twin = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    twin.load_state_dict(bn.state_dict())
    return twin.to(dtype)


def leaves(x, weight, scale, shift, bn):
    return [x, weight, scale, shift, bn.weight, bn.bias]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_pools", "padding", "layout", "batch", "h", "w", "c_in", "c_out"),
    [(1, "torch", "channels_last", 2, 8, 12, 37, 70), (2, "tf_same", "strided", 1, 16, 24, 37, 70),
     # 3 pools scan a 729-leaf window tree per pixel: one tile of channels keeps the CPU interpreter's time small.
     (3, "torch", "contiguous", 1, 32, 24, 11, 13)],  # ≥ 12 pixels per channel for the BN
)  # fmt: skip
def test_equals_maxpools_conv_then_batchnorm(backend, num_pools, padding, layout, batch, h, w, c_in, c_out):
    """Output, every gradient (x, W, scale, shift, γ, β), running statistics and counter (fp32)."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case(layout=layout, batch=batch, h=h, w=w, c_in=c_in, c_out=c_out)
    bn_eager = copy_of(bn)
    args = ("swish", num_pools, padding)
    expected = eager(x, weight, scale, shift, bn_eager, *args)
    grad = torch.randn_like(expected)
    with on_backend(backend):  # the backward picks its backend when it runs
        out = fused(backend, x, weight, scale, shift, bn, *args)
        got = torch.autograd.grad(out, leaves(x, weight, scale, shift, bn), grad)
    want = torch.autograd.grad(expected, leaves(x, weight, scale, shift, bn_eager), grad)
    assert out.shape == (batch, c_out, h >> num_pools, w >> num_pools)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_eager, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("num_pools", [1, 2])
def test_ties_route_like_pool_by_pool_aten(backend, padding, num_pools):
    """Integer inputs after a ReLU tie everywhere: the gradient must reach the element ATen's stage-by-stage argmax
    picks, exactly."""
    require_backend(backend)
    x, weight, _, _, bn = make_case(c_in=6, c_out=5, h=16, w=8)
    x = torch.randint(-2, 3, x.shape).float().requires_grad_()
    bn.eps = 1.0  # the pooled values are nearly all 2: a small variance would make the BN ill-conditioned
    scale, shift = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    bn_eager = copy_of(bn)
    args = ("relu", num_pools, padding)
    expected = eager(x, weight, scale, shift, bn_eager, *args)
    grad = torch.randn_like(expected)
    with on_backend(backend):
        out = fused(backend, x, weight, scale, shift, bn, *args)
        (got,) = torch.autograd.grad(out, (x,), grad)
    (want,) = torch.autograd.grad(expected, (x,), grad)
    assert torch.equal(got != 0, want != 0)  # the same routes: gradients at the same elements
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_tolerance_rule(backend, dtype):
    """Every gradient in bf16/fp16 against fp32, no worse than the eager modules in the same dtype."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case(dtype, h=8, w=16)
    args = ("swish", 1, "torch")
    with on_backend(backend):
        out = fused(backend, x, weight, scale, shift, bn, *args)
        grad = torch.randn(out.shape)
        got = torch.autograd.grad(out, leaves(x, weight, scale, shift, bn), grad.to(out.dtype))
    fp32 = [x.detach().float().requires_grad_(), weight.detach().float().requires_grad_(), scale, shift]
    out32 = fused("reference", *fp32, bn, *args)
    want = torch.autograd.grad(out32, leaves(*fp32, bn), grad)
    bn_low = copy_of(bn, dtype)
    eager_out = eager(x, weight, scale, shift, bn_low, *args)
    eager_grads = torch.autograd.grad(eager_out, leaves(x, weight, scale, shift, bn_low), grad.to(dtype))
    for got_, want_, base in zip(got, want, eager_grads):
        assert_low_precision_rule(got_, want_, base)


def test_forced_triton_runs_the_max_pools_backward_on_the_auto_backend():
    """``use_backend("triton")`` forces the op's Triton kernels; the max-pools' backward, which has none, takes the
    backend ``auto`` chooses instead of failing (as inside ``expand_merge``'s Triton backward)."""
    require_backend("triton")
    x, weight, scale, shift, bn = make_case(h=8, w=8)
    bn_eager = copy_of(bn)
    expected = eager(x, weight, scale, shift, bn_eager, "swish", 1, "torch")
    grad = torch.randn_like(expected)
    with use_backend("triton"):
        y, out_scale, out_shift = pooled_conv1x1_bn(x, weight, scale, shift, "swish", 1, bn_weight=bn.weight,
                                                    bn_bias=bn.bias, eps=bn.eps)  # fmt: skip
        out = y * out_scale.view(1, -1, 1, 1) + out_shift.view(1, -1, 1, 1)
        got = torch.autograd.grad(out, leaves(x, weight, scale, shift, bn), grad)
    want = torch.autograd.grad(expected, leaves(x, weight, scale, shift, bn_eager), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)


def test_gradcheck_float64():
    x, weight, scale, shift, _ = make_case(torch.float64, c_in=3, c_out=4, h=4, w=8)
    scale, shift = (t.detach().double().requires_grad_() for t in (scale, shift))
    gamma, beta = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fn(x, weight, scale, shift, gamma, beta):
        return pooled_conv1x1_bn(x, weight, scale, shift, "swish", 1, "tf_same", bn_weight=gamma, bn_bias=beta,
                                 eps=1e-3)  # fmt: skip

    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, weight, scale, shift, gamma, beta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ops_match_the_reference_and_opcheck(backend):
    """The statistics-into op (y, pooled, route) and the training forward (on Triton one launch over a grid of
    several programs in both dimensions, the last finalizing): equal to the reference backend's; opcheck, each
    check on zeroed accumulators as the ops require them."""
    require_backend(backend)
    # 96 pooled pixels × 70 channels: 3 × 3 programs of 32 × 32; 13 input channels: one K step (interpreter time).
    x, weight, scale, shift, _ = make_case(c_in=13, c_out=70, h=24, w=16)
    x, weight, scale, shift = (t.detach() for t in (x, weight, scale, shift))
    conv = (x, weight, scale, shift, "swish", 1, "torch")
    count = 96
    gamma, beta = torch.randn(70), torch.randn(70)
    initial = [torch.zeros(2, 70), torch.zeros(1, dtype=torch.int32), torch.randn(70), torch.rand(70) + 0.5,
               torch.tensor(3)]  # fmt: skip

    def fresh(op):
        state = [t.clone() for t in initial]
        if op is _pooled_into_op:
            return (*conv, state[0]), state
        stats, counter, *running = state
        return (*conv, stats, counter, count, gamma, beta, 1e-3, *running, 0.1, count / (count - 1)), state

    for op in (_pooled_into_op, _pooled_forward_op):

        def run(backend, op=op):
            args, state = fresh(op)
            with use_backend(backend):
                return op(*args), state

        (want, want_state), (got, got_state) = run("reference"), run(backend)
        assert len(got) == len(want) == (3 if op is _pooled_into_op else 7)
        assert got[2].dtype == torch.int32 and torch.equal(got[2], want[2])  # the routes
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for i in (0, 2, 3, 4):  # statistics, running statistics, batch counter (not the program counter)
            torch.testing.assert_close(got_state[i], want_state[i], rtol=1e-4, atol=1e-3)
        assert got_state[4] == (3 if op is _pooled_into_op else 4)
        with use_backend(backend):
            for check in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"):
                torch.library.opcheck(op, fresh(op)[0], test_utils=check)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(scale=None, shift=None), ValueError, "needs scale and shift"),
        (lambda a: a.update(num_pools=0), ValueError, "num_pools must be a positive int"),
        (lambda a: a.update(x=a["x"][:, :, :6]), ValueError, r"x: H and W must be multiples of 2\^num_pools = 4"),
        (lambda a: a.update(weight=torch.zeros(6, 4, 1, 1)), ValueError, r"weight must have shape \(C_out, 5, 1, 1\)"),
        (lambda a: a.update(prologue_grad_buffer=torch.zeros(2, 6)), ValueError, r"prologue_grad_buffer must be"),
        (lambda a: a.update(x=a["x"][:1, :, :4, :4]), ValueError, r"count must be an int >= 2"),
    ],
)
def test_bad_input_is_rejected_before_any_launch(change, error, match):
    x, weight, scale, shift, _ = make_case(c_in=5, c_out=6, h=8, w=8)
    args = dict(x=x, weight=weight, scale=scale, shift=shift, activation="relu", num_pools=2, bn_weight=torch.ones(6),
                bn_bias=torch.zeros(6), eps=1e-3)  # fmt: skip
    change(args)
    with pytest.raises(error, match=match):
        pooled_conv1x1_bn(**args)
