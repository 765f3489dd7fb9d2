"""``expand_merge_affine`` (reference, the ``cuda`` backend's ATen GEMMs, Triton under the CPU interpreter) against
eager PyTorch's eval-mode connection: the expand 1×1 convs, their ``nn.BatchNorm2d`` normalising with running
statistics, nearest upsampling, the sum, extra and activation — outputs and, through the maps computed from γ and β
as the model computes them, every gradient."""

import pytest
import torch
import torch.nn.functional as F

from spinenet_fast.ops import expand_merge_affine, expand_merge_affine_for_readers, use_backend
from spinenet_fast.ops.activation import activation_forward
from spinenet_fast.ops.expand_merge import workspace_size
from spinenet_fast.ops.expand_merge_affine import _backward_op, _expand_merge_affine_op

from ..conftest import AtenOps, require_backend
from .tolerance import assert_low_precision_rule


class EvalConnection:
    """Random inputs of one eval-mode connection: per parent a squeeze output h (its resolution 1/ratio of the
    output's), its prologue's BN affine or none (``prologue``: for every parent, or one bool per parent), an expand
    weight and the expand BN's running statistics, γ, β and eps."""

    def __init__(self, ratios, *, squeezed=(6, 3), channels=5, batch=2, size=(4, 8), prologue=True, extra=True,
                 layout="channels_last", seed=0):  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        self.ratios, self.size = list(ratios), size
        self.prologues = list(prologue) if isinstance(prologue, tuple) else [prologue] * len(ratios)
        self.parents, self.scales, self.shifts, self.weights, self.bns = [], [], [], [], []
        for ratio, c_h in zip(ratios, squeezed):
            x = rand(batch, c_h, size[0] // ratio, size[1] // ratio)
            if layout == "strided":
                x = torch.cat([x, x], 3)[..., ::2]
            elif layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            self.parents.append(x)
            self.scales.append(rand(c_h).abs() + 0.5)
            self.shifts.append(rand(c_h))
            self.weights.append(rand(channels, c_h, 1, 1) / c_h**0.5)
            # running mean, running variance, γ, β
            self.bns.append((rand(channels), rand(channels).abs() + 0.5, rand(channels), rand(channels)))
        self.extra = rand(batch, channels, *size) if extra else None

    def maps(self, dtype):
        """Each expand BN's (scale, shift) as the model computes them (``fused_merge.running_affines``)."""
        maps = []
        for mean, var, gamma, beta in self.bns:
            scale = gamma * torch.rsqrt(var + 1e-3)
            maps.append((scale.to(dtype), (beta - mean * scale).to(dtype)))
        return maps

    def args(self, dtype, weight_dtype=None):
        """The op's arguments with activations in ``dtype`` (vectors in its maths dtype; fp32 master weights for a
        low-precision ``dtype``, as under autocast)."""
        maths = torch.float64 if dtype == torch.float64 else torch.float32
        weight_dtype = weight_dtype or maths
        prologue = [(s.to(maths), b.to(maths)) if p else (None, None)
                    for s, b, p in zip(self.scales, self.shifts, self.prologues)]  # fmt: skip
        maps = self.maps(maths)
        return dict(
            parents=[h.to(dtype) for h in self.parents], scales=[s for s, _ in prologue],
            shifts=[b for _, b in prologue], weights=[w.to(weight_dtype) for w in self.weights], ratios=self.ratios,
            extra=self.extra.to(dtype) if self.extra is not None else None, bn_scales=[s for s, _ in maps],
            bn_shifts=[b for _, b in maps],
        )  # fmt: skip

    def leaves(self, dtype, weight_dtype=None):
        """Fresh leaves of every differentiable input: ``(parents, affine, weights, γ and β, extra)`` (the prologues'
        scales then shifts, of the parents with one; activations in ``dtype``, vectors in its maths dtype)."""
        maths = torch.float64 if dtype == torch.float64 else torch.float32
        copy = lambda t, d: t.detach().to(d).requires_grad_()  # noqa: E731
        parents = [copy(h, dtype) for h in self.parents]
        affine = [copy(v, maths) for vectors in (self.scales, self.shifts) for v, p in zip(vectors, self.prologues)
                  if p]  # fmt: skip
        weights = [copy(w, weight_dtype or maths) for w in self.weights]
        norm = [copy(bn[k], maths) for k in (2, 3) for bn in self.bns]
        extra = [copy(self.extra, dtype)] if self.extra is not None else []
        return parents, affine, weights, norm, extra

    def prologue_lists(self, affine):
        """``(scales, shifts)`` per parent, None where a parent has none (None for none at all)."""
        if not affine:
            return None, None
        scales, shifts = iter(affine[: len(affine) // 2]), iter(affine[len(affine) // 2 :])
        return ([next(vectors) if p else None for p in self.prologues] for vectors in (scales, shifts))

    def fused_grads(self, dtype, backend, activation="swish", readers=1, weight_dtype=None):
        """The op's output and the gradients of every leaf (``leaves``) for ``self.grad`` split over ``readers``,
        the maps computed from γ and β (differentiably, as ``fused_merge.running_affines``)."""
        parents, affine, weights, norm, extra = leaves = self.leaves(dtype, weight_dtype)
        k = len(parents)
        maps = [self.affine_map(norm[i], norm[k + i], i) for i in range(k)]
        with use_backend(backend):
            outs = expand_merge_affine_for_readers(
                parents, *self.prologue_lists(affine), weights, self.ratios, extra[0] if extra else None, activation,
                bn_scales=[m[0] for m in maps], bn_shifts=[m[1] for m in maps], readers=readers,
            )  # fmt: skip
            parts = [self.grad(dtype) / readers] * readers
            grads = torch.autograd.grad(outs, [t for group in leaves for t in group], parts)
        return outs[0], grads

    def affine_map(self, gamma, beta, i):
        mean, var = (self.bns[i][k].to(gamma.dtype) for k in (0, 1))
        scale = gamma * torch.rsqrt(var + 1e-3)
        return scale, beta - mean * scale

    def grad(self, dtype):
        g = torch.Generator().manual_seed(1)
        shape = (self.parents[0].shape[0], self.weights[0].shape[0], *self.size)
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def eager_grads(self, dtype, activation="swish", weight_dtype=None):
        """Eager autograd through the eval-mode connection (``eager``'s maths) in ``dtype``: output and gradients."""
        parents, affine, weights, norm, extra = leaves = self.leaves(dtype, weight_dtype)
        k = len(parents)
        maths = torch.float64 if dtype == torch.float64 else torch.float32
        scales, shifts = self.prologue_lists(affine)
        x = extra[0] if extra else None
        for i, (h, ratio) in enumerate(zip(parents, self.ratios)):
            a = h
            if scales is not None and scales[i] is not None:
                pre = h.to(maths) * scales[i].view(1, -1, 1, 1) + shifts[i].view(1, -1, 1, 1)
                a = activation_forward(pre, activation).to(dtype)
            if ratio > 1:
                a = F.interpolate(a, scale_factor=ratio, mode="nearest")
            e = F.conv2d(a, weights[i].to(dtype))
            mean, var = (self.bns[i][j].to(maths) for j in (0, 1))
            y = F.batch_norm(e.to(maths), mean, var, norm[i], norm[k + i], False, 0.0, 1e-3).to(dtype)
            x = y if x is None else x + y
        out = activation_forward(x, activation)
        return out, torch.autograd.grad(out, [t for group in leaves for t in group], self.grad(dtype))

    def eager(self, dtype, activation="swish"):
        """The model's eager eval-mode connection in ``dtype`` (autocast-like for bf16: bf16 activations and GEMM
        operands, fp32 BN): BN + act, upsample, the expand conv, its BN, the sum, extra, activation."""
        maths = torch.float64 if dtype == torch.float64 else torch.float32
        x = self.extra.to(dtype) if self.extra is not None else None
        for h, scale, shift, weight, bn, ratio, prologue in zip(self.parents, self.scales, self.shifts, self.weights,
                                                                 self.bns, self.ratios, self.prologues):  # fmt: skip
            a = h.to(dtype)
            if prologue:
                pre = a.to(maths) * scale.to(maths).view(1, -1, 1, 1) + shift.to(maths).view(1, -1, 1, 1)
                a = activation_forward(pre, activation).to(dtype)
            if ratio > 1:
                a = F.interpolate(a, scale_factor=ratio, mode="nearest")
            e = F.conv2d(a, weight.to(dtype))
            y = F.batch_norm(e.to(maths), *(v.to(maths) for v in bn), False, 0.0, 1e-3).to(dtype)
            x = y if x is None else x + y
        return activation_forward(x, activation)


ACTIVATIONS = ["swish", "relu"]
CASES = [
    ((1, 1), True, True, {}),
    ((1, 2), True, False, {}),
    ((4, 1), False, True, {}),
    ((2,), True, True, {"squeezed": (6,)}),
    ((1, 2), (True, False), True, {}),  # SpineNet-Mobile: a prologue on one parent only
    ((1, 1), True, True, {"batch": 1, "size": (5, 7), "layout": "strided"}),  # batch 1, odd sizes, strided
]


@pytest.mark.parametrize("ratios,prologue,extra,kwargs", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_equals_eager_eval_connection_in_float64(ratios, prologue, extra, kwargs, activation, backend):
    require_backend(backend)
    case = EvalConnection(ratios, prologue=prologue, extra=extra, **kwargs)
    with use_backend(backend):
        out = expand_merge_affine(**case.args(torch.float64), activation=activation)
    torch.testing.assert_close(out, case.eager(torch.float64, activation), rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last)


TRITON_CASES = [
    ((1, 1), True, True, {}),
    ((1, 2), True, False, {}),
    ((4, 1), False, True, {}),
    ((2,), True, True, {"squeezed": (6,)}),
    # several tiles along every axis (pixels, output channels, both squeezed widths)
    ((1, 2), True, True, {"squeezed": (20, 35), "channels": 40, "size": (8, 10)}),
    ((1, 8), True, False, {"size": (8, 16)}),
    # batch 1, odd sizes, NCHW-contiguous and strided parents; a prologue on one parent only
    ((1, 2), True, True, {"batch": 1, "squeezed": (7, 5), "size": (6, 10), "layout": "contiguous"}),
    ((1, 1), (False, True), False, {"batch": 1, "size": (5, 7), "layout": "strided"}),
]


@pytest.mark.parametrize("ratios,prologue,extra,kwargs", TRITON_CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_matches_eager_fp32(ratios, prologue, extra, kwargs, activation):
    """Triton (interpreter) in fp32 against eager in float64, and the reference in fp32: ~1e-5."""
    case = EvalConnection(ratios, prologue=prologue, extra=extra, **kwargs)
    outs = {}
    for backend in ("triton", "reference"):
        with use_backend(backend):
            outs[backend] = expand_merge_affine(**case.args(torch.float32), activation=activation)
    want = case.eager(torch.float64, activation).float()
    for backend, out in outs.items():
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=backend)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "reference", "cuda"])
def test_low_precision_rule(dtype, backend):
    """bf16/fp16 activations, fp32 master weights (autocast's): error against fp32 ≤ 2× eager's in the same dtype
    + 1e-2 (the expand outputs stay fp32 inside the op, where eager rounds them)."""
    require_backend(backend)
    case = EvalConnection((1, 2), squeezed=(20, 12), channels=24, size=(8, 8))
    with use_backend(backend):
        out = expand_merge_affine(**case.args(dtype, torch.float32))
    assert out.dtype == dtype
    assert_low_precision_rule(out, case.eager(torch.float32), case.eager(dtype))


def test_triton_launches_one_kernel_and_no_aten_work():
    """On Triton the whole connection is one kernel launch: ATen allocates the output (and promotes a dtype: no
    kernel) and does nothing else."""
    from spinenet_fast.kernels import expand_merge as kernels

    args = EvalConnection((1, 2)).args(torch.float32)
    launches = []
    original = kernels._expand_merge_fwd_kernel
    kernels._expand_merge_fwd_kernel = type("Counted", (), {"__getitem__": lambda self, grid: (
        launches.append(grid), original[grid])[1]})()  # fmt: skip
    try:
        with use_backend("triton"), AtenOps() as seen:
            expand_merge_affine(**args)
    finally:
        kernels._expand_merge_fwd_kernel = original
    assert len(launches) == 1
    assert set(seen.ops) <= {"empty", "empty_strided", "promote_types", "expand_merge_affine"}, seen.ops


@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
@pytest.mark.parametrize("prologue", [True, (False, True)])
def test_opcheck(backend, prologue):
    """The forward and the backward op: schema, fake tensors."""
    require_backend(backend)
    case = EvalConnection((1, 2), prologue=prologue)
    args = case.args(torch.float32)
    empty = torch.empty(0)
    scales = [s if s is not None else empty for s in args["scales"]]
    shifts = [b if b is not None else empty for b in args["shifts"]]
    op_args = (args["parents"], scales, shifts, args["weights"], args["ratios"], args["extra"], "swish",
               args["bn_scales"], args["bn_shifts"])  # fmt: skip
    workspace = torch.zeros(workspace_size(5, [6, 3], torch.float32, statistics=False))
    with use_backend(backend):
        torch.library.opcheck(_expand_merge_affine_op, op_args, test_utils=("test_schema", "test_faketensor"))
        backward_args = ([torch.randn_like(_expand_merge_affine_op(*op_args))], *op_args, workspace)
        torch.library.opcheck(_backward_op, backward_args, test_utils=("test_schema", "test_faketensor"))


def test_float64_only_on_the_library_backends():
    """Triton takes fp32/bf16/fp16; float64 runs on the reference (``auto`` on a CPU) and says so when forced."""
    case = EvalConnection((1, 2))
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"dtype torch\.float64 is not one of"):
        expand_merge_affine(**case.args(torch.float64))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: a.update(bn_scales=a["bn_scales"][:1]), ValueError, "bn_scales must be a list with one entry"),
        (lambda a: a.update(bn_shifts=[a["bn_shifts"][0], a["bn_shifts"][1][:2]]), ValueError,
         "bn_shifts\\[1\\] must be a float32 \\(5,\\) tensor"),
        (lambda a: a.update(bn_scales=[a["bn_scales"][0].double(), a["bn_scales"][1]]), ValueError,
         "bn_scales\\[0\\] must be a float32"),
        (lambda a: a.update(ratios=[1, 3]), ValueError, "upsampled"),
        (lambda a: a.update(weights=[a["weights"][0][:, :2], a["weights"][1]]), ValueError, "weights\\[0\\]"),
        (lambda a: a.update(extra=a["extra"][:, :2]), ValueError, "extra must be"),
        (lambda a: a.update(parents=[*a["parents"], a["parents"][0]]), ValueError, "one or two tensors"),
        (lambda a: a.update(parents=[]), TypeError, "parents must be a non-empty list"),
        (lambda a: a.update(scales=[a["scales"][0].double(), a["scales"][1]]), ValueError, "scale must be"),
        (lambda a: a.update(activation="gelu"), ValueError, "activation must be one of"),
        (lambda a: a.update(readers=5), ValueError, "readers must be an int in \\[1, 4\\]"),
        (lambda a: a.update(workspace=torch.zeros(7)), ValueError, "workspace must"),
        (lambda a: (a["extra"].requires_grad_(), a.update(workspace=torch.zeros(7))), ValueError, "workspace must"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(change, error, message):
    args = EvalConnection((1, 2)).args(torch.float32)
    change(args)
    with pytest.raises(error, match=message):
        expand_merge_affine_for_readers(**args)


def test_inputs_that_require_grad_run_without_gradients():
    """Under ``torch.no_grad()`` the op takes parameters that require grad (an eval-mode model's)."""
    case = EvalConnection((1, 2))
    args = case.args(torch.float32)
    args["weights"] = [w.requires_grad_() for w in args["weights"]]
    with torch.no_grad():
        out = expand_merge_affine(**args)
    torch.testing.assert_close(out, case.eager(torch.float64).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratios,prologue,extra,kwargs", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_gradients_equal_eager_in_float64(ratios, prologue, extra, kwargs, activation, backend):
    """The closed-form backward (the kernels' spec) is eager autograd's: every gradient (the maps' through γ and β)
    to float64 rounding, the output given to two readers."""
    require_backend(backend)
    case = EvalConnection(ratios, prologue=prologue, extra=extra, **kwargs)
    out, grads = case.eager_grads(torch.float64, activation)
    f_out, f_grads = case.fused_grads(torch.float64, backend, activation, readers=2)
    torch.testing.assert_close(f_out, out, rtol=1e-10, atol=1e-10)
    assert len(f_grads) == len(grads)
    for a, b in zip(f_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prologue", [True, (False, True)])
def test_gradcheck_float64(prologue):
    """float64 ``gradcheck`` of the op (reference) in every differentiable input, the maps as given leaves."""
    case = EvalConnection((1, 2), squeezed=(3, 2), channels=3, size=(2, 4), prologue=prologue)
    parents, affine, weights, _, extra = case.leaves(torch.float64)
    maps = [m.detach().requires_grad_() for pair in case.maps(torch.float64) for m in pair]

    def fn(p0, p1, *rest):
        scales, shifts = case.prologue_lists(list(rest[: len(affine)]))
        w0, w1, s0, b0, s1, b1, x = rest[len(affine) :]
        return expand_merge_affine([p0, p1], scales, shifts, [w0, w1], [1, 2], x, "swish", bn_scales=[s0, s1],
                                   bn_shifts=[b0, b1])  # fmt: skip

    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (*parents, *affine, *weights, *maps, *extra), eps=1e-6, atol=1e-6)


TRITON_BACKWARD_CASES = [
    ((1, 1), True, True, {}),
    ((4, 1), False, True, {}),
    ((2,), True, True, {"squeezed": (6,)}),
    # several tiles along every axis (rows, output channels, both squeezed widths): masks and cross-tile atomics
    ((1, 2), True, True, {"squeezed": (20, 35), "channels": 40, "size": (8, 10)}),
    # two upsampled parents (K1's block sums of both, no dz stored), and a ×8 parent whose blocks outgrow K1's tile
    ((2, 4), True, False, {"size": (8, 8), "squeezed": (6, 5)}),
    ((1, 8), True, True, {"size": (8, 16)}),
    # batch 1, odd sizes, strided parents; a prologue on one parent only
    ((1, 2), (False, True), True, {"batch": 1, "squeezed": (7, 5), "size": (6, 10), "layout": "strided"}),
]


@pytest.mark.parametrize("ratios,prologue,extra,kwargs", TRITON_BACKWARD_CASES)
def test_triton_gradients_match_reference_fp32(ratios, prologue, extra, kwargs):
    """Triton (interpreter) against the reference in fp32, two readers: output and every gradient."""
    require_backend("triton")
    case = EvalConnection(ratios, prologue=prologue, extra=extra, **kwargs)
    out, grads = case.fused_grads(torch.float32, "reference", readers=2)
    t_out, t_grads = case.fused_grads(torch.float32, "triton", readers=2)
    torch.testing.assert_close(t_out, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(t_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gradients_within_the_tolerance_rule(backend, weight_dtype):
    """bf16 activations (fp32 master weights, as under autocast, or bf16 weights): each output and gradient's error
    against fp32 is ≤ 2× eager bf16's + 1e-2 (odd sizes, batch 1)."""
    require_backend(backend)
    case = EvalConnection((1, 2), squeezed=(7, 5), channels=9, batch=1, size=(6, 10))
    reference, reference_grads = case.eager_grads(torch.float32)
    eager, eager_grads = case.eager_grads(torch.bfloat16, weight_dtype=weight_dtype)
    fused, fused_grads = case.fused_grads(torch.bfloat16, backend, weight_dtype=weight_dtype)
    assert_low_precision_rule(fused, reference, eager)
    for f, r, e in zip(fused_grads, reference_grads, eager_grads):
        assert f.dtype == e.dtype
        assert_low_precision_rule(f, r, e)


def test_triton_backward_launches_k1_and_one_k2_per_level_and_no_aten_work():
    """On Triton a connection of a same-level and an upsampled parent trains in one launch forward and three backward
    (K1, a K2 per parent's level), the workspace given: ATen allocates and views, nothing else."""
    from spinenet_fast.kernels import expand_merge as kernels

    case = EvalConnection((1, 2))
    args = case.args(torch.float32)
    args["parents"] = [h.requires_grad_() for h in args["parents"]]
    workspace = torch.zeros(workspace_size(5, [6, 3], torch.float32, statistics=False))
    launches = {}
    originals = {name: getattr(kernels, name) for name in ("_expand_merge_fwd_kernel", "_expand_merge_k1_kernel",
                                                           "_expand_k2_kernel")}  # fmt: skip

    def counted(name, original):
        return type("Counted", (), {"__getitem__": lambda self, grid: (
            launches.update({name: launches.get(name, 0) + 1}), original[grid])[1]})()  # fmt: skip

    try:
        for name, original in originals.items():
            setattr(kernels, name, counted(name, original))
        with use_backend("triton"), AtenOps() as seen:
            out = expand_merge_affine(**args, workspace=workspace)
            out.backward(torch.ones_like(out))
    finally:
        for name, original in originals.items():
            setattr(kernels, name, original)
    assert launches == {"_expand_merge_fwd_kernel": 1, "_expand_merge_k1_kernel": 1, "_expand_k2_kernel": 2}
    allowed = {"empty", "empty_strided", "empty_like", "promote_types", "expand_merge_affine",
               "expand_merge_affine_backward", "view", "as_strided", "detach", "ones_like", "fill_", "select",
               "slice"}  # fmt: skip
    assert set(seen.ops) <= allowed, set(seen.ops) - allowed


def test_second_backward_takes_a_fresh_workspace():
    """``retain_graph``: the first backward's accumulators are the given workspace's, a second's its own — the same
    gradients twice."""
    case = EvalConnection((1, 2))
    args = case.args(torch.float64)
    weights = args["weights"] = [w.requires_grad_() for w in args["weights"]]
    workspace = torch.zeros(workspace_size(5, [6, 3], torch.float64, statistics=False), dtype=torch.float64)
    with use_backend("reference"):
        out = expand_merge_affine(**args, workspace=workspace)
        first = torch.autograd.grad(out, weights, torch.ones_like(out), retain_graph=True)
        second = torch.autograd.grad(out, weights, torch.ones_like(out))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
