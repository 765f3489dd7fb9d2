"""``merge`` (Triton under the CPU interpreter, the extension's CPU kernels) against ``merge_reference``."""

import pytest
import torch
import torch.nn.functional as F

from spinenet_fast.ops import merge, merge_backward_reference, merge_reference, use_backend
from spinenet_fast.ops.merge import (
    _merge_backward_into_op,
    _merge_backward_op,
    _merge_op,
    _nhwc_grads,
    coarse_first,
    merge_for_readers,
    nhwc_samples,
)

from ..conftest import require_backend
from .tolerance import assert_close_by_dtype

# (ratio of parent 0, ratio of parent 1): =, and every upsampling factor SpineNet uses (↑2 … ↑32).
RATIOS = [(1, 1), (1, 2), (2, 4), (1, 8), (16, 1), (1, 32)]


def make_inputs(device, dtype, ratios, *, batch=2, channels=5, size=None, extra=True, layout="channels_last"):
    h, w = size or (2 * max(ratios), max(ratios))
    parents = []
    for r in ratios:
        y = torch.randn(batch, channels, h // r, w // r, device=device)
        if layout == "channels_last":
            y = y.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":  # a non-contiguous view: every other column of a wider tensor
            y = torch.randn(batch, channels, h // r, 2 * (w // r), device=device)[..., ::2]
        parents.append(y.to(dtype).requires_grad_())
    scales = [torch.randn(channels, device=device).requires_grad_() for _ in ratios]
    shifts = [torch.randn(channels, device=device).requires_grad_() for _ in ratios]
    extra_t = torch.randn(batch, channels, h, w, device=device).to(dtype).requires_grad_() if extra else None
    return parents, scales, shifts, list(ratios), extra_t


def run(backend, inputs, activation, grad):
    parents, scales, shifts, ratios, extra = inputs
    leaves = [*parents, *scales, *shifts, *([extra] if extra is not None else [])]
    with use_backend(backend):  # the backward chooses its backend when it runs: inside the block
        out = merge(parents, scales, shifts, ratios, extra, activation)
        grads = torch.autograd.grad(out, leaves, grad)
    return out, grads


def upsampled_eager(inputs, activation, grad):
    """What eager PyTorch computes in the inputs' own dtype: affine, upsampled copies, sum, act."""
    parents, scales, shifts, ratios, extra = inputs
    dtype = parents[0].dtype
    x = extra
    for y, s, b, r in zip(parents, scales, shifts, ratios):
        z = F.interpolate(y * s.to(dtype).view(1, -1, 1, 1) + b.to(dtype).view(1, -1, 1, 1), scale_factor=r)
        x = z if x is None else x + z
    out = F.silu(x) if activation == "swish" else F.relu(x)
    leaves = [*parents, *scales, *shifts, *([extra] if extra is not None else [])]
    return out, torch.autograd.grad(out, leaves, grad)


def assert_matches_reference_fp32(backend, inputs, activation):
    """Forward (1e-5) and every gradient (1e-4) of ``backend`` against the reference, in fp32."""
    out = merge_reference(*inputs, None, activation)
    grad = torch.randn_like(out)
    fused, fused_grads = run(backend, inputs, activation, grad)
    reference, reference_grads = run("reference", inputs, activation, grad)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert fused.is_contiguous(memory_format=torch.channels_last)


def fp32_copy(inputs):
    parents, scales, shifts, ratios, extra = inputs
    detach = lambda t: t.detach().float().requires_grad_()  # noqa: E731
    return [detach(p) for p in parents], scales, shifts, ratios, detach(extra) if extra is not None else None


# ↑16 and ↑32 are slow under the interpreter (ρ² = 1024 backward steps): swish only there.
@pytest.mark.parametrize(
    ("ratios", "activation"),
    [(r, a) for r in RATIOS for a in ("swish", "relu") if max(r) <= 8 or a == "swish"],
)
def test_forward_and_backward_fp32(device, fused_backend, ratios, activation):
    inputs = make_inputs(device, torch.float32, ratios, batch=1 if 32 in ratios else 2, extra=ratios == (1, 2))
    assert_matches_reference_fp32(fused_backend, inputs, activation)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_odd_sizes_batch_one_and_layouts(device, fused_backend, layout):
    inputs = make_inputs(device, torch.float32, (1, 2), batch=1, channels=5, size=(6, 10), layout=layout)
    assert_matches_reference_fp32(fused_backend, inputs, "swish")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [37, 16])  # 37: two Triton channel tiles, scalar CUDA loads; 16: 16-byte packs
def test_low_precision_tolerance_rule(device, fused_backend, dtype, channels):
    inputs = make_inputs(device, dtype, (1, 4), channels=channels, size=(8, 12))
    grad = torch.randn(2, channels, 8, 12, device=device).to(dtype)
    fused, fused_grads = run(fused_backend, inputs, "swish", grad)
    fp32_inputs = fp32_copy(inputs)
    reference, reference_grads = run("reference", fp32_inputs, "swish", grad.float())
    eager, eager_grads = upsampled_eager(inputs, "swish", grad)
    assert fused.dtype == dtype
    assert_close_by_dtype(fused, reference, eager)
    for a, b, c in zip(fused_grads, reference_grads, eager_grads):
        assert_close_by_dtype(a, b, c)


def test_reference_backward_is_the_adjoint():
    inputs = make_inputs("cpu", torch.float64, (1, 2), batch=1, channels=3, size=(4, 4))
    parents, scales, shifts, ratios, extra = inputs
    scales = [s.detach().double().requires_grad_() for s in scales]
    shifts = [s.detach().double().requires_grad_() for s in shifts]

    def fn(p0, p1, s0, s1, b0, b1, e):
        return merge_reference([p0, p1], [s0, s1], [b0, b1], ratios, e, None, "swish")

    leaves = (*parents, *scales, *shifts, extra)
    assert torch.autograd.gradcheck(fn, leaves)
    grad = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    expected = torch.autograd.grad(fn(*leaves), leaves, grad)
    d_p0, d_p1, sums, d_extra = merge_backward_reference([grad], parents, scales, shifts, ratios, extra, None, "swish")
    rows = dict(zip(coarse_first(ratios), sums))  # parent -> its Σ d_pre·y row; the last row is every d_shift
    got = (d_p0, d_p1, rows[0], rows[1], sums[-1], sums[-1], d_extra)
    assert len(sums) == 3
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("channels", [4, 8])  # fp32 packs of 4 where C allows, scalar loads where not
@pytest.mark.parametrize("ratios", [(1,), (4,), (2, 2), (8, 2)])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_one_parent_equal_ratios_and_packed_channels(device, fused_backend, ratios, activation, channels):
    inputs = make_inputs(device, torch.float32, ratios, batch=1, channels=channels, extra=len(ratios) == 1)
    assert_matches_reference_fp32(fused_backend, inputs, activation)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_float64_through_the_op(backend, seed):
    require_backend(backend)
    torch.manual_seed(seed)
    parents, _, _, ratios, extra = make_inputs("cpu", torch.float64, (2, 1), batch=1, channels=3, size=(4, 6))
    scales = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in ratios]
    shifts = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in ratios]

    def fn(p0, p1, e):
        return merge([p0, p1], scales, shifts, ratios, e, "swish")

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, (*parents, extra))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_opcheck(backend):
    require_backend(backend)
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float32, (1, 2), batch=1, channels=4, size=(4, 4))
    with use_backend(backend):
        torch.library.opcheck(_merge_op, ([*parents], [*scales], [*shifts], ratios, extra, None, "swish", None))
        sums = torch.zeros(3, 4)
        torch.library.opcheck(_merge_op, ([*parents], [*scales], [*shifts], ratios, extra, None, "swish", sums))
        grads = [torch.randn(1, 4, 4, 4).contiguous(memory_format=torch.channels_last) for _ in range(3)]
        vectors = ([t.detach() for t in scales], [t.detach() for t in shifts])
        args = (grads, [p.detach() for p in parents], *vectors, ratios, extra.detach(), None, "swish")
        torch.library.opcheck(_merge_backward_into_op, (*args, torch.zeros(3, 4)))
        torch.library.opcheck(_merge_backward_op, (grads[:1], *args[1:]))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize(("ratios", "extra"), [((1, 2), True), ((4,), False)])
