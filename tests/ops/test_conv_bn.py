"""``conv1x1_bn`` and ``conv3x3_bn`` (strides 2 and 1) — a conv and the training-mode BN of its output, the BN's
backward folded into the conv's backward kernels — against eager ``F.conv2d`` + ``nn.BatchNorm2d`` and against their
reference backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.ops import conv1x1_bn, conv3x3_bn, use_backend
from spinenet_fast.ops.conv1x1_bn import _conv1x1_bn_backward_op, _conv1x1_bn_forward_op
from spinenet_fast.ops.conv3x3_bn import _conv3x3_bn_backward_op, _conv3x3_bn_forward_op

from ..conftest import require_backend
from .tolerance import assert_low_precision_rule, max_abs_error

BACKENDS = ["reference", "triton", "cuda"]
KINDS = ["1x1", "3x3s2", "3x3s1"]


def conv3x3_stride(kind: str) -> int:
    return 1 if kind == "3x3s1" else 2


def make_case(kind, dtype=torch.float32, *, prologue=True, layout="channels_last", batch=2, c_in=37, c_out=70, h=6,
              w=8):  # fmt: skip
    """Leaves x, weight, scale, shift (None without a prologue) and the BN module."""
    x = torch.randn(batch, 2 * c_in if layout == "strided" else c_in, h, w)
    x = x[:, ::2] if layout == "strided" else x
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    k = 1 if kind == "1x1" else 3
    weight = torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    scale = (torch.rand(c_in) + 0.5).requires_grad_() if prologue else None
    shift = torch.randn(c_in).requires_grad_() if prologue else None
    bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.1)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), scale, shift, bn


def eager(kind, x, weight, scale, shift, bn):
    """swish(scale·x + shift) (or x) → conv (1×1, or 3×3 with PyTorch padding) → BN (training), in x's dtype."""
    if scale is not None:
        x = F.silu(x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1))
    return bn(F.conv2d(x, weight) if kind == "1x1" else F.conv2d(x, weight, stride=conv3x3_stride(kind), padding=1))


def fused(kind, backend, x, weight, scale, shift, bn, **kwargs):
    """BN(conv) = out_scale·y + out_shift from the fused op on ``backend``, with ``bn``'s buffers updated."""
    activation = "swish" if scale is not None else "identity"
    conv_args = (activation,) if kind == "1x1" else (activation, "torch")
    op = conv1x1_bn if kind == "1x1" else conv3x3_bn
    kwargs = kwargs if kind == "1x1" else {"stride": conv3x3_stride(kind), **kwargs}
    with use_backend(backend):
        y, out_scale, out_shift = op(
            x, weight, scale, shift, *conv_args, bn_weight=bn.weight, bn_bias=bn.bias, eps=bn.eps,
            running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked,
            momentum=bn.momentum, **kwargs,
        )  # fmt: skip
    return y * out_scale.view(1, -1, 1, 1) + out_shift.view(1, -1, 1, 1)


def leaves(x, weight, scale, shift, bn):
    return [t for t in (x, weight, scale, shift, bn.weight, bn.bias) if t is not None]


def copy_of(bn: nn.BatchNorm2d, dtype=torch.float32) -> nn.BatchNorm2d:
    twin = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    twin.load_state_dict(bn.state_dict())
    return twin.to(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("prologue", "layout", "batch"), [(True, "channels_last", 2), (False, "contiguous", 1),
                                                           (True, "strided", 1)])  # fmt: skip
