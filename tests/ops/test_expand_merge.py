"""``expand_merge`` (reference, Triton under the CPU interpreter) against eager PyTorch: the expand 1×1 convs, their
training-mode ``nn.BatchNorm2d`` (running statistics included), a downsampling parent's max-pools, nearest
upsampling, the sum, extra and activation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.models.layers import MaxPool3x3s2
from spinenet_fast.ops import expand_merge, use_backend
from spinenet_fast.ops.activation import activation_forward
from spinenet_fast.ops.expand_merge import _backward_op, _forward_op, workspace_size

from ..conftest import require_backend
from .tolerance import assert_low_precision_rule


class Connection:
    """Random inputs of one connection and its eager modules: per parent a raw squeeze output h (or, with
    ``pools``, a stride-2 conv's raw output 2^pools times the target's size), the BN affine before the expand conv
    (or none: ``prologue`` for every parent, or one bool per parent), an expand conv and its BN; ``offset`` added to
    every h (expand inputs whose mean outgrows their spread)."""

    def __init__(self, ratios, *, squeezed=(6, 3), channels=5, batch=2, size=(4, 8), prologue=True, extra=True,
                 dtype=torch.float64, layout="channels_last", seed=0, pools=None, padding="torch",
                 offset=0.0):  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        h, w = size
        self.ratios, self.dtype = list(ratios), dtype
        self.pools, self.padding = list(pools or [0] * len(ratios)), padding
        self.parents, self.scales, self.shifts, self.convs, self.bns = [], [], [], [], []
        for ratio, c_h, num_pools in zip(ratios, squeezed, self.pools):
            x = rand(batch, c_h, (h // ratio) << num_pools, (w // ratio) << num_pools) + offset
            if layout == "strided":
                x = torch.cat([x, x], 3)[..., ::2]
            elif layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            self.parents.append(x.to(dtype))
            self.scales.append(rand(c_h).abs() + 0.5)
            self.shifts.append(rand(c_h))
            conv = nn.Conv2d(c_h, channels, 1, bias=False).double()
            conv.weight.data = rand(channels, c_h, 1, 1) / c_h**0.5
            bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01).double()
            bn.weight.data, bn.bias.data = rand(channels), rand(channels)
            self.convs.append(conv)
            self.bns.append(bn)
        self.prologues = list(prologue) if isinstance(prologue, tuple) else [prologue] * len(self.ratios)
        self.extra = rand(batch, channels, h, w).to(dtype) if extra else None
        self.grads = [rand(batch, channels, h, w).to(dtype)]

    def leaves(self, dtype):
        """Fresh leaf copies of every differentiable input (the activations in ``dtype``); ``affine``: the scales,
        then the shifts, of the parents with a prologue."""
        copy = lambda t, d: t.detach().to(d).requires_grad_()  # noqa: E731
        parents = [copy(p, dtype) for p in self.parents]
        with_prologue = [v for vectors in (self.scales, self.shifts) for v, p in zip(vectors, self.prologues) if p]
        affine = [copy(v, torch.float64 if dtype == torch.float64 else torch.float32) for v in with_prologue]
        params = [copy(c.weight, torch.float64 if dtype == torch.float64 else torch.float32) for c in self.convs]
        params += [copy(b.weight, params[0].dtype) for b in self.bns] + [
            copy(b.bias, params[0].dtype) for b in self.bns
        ]
        extra = [copy(self.extra, dtype)] if self.extra is not None else []
        return parents, affine, params, extra

    def prologue_lists(self, affine):
        """``(scales, shifts)`` per parent, None where a parent has no prologue (None for none at all)."""
        if not affine:
            return None, None
        scales, shifts = iter(affine[: len(affine) // 2]), iter(affine[len(affine) // 2 :])
        return ([next(vectors) if p else None for p in self.prologues] for vectors in (scales, shifts))

    def bn_state(self, dtype):
        return [(b.running_mean.clone().to(dtype), b.running_var.clone().to(dtype)) for b in self.bns]

    def eager(self, dtype, activation="swish"):
        """Eager PyTorch in ``dtype`` (autocast-like for bf16: bf16 activations and GEMM operands, fp32 BN):
        ``(out, grads, running statistics)``."""
        parents, affine, params, extra = self.leaves(dtype)
        k = len(parents)
        running = self.bn_state(torch.float32 if dtype != torch.float64 else dtype)
        x = extra[0] if extra else None
        scales, shifts = self.prologue_lists(affine)
        for i, (h, ratio) in enumerate(zip(parents, self.ratios)):
            a = h
            if scales is not None and scales[i] is not None:
                scale, shift = scales[i].view(1, -1, 1, 1), shifts[i].view(1, -1, 1, 1)
                a = activation_forward(h.to(scale.dtype) * scale + shift, activation).to(dtype)
            for _ in range(self.pools[i]):  # as the model's eager connection: the pools after the BN + act
                a = MaxPool3x3s2(self.padding)(a)
            if ratio > 1:  # as the model's eager connection: upsample, then the expand conv and its BN
                a = F.interpolate(a, scale_factor=ratio, mode="nearest")
            e = F.conv2d(a, params[i].to(dtype))
            mean, var = running[i]
            y = F.batch_norm(e.to(params[0].dtype), mean, var, params[k + i], params[2 * k + i], True, 0.01,
                             1e-3).to(dtype)  # fmt: skip
            x = y if x is None else x + y
        out = activation_forward(x, activation)
        leaves = parents + affine + params + extra
        return out, torch.autograd.grad(out, leaves, self.grads[0].to(dtype)), running

    def fused(self, dtype, backend, activation="swish", readers=1):
        parents, affine, params, extra = self.leaves(dtype)
        k = len(parents)
        running = self.bn_state(torch.float32 if dtype != torch.float64 else dtype)
        batches = [torch.zeros((), dtype=torch.long).view(1) for _ in range(k)]
        with use_backend(backend):
            outs = expand_merge(
                parents, *self.prologue_lists(affine), params[:k], self.ratios, extra[0] if extra else None,
                activation, bn_weights=params[k : 2 * k], bn_biases=params[2 * k :], eps=[1e-3] * k,
                running_means=[r[0] for r in running], running_vars=[r[1] for r in running],
                num_batches_tracked=batches, momentums=[0.01] * k, pools=self.pools, padding=self.padding,
                readers=readers,
            )  # fmt: skip
            grad = self.grads[0].to(dtype)
            parts = [grad / readers] * readers
            leaves = parents + affine + params + extra
            grads = torch.autograd.grad(outs, leaves, parts)
        assert all(int(b) == 1 for b in batches)
        return outs[0], grads, running


ACTIVATIONS = ["swish", "relu"]
CASES = [
    ((1, 1), True, True, {}),
    ((1, 2), True, False, {}),
    ((4, 1), False, True, {}),
    ((2,), True, True, {}),
    # downsampling parents with max-pools (one, two; either padding) beside a plain or an upsampled parent
    ((1, 2), True, True, {"pools": [1, 0]}),
    ((1, 1), True, False, {"pools": [0, 2], "padding": "tf_same"}),
    ((1,), True, True, {"pools": [1], "padding": "tf_same"}),
    ((1, 1), True, True, {"batch": 1, "size": (5, 7)}),  # batch 1, odd sizes
    # SpineNet-Mobile: a prologue on one parent only (its depthwise stride-2 conv's BN + act)
    ((1, 2), (True, False), True, {}),
    ((2, 1), (False, True), False, {}),
]


@pytest.mark.parametrize("ratios,prologue,extra,kwargs", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_reference_equals_eager_in_float64(ratios, prologue, extra, kwargs, activation, backend):
    """The closed-form backward (the kernels' spec) is BN's backward: every gradient and the running statistics
    agree with eager autograd to float64 rounding, with the output given to two readers (``cuda``: the same maths
    with the extension's max-pools)."""
    require_backend(backend)
    case = Connection(ratios, prologue=prologue, extra=extra, squeezed=(6, 3)[: len(ratios)], **kwargs)
    out, grads, running = case.eager(torch.float64, activation)
    f_out, f_grads, f_running = case.fused(torch.float64, backend, activation, readers=2)
    torch.testing.assert_close(f_out, out, rtol=1e-10, atol=1e-10)
    for a, b in zip(f_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for (m, v), (em, ev) in zip(f_running, running):
        torch.testing.assert_close(m, em, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, ev, rtol=1e-12, atol=1e-12)
    assert f_out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("pools,prologue", [([0, 0], True), ([1, 0], True), ([0, 0], (False, True))])
def test_gradcheck_float64(pools, prologue):
    """float64 ``gradcheck`` of the op (reference) in every differentiable input, running statistics off (random
    values: no max-pool window holds two maxima within the finite differences' step)."""
    case = Connection((1, 2), squeezed=(3, 2), channels=3, size=(2, 4), pools=pools, prologue=prologue)
    parents, affine, params, extra = case.leaves(torch.float64)

    def fn(p0, p1, *rest):
        scales, shifts = case.prologue_lists(list(rest[: len(affine)]))
        w0, w1, g0, g1, beta0, beta1, x = rest[len(affine) :]
        return expand_merge([p0, p1], scales, shifts, [w0, w1], [1, 2], x, "swish", bn_weights=[g0, g1],
                            bn_biases=[beta0, beta1], eps=[1e-3, 1e-3], pools=pools)[0]  # fmt: skip

    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (*parents, *affine, *params, *extra), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
@pytest.mark.parametrize("pools", [[0, 0], [1, 0]])
def test_opcheck(backend, pools):
    require_backend(backend)
    case = Connection((1, 2), dtype=torch.float32, pools=pools)
    parents, affine, params, extra = case.leaves(torch.float32)
    k = 2
    args = (parents, affine[:k], affine[k:], params[:k], [1, 2], extra[0], "swish", params[k : 2 * k],
            params[2 * k :], [1e-3] * k, [], [], [], [0.1] * k, pools, "torch")  # fmt: skip

    def workspace():
        return torch.zeros(workspace_size(5, [6, 3], torch.float32))

    with use_backend(backend):
        torch.library.opcheck(_forward_op, (*args, workspace()), test_utils=("test_schema", "test_faketensor"))
        out, bn, *pooled = _forward_op(*args, workspace())
        assert pooled[0].shape == ((2, 6, 4, 8) if pools[0] else (0,))
        grads = [torch.randn_like(out)]
        backward_args = (grads, *args[:9], bn, args[9], pools, "torch", pooled[:2], pooled[2:], workspace())
        torch.library.opcheck(_backward_op, backward_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "name,change,message",
    [
        ("ratios", lambda a: a.update(ratios=[1, 3]), "upsampled"),
        ("weights", lambda a: a.update(weights=[a["weights"][0][:, :2], a["weights"][1]]), "weights\\[0\\]"),
        ("extra", lambda a: a.update(extra=a["extra"][:, :2]), "extra must be"),
        ("readers", lambda a: a.update(readers=9), "readers must be"),
        ("eps", lambda a: a.update(eps=[1e-3]), "eps must be a list"),
        ("scales", lambda a: a.update(scales=[a["scales"][0].double(), a["scales"][1]]), "scale must be"),
        ("bn_weights", lambda a: a.update(bn_weights=[a["bn_weights"][0][:2], a["bn_weights"][1]]), "weight must"),
        ("workspace", lambda a: a.update(workspace=torch.zeros(3)), "workspace must"),
        ("pools", lambda a: a.update(pools=[1]), "pools must be a list"),
        ("pools", lambda a: a.update(pools=[-1, 0]), "pools\\[0\\] must be an int"),
        ("pools", lambda a: a.update(pools=[0, 1]), "ratios\\[1\\] = 1"),
        (
            "pools",
            lambda a: a.update(pools=[1, 0], scales=[None, a["scales"][1]], shifts=[None, a["shifts"][1]]),
            "needs a prologue",
        ),
        ("shifts", lambda a: a.update(shifts=[None, a["shifts"][1]]), "both be given or both be absent"),
        ("scales", lambda a: a.update(scales=[1.0, a["scales"][1]]), "scales\\[0\\] and shifts\\[0\\] must be tensors"),
        ("pools", lambda a: a.update(pools=[3, 0]), "multiples of 2\\^num_pools"),
        ("padding", lambda a: a.update(pools=[1, 0], padding="same"), "padding must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, change, message):
    case = Connection((1, 2), dtype=torch.float32)
    parents, affine, params, extra = case.leaves(torch.float32)
    args = dict(parents=parents, scales=affine[:2], shifts=affine[2:], weights=params[:2], ratios=[1, 2],
                extra=extra[0], bn_weights=params[2:4], bn_biases=params[4:], eps=[1e-3] * 2)  # fmt: skip
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        expand_merge(**args)


TRITON_CASES = [
    ((1, 1), True, True, {}),
    ((1, 2), True, False, {}),
    ((4, 1), False, True, {}),
    ((2,), True, True, {"squeezed": (6,)}),
    # several tiles along every axis (rows, output channels, both squeezed widths): masks and cross-tile atomics
    ((1, 2), True, True, {"squeezed": (20, 35), "channels": 40, "size": (8, 10)}),
    # a pooled parent: several tiles of pooled pixels and channels (the first output-channel tile stores them)
    ((1, 1), True, True, {"squeezed": (20, 7), "channels": 40, "size": (6, 10), "pools": [1, 0]}),
    ((1, 4), True, False, {"squeezed": (5, 6), "size": (4, 8), "pools": [2, 0], "padding": "tf_same"}),
    # two upsampled parents, ×2 and ×4 (K1's 4×4 Morton groups hold the blocks of both whole), and a ×8 parent whose
    # blocks outgrow K1's fp32 tile of pixels (its K2 sums the output's dz instead)
    ((2, 4), True, False, {"size": (8, 8), "squeezed": (6, 5)}),
    ((1, 8), True, True, {"size": (8, 16)}),
    # batch 1 and odd sizes: a 3×5 parent upsampled ×2, a 5×7 map
    ((1, 2), True, True, {"batch": 1, "squeezed": (7, 5), "size": (6, 10)}),
    ((1, 1), False, False, {"batch": 1, "size": (5, 7)}),
    # a prologue on one parent only: the other parent's K2 (alone, or sharing the launch) and statistics without one
    ((4, 1), (False, True), True, {}),
    ((1, 1), (True, False), False, {"squeezed": (20, 7), "channels": 40, "size": (6, 10)}),
]


@pytest.mark.parametrize("ratios,prologue,extra,shape", TRITON_CASES)
def test_triton_matches_reference_fp32(ratios, prologue, extra, shape):
    """Triton (interpreter) against the reference in fp32, strided parents, two readers: output, every gradient,
    running statistics."""
    require_backend("triton")
    case = Connection(ratios, prologue=prologue, extra=extra, dtype=torch.float32, layout="strided", **shape)
    out, grads, running = case.fused(torch.float32, "reference", readers=2)
    t_out, t_grads, t_running = case.fused(torch.float32, "triton", readers=2)
    torch.testing.assert_close(t_out, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(t_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (m, v), (em, ev) in zip(t_running, running):
        torch.testing.assert_close(m, em, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, ev, rtol=1e-5, atol=1e-6)


BF16_CASES = [
    {"batch": 1, "squeezed": (7, 5), "channels": 9, "size": (6, 10)},  # odd sizes, batch 1
    {"batch": 1, "squeezed": (7, 5), "channels": 9, "size": (6, 10), "pools": [1, 0]},
    # expand inputs whose mean is 8× their spread, so each e's mean outgrows its deviation: Triton's backward forms the
    # BN's statistics terms from the centred input (on a GPU in TF32)
    {"squeezed": (20, 7), "channels": 40, "size": (6, 10), "offset": 8.0},
    {"squeezed": (20, 7), "channels": 40, "size": (6, 10), "offset": 8.0, "prologue": False},
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", BF16_CASES)
def test_bf16_within_the_tolerance_rule(backend, shape):
    """bf16 activations (fp32 master weights, as under autocast): each output and gradient's error against fp32 is
    ≤ 2× eager bf16's + 1e-2."""
    require_backend(backend)
    case = Connection((1, 2), dtype=torch.bfloat16, **shape)
    reference, reference_grads, _ = case.eager(torch.float32)
    eager, eager_grads, _ = case.eager(torch.bfloat16)
    fused, fused_grads, _ = case.fused(torch.bfloat16, backend)
    assert_low_precision_rule(fused, reference, eager)
    for f, r, e in zip(fused_grads, reference_grads, eager_grads):
        assert_low_precision_rule(f, r, e)
