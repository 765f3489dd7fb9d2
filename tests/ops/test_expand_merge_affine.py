"""``expand_merge_affine`` (reference, the ``cuda`` backend's ATen GEMMs, Triton under the CPU interpreter) against
eager PyTorch's eval-mode connection: the expand 1×1 convs, their ``nn.BatchNorm2d`` normalising with running
statistics, nearest upsampling, the sum, extra and activation."""

import pytest
import torch
import torch.nn.functional as F

from spinenet_fast.ops import expand_merge_affine, use_backend
from spinenet_fast.ops.activation import activation_forward
from spinenet_fast.ops.expand_merge_affine import _expand_merge_affine_op

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
        self.ratios = list(ratios)
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
    require_backend(backend)
    case = EvalConnection((1, 2), prologue=prologue)
    args = case.args(torch.float32)
    empty = torch.empty(0)
    scales = [s if s is not None else empty for s in args["scales"]]
    shifts = [b if b is not None else empty for b in args["shifts"]]
    op_args = (args["parents"], scales, shifts, args["weights"], args["ratios"], args["extra"], "swish",
               args["bn_scales"], args["bn_shifts"])  # fmt: skip
    with use_backend(backend):
        torch.library.opcheck(_expand_merge_affine_op, op_args, test_utils=("test_schema", "test_faketensor"))


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
        (lambda a: a["weights"][1].requires_grad_(), ValueError, "no backward \\(inference only\\): weights\\[1\\]"),
        (lambda a: a["extra"].requires_grad_(), ValueError, "extra requires grad"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(change, error, message):
    args = EvalConnection((1, 2)).args(torch.float32)
    change(args)
    with pytest.raises(error, match=message):
        expand_merge_affine(**args)


def test_inputs_that_require_grad_run_without_gradients():
    """Under ``torch.no_grad()`` the op takes parameters that require grad (an eval-mode model's)."""
    case = EvalConnection((1, 2))
    args = case.args(torch.float32)
    args["weights"] = [w.requires_grad_() for w in args["weights"]]
    with torch.no_grad():
        out = expand_merge_affine(**args)
    torch.testing.assert_close(out, case.eager(torch.float64).float(), rtol=1e-5, atol=1e-5)