def test_equals_conv_then_batchnorm(kind, backend, prologue, layout, batch):
    """Output, every gradient (x, W, the prologue's scale/shift, γ, β), running statistics and counter (fp32)."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case(kind, prologue=prologue, layout=layout, batch=batch)
    bn_eager = copy_of(bn)
    expected = eager(kind, x, weight, scale, shift, bn_eager)
    grad = torch.randn_like(expected)
    with use_backend(backend):  # the backward picks its backend when it runs
        out = fused(kind, backend, x, weight, scale, shift, bn)
        got = torch.autograd.grad(out, leaves(x, weight, scale, shift, bn), grad)
    want = torch.autograd.grad(expected, leaves(x, weight, scale, shift, bn_eager), grad)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_eager, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_tolerance_rule(kind, backend, dtype):
    """Every gradient in bf16/fp16 against fp32, no worse than eager conv + BN in the same dtype (37 input channels:
    one tile, so the Triton 1×1 backward recomputes y instead of reading it)."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case(kind, dtype, h=10, w=12)
    with use_backend(backend):
        out = fused(kind, backend, x, weight, scale, shift, bn)
        grad = torch.randn(out.shape)
        got = torch.autograd.grad(out, leaves(x, weight, scale, shift, bn), grad.to(out.dtype))
    fp32 = [x.detach().float().requires_grad_(), weight.detach().float().requires_grad_(), scale, shift]
    with use_backend("reference"):  # the oracle, its backward too
        out32 = fused(kind, "reference", *fp32, bn)
        want = torch.autograd.grad(out32, leaves(*fp32, bn), grad)
    bn_low = copy_of(bn, dtype)
    eager_out = eager(kind, x, weight, scale, shift, bn_low)
    eager_grads = torch.autograd.grad(eager_out, leaves(x, weight, scale, shift, bn_low), grad.to(dtype))
    for got_, want_, base in zip(got, want, eager_grads):
        assert_low_precision_rule(got_, want_, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_variance_uses_the_upsampled_count(backend):
    require_backend(backend)
    x, weight, _, _, bn = make_case("1x1", prologue=False)
    bn.momentum = 1.0
    fused("1x1", backend, x, weight, None, None, bn, upsample_factor=4)
    conv = F.interpolate(F.conv2d(x, weight), scale_factor=4)
    torch.testing.assert_close(bn.running_mean, conv.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, conv.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    x, weight, scale, shift, _ = make_case(kind, torch.float64, c_in=3, c_out=4, h=4, w=4)
    scale, shift = (t.detach().double().requires_grad_() for t in (scale, shift))
    gamma, beta = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    op, conv_args = (conv1x1_bn, ("swish",)) if kind == "1x1" else (conv3x3_bn, ("swish", "tf_same"))
    stride = {} if kind == "1x1" else {"stride": conv3x3_stride(kind)}

    def fn(x, weight, scale, shift, gamma, beta):
        return op(x, weight, scale, shift, *conv_args, bn_weight=gamma, bn_bias=beta, eps=1e-3, **stride)

    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, weight, scale, shift, gamma, beta))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prologue", [False, True])