def test_sums_into_a_shared_buffer_and_a_second_backward(backend, ratios, extra):
    """``sums_buffer``: the first backward adds the channel sums into the given slice (the scales' and shifts'
    gradients are its rows), nothing else in the buffer is written; a retained graph's second backward allocates
    its own and gets the same gradients."""
    require_backend(backend)
    inputs = make_inputs("cpu", torch.float32, ratios, extra=extra)
    parents, scales, shifts, ratios, extra_t = inputs
    leaves = [*parents, *scales, *shifts, *([extra_t] if extra_t is not None else [])]
    out = merge_reference(*inputs, None, "swish")
    grad = torch.randn_like(out)
    _, want = run("reference", inputs, "swish", grad)
    shared = torch.zeros(3, 3, 5)
    with use_backend(backend):
        out = merge(parents, scales, shifts, ratios, extra_t, "swish", sums_buffer=shared[1])
        first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
        second = torch.autograd.grad(out, leaves, grad)
    for got in (first, second):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert shared[1].abs().sum() > 0 and shared[0].abs().sum() == 0 and shared[2].abs().sum() == 0
    torch.testing.assert_close(shared[1][-1], want[2 * len(ratios)])  # Σ d_pre: every parent's shift gradient
    with pytest.raises(ValueError, match=r"sums_buffer must be a contiguous float32 \(3, 5\) tensor"):
        merge(parents, scales, shifts, ratios, extra_t, "swish", sums_buffer=torch.zeros(2, 5))