def test_backward_op_matches_the_reference_and_opcheck(kind, backend, prologue):
    require_backend(backend)
    x, weight, scale, shift, _ = make_case(kind, prologue=prologue, c_in=5, c_out=6, h=4, w=6)
    x, weight = x.detach(), weight.detach()
    scale, shift = (t.detach() if t is not None else None for t in (scale, shift))
    # y: the conv's output for these inputs, as the op's contract has it (the 1×1 backward may recompute it)
    a = x if scale is None else F.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y = F.conv2d(a, weight) if kind == "1x1" else F.conv2d(a, weight, stride=conv3x3_stride(kind), padding=1)
    y = y.contiguous(memory_format=torch.channels_last)
    vectors = [torch.randn(6), torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.rand(6) + 0.1]
    op, conv_args = (_conv1x1_bn_backward_op, ("relu",)) if kind == "1x1" else (
        _conv3x3_bn_backward_op, ("relu", "torch", conv3x3_stride(kind), None, True))  # fmt: skip
    args = (torch.randn_like(y), *vectors[:2], y, x, weight, scale, shift, *conv_args, *vectors[2:], 12, 1e-3)
    buffers = [torch.zeros(2, 5) if prologue else None for _ in range(4)]  # [d_scale; d_shift] added into these
    with use_backend("reference"):
        want = op(*args, buffers[0], None)
    with use_backend(backend):
        got = op(*args, buffers[1], None)
        torch.library.opcheck(op, (*args, buffers[2], None))
        d_weight = torch.zeros_like(weight)  # dW added into it, an empty stand-in returned
        into = op(*args, buffers[3], d_weight)
        torch.library.opcheck(op, (*args, None if buffers[3] is None else torch.zeros(2, 5), torch.zeros_like(weight)))
    assert len(got) == len(want) == len(into) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert into[1].numel() == 0
    torch.testing.assert_close(d_weight, want[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(into[0], want[0], rtol=1e-5, atol=1e-4)
    if prologue:
        torch.testing.assert_close(buffers[1], buffers[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(buffers[3], buffers[0], rtol=1e-5, atol=1e-4)
        assert buffers[0].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.bfloat16])
def test_training_forward_op_matches_the_reference_and_opcheck(kind, backend, running_dtype):
    """The training forward (conv, statistics, finalize, running update, counter; on Triton one launch whose last
    program finalizes): equal to the reference backend's conv-then-finalize over a grid of several programs in both
    dimensions, with running statistics in the kernel (fp32) or after it (bf16 buffers); opcheck."""
    require_backend(backend)
    h, w = (12, 16) if kind == "3x3s2" else (6, 8)  # 96 output pixels, 70 channels: 3 × 3 programs of 32 × 32
    x, weight, scale, shift, _ = make_case(kind, c_in=37, c_out=70, h=h, w=w)
    x, weight, scale, shift = (t.detach() for t in (x, weight, scale, shift))
    op, conv_args = (_conv1x1_bn_forward_op, ("swish",)) if kind == "1x1" else (
        _conv3x3_bn_forward_op, ("swish", "torch", conv3x3_stride(kind), None))  # fmt: skip
    count = 96
    gamma, beta = torch.randn(70), torch.randn(70)
    initial = [torch.zeros(2, 70), torch.zeros(1, dtype=torch.int32), torch.randn(70).to(running_dtype),
               (torch.rand(70) + 0.5).to(running_dtype), torch.tensor(3)]  # fmt: skip

    def fresh():
        state = [t.clone() for t in initial]
        stats, counter, *running = state
        return (x, weight, scale, shift, *conv_args, stats, counter, count, gamma, beta, 1e-3, *running, 0.1,
                count / (count - 1)), state  # fmt: skip

    def run(backend):
        args, state = fresh()
        with use_backend(backend):
            return op(*args), state

    want, want_state = run("reference")
    got, got_state = run(backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for i in (0, 2, 3, 4):  # statistics, running mean and variance, the batch counter (3 + 1)
        torch.testing.assert_close(got_state[i], want_state[i], rtol=1e-4, atol=1e-3)
    assert got_state[4] == 4
    with use_backend(backend):  # each check on zeroed accumulators, as the op requires them
        for check in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"):
            torch.library.opcheck(op, fresh()[0], test_utils=check)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(counter_buffer=torch.zeros(1)), ValueError, r"counter_buffer must be a contiguous int32"),
        (lambda a: a.update(bn_weight=torch.ones(5)), ValueError, r"weight must be a float tensor of shape \(6,\)"),
        (lambda a: a.update(eps=0.0), ValueError, "eps must be positive"),
        (lambda a: a.update(running_var=torch.ones(6, device="meta")), ValueError, "running_var must be a float"),
        (lambda a: a.update(upsample_factor=0), ValueError, "upsample_factor must be a positive int"),
        (lambda a: a.update(x=a["x"][:1, :, :1, :1]), ValueError, r"count must be an int >= 2"),
        (lambda a: a.update(weight=torch.zeros(6, 4, 1, 1)), ValueError, r"weight must have shape \(C_out, 5, 1, 1\)"),
    ],
)
def test_bad_input_is_rejected_before_any_launch(change, error, match):
    x, weight, scale, shift, _ = make_case("1x1", c_in=5, c_out=6, h=2, w=3)
    args = dict(x=x, weight=weight, scale=scale, shift=shift, activation="relu", bn_weight=torch.ones(6),
                bn_bias=torch.zeros(6), eps=1e-3, running_mean=torch.zeros(6), running_var=torch.ones(6))  # fmt: skip
    change(args)
    with pytest.raises(error, match=match):
        conv1x1_bn(**args)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda a: a.update(bn_bias=torch.zeros(6, device="meta")),
            ValueError,
            r"bias must be a float tensor of shape",
        ),
        (lambda a: a.update(x=a["x"][:, :, :3]), ValueError, "x must have even H and W"),
        (lambda a: a.update(padding="same"), ValueError, "padding must be one of"),
        (lambda a: a.update(num_batches_tracked=torch.zeros(2)), TypeError, "num_batches_tracked must be a one"),
        (lambda a: a.update(stride=3), ValueError, "stride must be 1 or 2, got 3"),
        (lambda a: a.update(x=a["x"][:1, :, :1, :1], stride=1), ValueError, r"count must be an int >= 2"),
    ],
)
def test_bad_input_3x3(change, error, match):
    x, weight, scale, shift, _ = make_case("3x3s2", c_in=5, c_out=6, h=4, w=4)
    args = dict(x=x, weight=weight, scale=scale, shift=shift, activation="relu", padding="torch", stride=2,
                bn_weight=torch.ones(6), bn_bias=torch.zeros(6), eps=1e-3)  # fmt: skip
    change(args)
    with pytest.raises(error, match=match):
        conv3x3_bn(**args)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_into_a_slice_of_a_shared_buffer(kind, backend):
    """``stats_buffer``: the statistics are added into the given slice (one fill for several ops), nothing else
    written; the result is the op's own."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case(kind)
    expected = fused(kind, backend, x, weight, scale, shift, copy_of(bn))
    shared = torch.zeros(3, 2, 70, dtype=torch.float64)
    got = fused(kind, backend, x, weight, scale, shift, bn, stats_buffer=shared[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    conv = eager(kind, x, weight, scale, shift, nn.Identity()).detach().double()
    statistics = torch.stack([conv.sum((0, 2, 3)), (conv * conv).sum((0, 2, 3))])
    torch.testing.assert_close(shared[1], statistics, rtol=1e-4, atol=1e-3)
    assert shared[0].abs().sum() == 0 and shared[2].abs().sum() == 0
    with pytest.raises(ValueError, match=r"stats_buffer must be a contiguous float64 \(2, 70\) tensor"):
        fused(kind, backend, x, weight, scale, shift, bn, stats_buffer=shared[:, 0])
    with pytest.raises(ValueError, match=r"stats_buffer must be a contiguous float64 \(2, 70\) tensor"):
        fused(kind, backend, x, weight, scale, shift, bn, stats_buffer=torch.zeros(2, 70))
    with pytest.raises(ValueError, match=r"prologue_grad_buffer must be a contiguous float32 \(2, 37\) tensor"):
        fused(kind, backend, x, weight, scale, shift, bn, prologue_grad_buffer=torch.zeros(2, 36))
    with pytest.raises(
        ValueError, match=r"weight_grad_buffer must be a float32 tensor with the dense weight's shape \(70, 37"
    ):
        fused(kind, backend, x, weight, scale, shift, bn, weight_grad_buffer=torch.zeros(weight.shape[::-1]))
    with pytest.raises(ValueError, match="weight_grad_buffer needs a float32 weight"):
        fused(
            kind,
            backend,
            x.bfloat16(),
            weight.bfloat16(),
            scale,
            shift,
            bn,
            weight_grad_buffer=torch.zeros(weight.shape),
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prologue_and_weight_gradients_into_buffers_and_a_second_backward(kind, backend):
    """``prologue_grad_buffer`` / ``weight_grad_buffer``: the first backward adds d_scale, d_shift / dW into them (the
    gradients autograd passes on are the buffers themselves); a second backward through the same graph
    (``retain_graph``) gets its own, equal ones."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case(kind)
    expected = eager(kind, x, weight, scale, shift, copy_of(bn))
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (scale, shift, weight), grad)
    buffer, weight_buffer = torch.zeros(2, 37), torch.zeros(weight.shape)
    with use_backend(backend):
        out = fused(kind, backend, x, weight, scale, shift, bn, prologue_grad_buffer=buffer,
                    weight_grad_buffer=weight_buffer)  # fmt: skip
        first = torch.autograd.grad(out, (scale, shift, weight), grad, retain_graph=True)
        second = torch.autograd.grad(out, (scale, shift, weight), grad)
    assert first[2].data_ptr() == weight_buffer.data_ptr()
    for got in (first, second, (*buffer.unbind(), weight_buffer)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv3x3_bn_with_a_bias_equals_conv_then_batchnorm(backend):
    """The head's layer: stride-1 3×3 conv with a bias, then training-mode BN. Output, every gradient (the bias' is
    Σ of the BN input's gradient: 0 up to rounding, computed all the same), and the running mean, which holds the
    bias; then two calls sharing gradient buffers (``shared_grad_buffers``) leave the sum of their weight and bias
    gradients there and return none."""
    require_backend(backend)
    x, weight, scale, shift, bn = make_case("3x3s1", batch=2)
    bias = torch.randn(70, requires_grad=True)
    bn_eager = copy_of(bn)
    a = F.silu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    expected = bn_eager(F.conv2d(a, weight, bias, padding=1))
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, weight, bias, scale, shift, bn_eager.weight, bn_eager.bias), grad)
    with use_backend(backend):
        out = fused("3x3s1", backend, x, weight, scale, shift, bn, bias=bias)
        got = torch.autograd.grad(out, (x, weight, bias, scale, shift, bn.weight, bn.bias), grad)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(bn.running_mean, bn_eager.running_mean, rtol=1e-5, atol=1e-6)

    weight_buffer, bias_buffer = torch.zeros(weight.shape), torch.zeros(70)
    with use_backend(backend):
        outs = [fused("3x3s1", backend, x, weight, scale, shift, bn, bias=bias, weight_grad_buffer=weight_buffer,
                      bias_grad_buffer=bias_buffer, shared_grad_buffers=True) for _ in range(2)]  # fmt: skip
        shared = torch.autograd.grad(outs, (weight, bias), [grad, grad], allow_unused=True)
    assert shared == (None, None)
    torch.testing.assert_close(weight_buffer, 2 * want[1], rtol=1e-4, atol=4e-4)
    torch.testing.assert_close(bias_buffer, 2 * want[2], rtol=1e-4, atol=4e-4)


def test_conv3x3_bn_bias_buffers_are_checked():
    x, weight, scale, shift, bn = make_case("3x3s1", batch=2)
    with pytest.raises(ValueError, match=r"bias_grad_buffer must be a contiguous float32 \(70,\) tensor"):
        fused("3x3s1", "reference", x, weight, scale, shift, bn, bias=torch.randn(70), bias_grad_buffer=torch.zeros(7))
    with pytest.raises(ValueError, match="bias_grad_buffer was given for a conv without a bias"):
        fused("3x3s1", "reference", x, weight, scale, shift, bn, bias_grad_buffer=torch.zeros(70))
    with pytest.raises(ValueError, match="shared_grad_buffers needs weight_grad_buffer"):
        fused("3x3s1", "reference", x, weight, scale, shift, bn, shared_grad_buffers=True)
    with pytest.raises(ValueError, match=r"bias must be None or a torch.float32 \(70,\) tensor"):
        fused("3x3s1", "reference", x, weight, scale, shift, bn, bias=torch.randn(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [3, 7])
def test_conv3x3_bn_backward_without_input_grad(backend, window):
    """``input_grad`` False (a conv without a prologue whose input needs no gradient: the stem's image): dx is an
    empty stand-in, dW and [dγ; dβ] as with it (Triton: the wgrad's programs alone, its first storing dγ, dβ); through
    autograd, x's gradient is None exactly where x needs none."""
    require_backend(backend)
    x = torch.randn(2, 5, 6, 8).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 5, window, window) / (5 * window * window) ** 0.5
    y = F.conv2d(x, weight, stride=2, padding=window // 2).contiguous(memory_format=torch.channels_last)
    vectors = [torch.randn(6), torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.rand(6) + 0.1]
    head = (torch.randn_like(y), *vectors[:2], y, x, weight, None, None, "identity", "torch", 2, None)
    tail = (*vectors[2:], 24, 1e-3, None, None)
    with use_backend("reference"):
        want = _conv3x3_bn_backward_op(*head, True, *tail)
    with use_backend(backend):
        got = _conv3x3_bn_backward_op(*head, False, *tail)
        torch.testing.assert_close(_conv3x3_bn_backward_op(*head, True, *tail)[0], want[0], rtol=1e-5, atol=1e-4)
        torch.library.opcheck(_conv3x3_bn_backward_op, (*head, False, *tail))
    assert got[0].numel() == 0
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    bn = nn.BatchNorm2d(6, eps=1e-3)
    for needs_grad in (False, True):
        leaf = x.clone().requires_grad_(needs_grad)
        w = weight.clone().requires_grad_()
        with use_backend(backend):
            y, scale, _ = conv3x3_bn(leaf, w, stride=2, bn_weight=bn.weight, bn_bias=bn.bias, eps=1e-3)
            grads = torch.autograd.grad((y * scale.view(1, -1, 1, 1)).square().sum(), [w, leaf][: 1 + needs_grad])
        assert len(grads) == 1 + needs_grad and grads[0].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [20, 80])