def test_compile_fullgraph_through_merge():
    torch._dynamo.reset()
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float32, (1, 2), channels=4, size=(4, 4))

    def fn(p0, p1):
        return merge([p0, p1], scales, shifts, ratios, extra, "relu") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with use_backend("reference"):
        torch.testing.assert_close(compiled(*parents), fn(*parents))
        compiled(*parents).sum().backward()
    assert parents[0].grad is not None


def valid_args():
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float32, (1, 2), channels=4, size=(4, 4))
    return dict(parents=parents, scales=scales, shifts=shifts, ratios=ratios, extra=extra, activation="swish")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(parents=[]), TypeError, "parents must be a non-empty list"),
        (lambda a: a.update(scales=a["scales"][:1]), ValueError, "scales must be a list with one entry per parent"),
        (lambda a: a.update(ratios=[1, 3]), ValueError, r"parents\[1\] of shape .* upsampled ×3"),
        (lambda a: a.update(ratios=[1, 0]), ValueError, r"ratios\[1\] must be a positive int"),
        (lambda a: a["parents"].__setitem__(1, a["parents"][1].double()), TypeError, r"parents\[1\] must match"),
        (lambda a: a["parents"].__setitem__(0, a["parents"][0][0]), ValueError, r"parents\[0\] must be 4-D"),
        (lambda a: a["shifts"].__setitem__(0, torch.zeros(5)), ValueError, r"shifts\[0\] must be a \(4,\) tensor"),
        (lambda a: a["scales"].__setitem__(1, torch.zeros(4).half()), TypeError, r"scales\[1\] must be float32"),
        (lambda a: a.update(extra=torch.zeros(2, 4, 3, 4)), ValueError, "extra must be None or a torch.float32 tensor"),
        (lambda a: a.update(extra=1.0), ValueError, r"extra must be None or a torch.float32 tensor .*, got float"),
        (lambda a: a.update(activation="gelu"), ValueError, "activation must be one of"),
        (lambda a: a.update(parents=[p.int() for p in a["parents"]]), TypeError, "must be floating-point"),
        (lambda a: a.update(row_scale=torch.ones(3)), ValueError, r"row_scale must be None or a .* shape \(2,\)"),
        (lambda a: a.update(row_scale=torch.ones(2).half()), ValueError, "row_scale must be None or a torch.float32"),
        (
            lambda a: a.update(row_scale=torch.ones(2), sums_buffer=torch.zeros(3, 4)),
            ValueError,
            r"sums_buffer must be a contiguous float32 \(4, 4\) tensor",
        ),
    ],
)
def test_bad_input_is_rejected_before_any_launch(change, error, match):
    args = valid_args()
    change(args)
    with pytest.raises(error, match=match):
        merge(**args)


def run_readers(backend, inputs, activation, readers, consumers):
    """``merge_for_readers`` with each copy read by its own consumer; the leaves' gradients of Σ consumer outputs."""
    parents, scales, shifts, ratios, extra = inputs
    leaves = [*parents, *scales, *shifts, *([extra] if extra is not None else [])]
    with use_backend(backend):
        copies = merge_for_readers(parents, scales, shifts, ratios, extra, activation, readers=readers)
        loss = sum(consume(copy) for consume, copy in zip(consumers, copies))
        grads = torch.autograd.grad(loss, leaves)
    return copies, grads


CONSUMERS = [lambda t: (t * t).sum(), lambda t: (t.sin() * 3).sum(), lambda t: t[:, :2].sum(), lambda t: t.exp().sum()]


@pytest.mark.parametrize("readers", [2, 3, 4])
@pytest.mark.parametrize("ratios", [(1, 2), (4,)])
def test_readers_gradients_are_summed_by_the_backward(device, fused_backend, readers, ratios):
    """Each reader's copy holds the merge's values; the gradients of all readers reach the inputs (summed inside the
    backward kernel), equal to the reference merge read by the same consumers through one tensor."""
    inputs = make_inputs(device, torch.float32, ratios, batch=1, extra=len(ratios) == 1)
    copies, grads = run_readers(fused_backend, inputs, "swish", readers, CONSUMERS[:readers])
    assert len(copies) == readers
    parents, scales, shifts, ratios, extra = inputs
    leaves = [*parents, *scales, *shifts, *([extra] if extra is not None else [])]
    out = merge_reference(parents, scales, shifts, ratios, extra, None, "swish")
    want = torch.autograd.grad(sum(consume(out) for consume in CONSUMERS[:readers]), leaves)
    for copy in copies:
        torch.testing.assert_close(copy, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_readers_launch_no_gradient_addition():
    """Autograd adds no reader gradients: the extension's backward kernel receives them apart (the point of the
    readers), while one tensor read three times gets two additions."""
    require_backend("cuda")
    inputs = make_inputs("cpu", torch.float32, (1, 2), batch=1)
    consumers = [lambda t: t.sum(), lambda t: (2 * t).sum(), lambda t: t.sum()]
    seen = []
    with _NoAdds(seen):
        run_readers("cuda", inputs, "swish", 3, consumers)
    assert seen == []
    with _NoAdds(seen), use_backend("cuda"):
        out = merge(*inputs, "swish")
        torch.autograd.grad(sum(consume(out) for consume in consumers), inputs[0])
    assert len(seen) == 2


class _NoAdds(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every ATen ``add`` of a full-size (N, C, H, W) map run under it."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and getattr(out, "dim", lambda: 0)() == 4:
            self.seen.append(func)
        return out


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_readers_gradcheck_float64(backend):
    require_backend(backend)
    torch.manual_seed(0)
    parents, _, _, ratios, extra = make_inputs("cpu", torch.float64, (2, 1), batch=1, channels=3, size=(4, 6))
    scales = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in ratios]
    shifts = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in ratios]

    def fn(p0, p1, e, s0):
        a, b, c = merge_for_readers([p0, p1], [s0, scales[1]], shifts, ratios, e, "swish", readers=3)
        return a * 2, b.sin(), c

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, (*parents, extra, scales[0]))


def test_readers_unused_copies_and_no_grad():
    """A copy nobody differentiates contributes nothing; without autograd the copies are one tensor."""
    inputs = make_inputs("cpu", torch.float32, (1, 2), batch=1)
    parents, scales, shifts, ratios, extra = inputs
    with use_backend("reference"):
        a, b = merge_for_readers(parents, scales, shifts, ratios, extra, "swish", readers=2)
        (g,) = torch.autograd.grad(a.sum(), [parents[0]])
        (want,) = torch.autograd.grad(merge(parents, scales, shifts, ratios, extra, "swish").sum(), [parents[0]])
        torch.testing.assert_close(g, want)
        with torch.no_grad():
            a, b = merge_for_readers(parents, scales, shifts, ratios, extra, "swish", readers=2)
        assert a is b


@pytest.mark.parametrize("readers", [0, 5, 2.0, True])
def test_readers_is_checked(readers):
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float32, (1,), batch=1)
    with pytest.raises(ValueError, match=rf"readers must be an int in \[1, 4\], got {readers!r}"):
        merge_for_readers(parents, scales, shifts, ratios, extra, "swish", readers=readers)


def test_compile_fullgraph_through_merge_for_readers():
    torch._dynamo.reset()
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float32, (1, 2), channels=4, size=(4, 4))

    def fn(p0, p1):
        a, b = merge_for_readers([p0, p1], scales, shifts, ratios, extra, "relu", readers=2)
        return a * 2 + b.sin()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with use_backend("reference"):
        torch.testing.assert_close(compiled(*parents), fn(*parents))
        (got,) = torch.autograd.grad(compiled(*parents).sum(), [parents[0]])
        (want,) = torch.autograd.grad(fn(*parents).sum(), [parents[0]])
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------ row_scale (stochastic depth)
def sample_factors(batch, device, dtype=torch.float32):
    """Stochastic-depth-like per-sample factors: kept samples 1/0.75, dropped ones 0 (at least one of each)."""
    return torch.tensor([1 / 0.75, 0.0, 1 / 0.75, 1 / 0.75][:batch], device=device, dtype=dtype)