def test_fp32_statistics_of_a_map_whose_mean_dwarfs_its_spread(kind, backend, ratio):
    """The fp32 BN output as accurate as eager's (error against float64 at most twice eager's) where the conv output's
    mean is ``ratio``× its standard deviation (1×1: weights of one sign of inputs of mean 0.25; 3×3: a bias). The
    variance Σy²/n − mean² cancels ~ratio² of its digits: from fp32 sums it was 10× eager's error at 20 and 100× at
    80; the statistics are float64, each tile's moments added (``kernels/epilogue.py``)."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    if kind == "1x1":
        spread = 0.25 / ratio * 8  # the mean 0.25, the spread of a sum of 64 terms of weight ~1/64
        x = 0.25 + spread * torch.randn(4, 64, 16, 16, generator=g)
        weight, extra = (1.0 + 0.1 * torch.randn(32, 64, 1, 1, generator=g)) / 64, {}
    else:
        x = torch.randn(4, 64, 16, 16, generator=g)
        weight = torch.randn(32, 64, 3, 3, generator=g) / 24  # the output's spread ~1
        extra = {"bias": torch.full((32,), float(ratio))}
    x = x.contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(32, eps=1e-5)

    def conv_bn(x, weight, bn, bias=None):
        stride = 1 if kind == "1x1" else conv3x3_stride(kind)
        return bn(F.conv2d(x, weight, bias, stride=stride, padding=0 if kind == "1x1" else 1))

    bias64 = {k: v.double() for k, v in extra.items()}
    with torch.no_grad():
        conv64 = conv_bn(x.double(), weight.double(), nn.Identity(), **bias64)
        achieved = (conv64.mean((0, 2, 3)) / conv64.std((0, 2, 3))).abs().min()
        reference = conv_bn(x.double(), weight.double(), copy_of(bn, torch.float64), **bias64)
        eager_error = max_abs_error(conv_bn(x, weight, copy_of(bn), **extra).double(), reference)
        fused_error = max_abs_error(fused(kind, backend, x, weight, None, None, bn, **extra).double(), reference)
    assert achieved > ratio / 2, achieved  # the map is as lopsided as the test says
    assert eager_error < ratio * 5e-6  # eager's own: the fp32 output's rounding, ~eps·ratio
    assert fused_error <= 2 * eager_error, (fused_error, eager_error)


def test_a_second_derivative_through_the_fused_backward_raises():
    """The README's "first derivatives only": create_graph=True builds the first backward, and differentiating it
    again raises PyTorch's error naming the backward op instead of returning a wrong second derivative."""
    x, weight, scale, shift, bn = make_case("1x1")
    out = fused("1x1", "reference", x, weight, scale, shift, bn)
    (d_weight,) = torch.autograd.grad((out * out).sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match=r"conv1x1_bn_backward.*no autograd formula"):
        d_weight.sum().backward()