def run_row_scaled(backend, inputs, row_scale, grad, *, readers=1, sums_buffer=None):
    parents, scales, shifts, ratios, extra = inputs
    leaves = [*parents, *scales, *shifts, *([extra] if extra is not None else [])]
    with use_backend(backend):
        copies = merge_for_readers(parents, scales, shifts, ratios, extra, "swish", readers=readers,
                                   row_scale=row_scale, sums_buffer=sums_buffer)  # fmt: skip
        grads = torch.autograd.grad(copies, leaves, [grad * (i + 1) for i in range(readers)])
    return copies[0], grads


def test_row_scale_reference_is_the_scaled_branch_and_its_adjoint():
    """The reference with a row scale is act(f[n]·(s_0·y_0 + b_0)↑ + (s_1·y_1 + b_1)↑ + extra) written out in eager
    ops (f multiplies the first parent only), and its backward (every gradient, the 4 sums rows) is that expression's
    autograd in float64."""
    torch.manual_seed(0)
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float64, (1, 2), batch=3, channels=3, size=(4, 4))
    scales = [s.detach().double().requires_grad_() for s in scales]
    shifts = [s.detach().double().requires_grad_() for s in shifts]
    factors = sample_factors(3, "cpu", torch.float64)
    leaves = (*parents, *scales, *shifts, extra)

    def eager(p0, p1, s0, s1, b0, b1, e):
        first = factors.view(-1, 1, 1, 1) * (p0 * s0.view(1, -1, 1, 1) + b0.view(1, -1, 1, 1))
        second = F.interpolate(p1 * s1.view(1, -1, 1, 1) + b1.view(1, -1, 1, 1), scale_factor=2)
        return F.silu(first + second + e)

    out = merge_reference(list(parents), scales, shifts, ratios, extra, factors, "swish")
    torch.testing.assert_close(out, eager(*leaves))
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(eager(*leaves), leaves, grad)
    d_p0, d_p1, sums, d_extra = merge_backward_reference([grad], parents, scales, shifts, ratios, extra, factors,
                                                         "swish")  # fmt: skip
    rows = dict(zip(coarse_first(ratios), sums))
    assert sums.shape == (4, 3)
    got = (d_p0, d_p1, rows[0], rows[1], sums[3], sums[2], d_extra)  # the first parent's shift: the last row
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert d_p0[1].abs().sum() == 0 and sums[3].abs().sum() > 0  # the dropped sample gets no gradient


# (1, 2): the first parent is the finer one, which the extension's backward swaps to second place.
@pytest.mark.parametrize(("ratios", "extra"), [((1, 1), True), ((1, 2), False), ((4, 1), True), ((2,), True)])
@pytest.mark.parametrize("readers", [1, 2])
def test_row_scale_matches_the_reference(device, fused_backend, ratios, extra, readers):
    """Forward and every gradient with a per-sample factor on the first parent (a dropped sample among them), one or
    two readers, with and without a shared sums buffer, against the reference (fp32)."""
    inputs = make_inputs(device, torch.float32, ratios, batch=3, channels=5, extra=extra)
    factors = sample_factors(3, device)
    grad = torch.randn_like(merge_reference(*inputs, factors, "swish"))
    want_out, want = run_row_scaled("reference", inputs, factors, grad, readers=readers)
    for sums_buffer in (None, torch.zeros(4, 5, device=device)):
        out, grads = run_row_scaled(fused_backend, inputs, factors, grad, readers=readers, sums_buffer=sums_buffer)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if sums_buffer is not None:
            assert sums_buffer[3].abs().sum() > 0  # the first parent's shift row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_scale_low_precision_tolerance_rule(device, fused_backend, dtype):
    """bf16/fp16 with a row scale: fused and eager (drop-path multiply in the storage dtype) against fp32."""
    inputs = make_inputs(device, dtype, (1, 1), batch=3, channels=16, size=(6, 4))
    factors = sample_factors(3, device)
    grad = torch.randn(3, 16, 6, 4, device=device).to(dtype)
    fused, fused_grads = run_row_scaled(fused_backend, inputs, factors, grad)
    reference, reference_grads = run_row_scaled("reference", fp32_copy(inputs), factors, grad.float())
    parents, scales, shifts, _, extra = inputs
    leaves = [*parents, *scales, *shifts, extra]
    branch, other = (y * s.to(dtype).view(1, -1, 1, 1) + b.to(dtype).view(1, -1, 1, 1)
                     for y, s, b in zip(parents, scales, shifts))  # fmt: skip
    eager = F.silu(branch * factors.to(dtype).view(-1, 1, 1, 1) + other + extra)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    assert_close_by_dtype(fused, reference, eager)
    for a, b, c in zip(fused_grads, reference_grads, eager_grads, strict=True):
        assert_close_by_dtype(a, b, c)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_row_scale_gradcheck_float64(backend):
    require_backend(backend)
    torch.manual_seed(2)
    parents, _, _, ratios, extra = make_inputs("cpu", torch.float64, (1, 2), batch=2, channels=3, size=(4, 2))
    scales = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in ratios]
    shifts = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in ratios]
    factors = sample_factors(2, "cpu", torch.float64)

    def fn(p0, p1, s0, b0, e):
        return merge([p0, p1], [s0, scales[1]], [b0, shifts[1]], ratios, e, "swish", row_scale=factors)

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, (*parents, scales[0], shifts[0], extra))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_row_scale_opcheck(backend):
    require_backend(backend)
    parents, scales, shifts, ratios, extra = make_inputs("cpu", torch.float32, (2, 1), batch=2, channels=4, size=(4, 4))
    factors = sample_factors(2, "cpu")
    with use_backend(backend):
        args = ([*parents], [*scales], [*shifts], ratios, extra, factors, "swish")
        torch.library.opcheck(_merge_op, (*args, torch.zeros(4, 4)))
        grads = [torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last) for _ in range(2)]
        vectors = ([t.detach() for t in scales], [t.detach() for t in shifts])
        args = (grads, [p.detach() for p in parents], *vectors, ratios, extra.detach(), factors, "swish")
        torch.library.opcheck(_merge_backward_into_op, (*args, torch.zeros(4, 4)))
        torch.library.opcheck(_merge_backward_op, args)


def level_packed_grad(device, batch, channels, size):
    """One level's slice of a level-packed (N, Σ H·W, C) gradient (a RetinaNet head's, another level before it) as
    an (N, C, H, W) view: NHWC within each sample, its samples Σ H·W·C elements apart."""
    h, w = size
    packed = torch.randn(batch, 3 + h * w, channels, device=device)
    return packed[:, 3:].view(batch, h, w, channels).permute(0, 3, 1, 2)


@pytest.mark.parametrize("extra", [False, True])
def test_a_level_packed_gradient_is_read_in_place(device, fused_backend, extra):
    """A gradient NHWC within each sample at a wider sample stride (``nhwc_samples``) reaches the backward kernels
    as it is — no copy, none in the extension either — with the gradients of a channels_last copy of it."""
    parents, scales, shifts, ratios, extra_t = make_inputs(device, torch.float32, (1,), channels=8, size=(4, 6),
                                                           extra=extra)  # fmt: skip
    if extra:  # channels_last, as the parents: the extension copies no input either
        extra_t = extra_t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    inputs = parents, scales, shifts, ratios, extra_t
    grad = level_packed_grad(device, 2, 8, (4, 6))
    assert nhwc_samples(grad) and not grad.is_contiguous(memory_format=torch.channels_last)
    assert _nhwc_grads([grad])[0][0] is grad
    dense = grad.contiguous(memory_format=torch.channels_last)
    want = run("reference", inputs, "swish", dense)[1]
    logging = fused_backend == "cuda"
    if logging:
        torch.ops.spinenet_fast.ext_launch_log(True)
    got = run(fused_backend, inputs, "swish", grad)[1]
    if logging:
        assert not [k for k in torch.ops.spinenet_fast.ext_launch_log(False) if "copy" in k]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradients_of_other_layouts_are_copied_channels_last():
    """NCHW, a broadcast gradient (a plain sum's) and readers' terms of different layouts are copied channels_last."""
    nchw = torch.randn(2, 8, 4, 6)
    expanded = torch.ones(()).expand(2, 8, 4, 6)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    assert not nhwc_samples(nchw) and not nhwc_samples(expanded)
    for grads in ([nchw], [expanded], [cl, level_packed_grad("cpu", 2, 8, (4, 6))]):
        out = _nhwc_grads(grads)[0]
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in out)
        for a, b in zip(out, grads):
            torch.testing.assert_close(a, b)
