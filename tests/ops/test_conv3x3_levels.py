"""``conv3x3_levels`` / ``conv3x3_bn_levels``: every level's 3×3 conv (and training-mode BN) in one op, against each
level's eager conv + ``nn.BatchNorm2d`` — outputs, every gradient, running statistics and counters — on every backend,
odd sizes, batch 1, a non-contiguous packed input; bf16/fp16 by the tolerance rule; gradcheck; opcheck; bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.ops import conv3x3_bn_levels, conv3x3_levels, level_views, pack_levels, use_backend
from spinenet_fast.ops.conv3x3_levels import _bn_backward_op, _forward_op, _plain_backward_op, _plain_op

from ..conftest import require_backend
from .tolerance import assert_low_precision_rule

SIZES = [(7, 5), (4, 3), (2, 2), (1, 2), (1, 1)]  # odd P3…P7-like levels


def flat(sizes):
    return [v for s in sizes for v in s]


def make_problem(dtype=torch.float64, batch=2, c_in=5, c_out=6, sizes=SIZES, seed=0):
    """Packed input, conv weight and bias, per-level prologue affine and per-level BN modules."""
    g = torch.Generator().manual_seed(seed)
    stats = torch.promote_types(dtype, torch.float32)
    x = pack_levels([torch.randn(batch, c_in, h, w, generator=g, dtype=dtype) for h, w in sizes])
    weight = (torch.randn(c_out, c_in, 3, 3, generator=g) * 0.3).to(stats)
    bias = torch.randn(c_out, generator=g).to(stats)
    scale = (torch.rand(len(sizes), c_in, generator=g) + 0.5).to(stats)
    shift = torch.randn(len(sizes), c_in, generator=g).to(stats)
    bns = [nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.2).to(stats) for _ in sizes]
    for bn in bns:
        nn.init.normal_(bn.weight, generator=g)
        nn.init.normal_(bn.bias, generator=g)
    return x, weight, bias, scale, shift, bns


def eager_levels(x, sizes, weight, bias, scale, shift, activation, bns=None):
    """Each level's eager conv (of act(scale·x + shift)), then its BN module, packed."""
    act = {"relu": F.relu, "swish": F.silu, "identity": lambda t: t}[activation]
    outs = []
    for level, x_l in enumerate(level_views(x, flat(sizes))):
        a = x_l if scale is None else act(x_l * scale[level][:, None, None] + shift[level][:, None, None])
        y = F.conv2d(a.to(weight.dtype), weight, bias, padding=1)
        outs.append(y if bns is None else bns[level](y))
    return pack_levels(outs)


def fused_levels(x, sizes, weight, bias, scale, shift, activation, bns=None):
    """The op's output in the same form as :func:`eager_levels` (BN applied from the op's affine maps)."""
    if bns is None:
        return conv3x3_levels(x, sizes, weight, bias, scale, shift, activation)
    y, out_scale, out_shift = conv3x3_bn_levels(
        x, sizes, weight, bias, scale, shift, activation, bn_weights=[b.weight for b in bns],
        bn_biases=[b.bias for b in bns], eps=bns[0].eps, momentum=bns[0].momentum,
        running_means=[b.running_mean for b in bns], running_vars=[b.running_var for b in bns],
        num_batches_tracked=[b.num_batches_tracked for b in bns],
    )  # fmt: skip
    return out_scale.repeat_interleave(torch.tensor([h * w for h, w in sizes]), 0) * y + out_shift.repeat_interleave(
        torch.tensor([h * w for h, w in sizes]), 0
    )


def run(fn, x, weight, bias, scale, shift, bns, activation, sizes=SIZES):
    """Output, the gradients of x, weight, bias, scale, shift (and γ, β) of a fixed weighted sum, and BN buffers."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, scale, shift)]
    bns = None if bns is None else copy.deepcopy(bns)
    out = fn(*leaves[:1], sizes, *leaves[1:], activation, bns)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    params = [] if bns is None else [p for b in bns for p in (b.weight, b.bias)]
    grads = torch.autograd.grad((out.double() * weights).sum(), leaves + params)
    buffers = [] if bns is None else [t for b in bns for t in b.buffers()]
    return out, grads, buffers


@pytest.mark.parametrize("with_bn", [True, False])
@pytest.mark.parametrize("activation", ["swish", "relu"])
def test_reference_equals_each_levels_eager_conv_in_float64(with_bn, activation):
    x, weight, bias, scale, shift, bns = make_problem()
    with use_backend("reference"):
        got = run(fused_levels, x, weight, bias, scale, shift, bns if with_bn else None, activation)
    want = run(eager_levels, x, weight, bias, scale, shift, bns if with_bn else None, activation)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(got[1] + tuple(got[2]), want[1] + tuple(want[2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("with_bn", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_backends_match_the_reference(backend, with_bn, batch):
    """fp32, every output, gradient and buffer; batch 1 with ≥ 2 values per channel on every level."""
    require_backend(backend)
    sizes = SIZES if batch == 2 else [(5, 3), (3, 3), (2, 2), (1, 2), (2, 1)]
    x, weight, bias, scale, shift, bns = make_problem(torch.float32, batch=batch, sizes=sizes, seed=batch)
    results = {}
    for name in (backend, "reference"):
        with use_backend(name):
            results[name] = run(fused_levels, x, weight, bias, scale, shift, bns if with_bn else None, "swish", sizes)
    got, want = results[backend], results["reference"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1] + tuple(got[2]), want[1] + tuple(want[2])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_no_prologue_no_bias_and_a_non_contiguous_input():
    """The first tower layer's form (raw input, identity) with a strided packed input, Triton against eager."""
    x, weight, _, _, _, bns = make_problem(torch.float32)
    wide = torch.stack([x, x], 3).flatten(2)[..., ::2]  # the same values, every other channel of a wider tensor
    assert not wide.is_contiguous()
    with use_backend("triton"):
        got = fused_levels(wide, SIZES, weight, None, None, None, "identity", copy.deepcopy(bns))
    want = eager_levels(x, SIZES, weight, None, None, None, "identity", copy.deepcopy(bns))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(backend, dtype):
    """bf16/fp16 activations with fp32 parameters (autocast's form): output and every gradient against fp32 no worse
    than eager's in the same dtype, by the tolerance rule."""
    require_backend(backend)
    sizes = [(6, 6), (4, 4), (3, 3), (2, 2), (2, 2)]
    x, weight, bias, scale, shift, bns = make_problem(torch.float32, c_in=8, c_out=8, sizes=sizes)
    reference = run(eager_levels, x, weight, bias, scale, shift, bns, "swish", sizes)

    def eager_low(x, sizes, weight, *args):
        return eager_levels(x, sizes, weight.to(dtype), *args)  # BN of the low-precision conv, fp32 parameters

    low = run(eager_low, x.to(dtype), weight, bias.to(dtype), scale, shift, bns, "swish", sizes)
    with use_backend(backend):
        got = run(fused_levels, x.to(dtype), weight, bias, scale, shift, bns, "swish", sizes)
        assert conv3x3_levels(x.to(dtype), sizes, weight, bias, scale, shift, "swish").dtype == dtype
    assert_low_precision_rule(got[0], reference[0], low[0])
    for a, b, c in zip(got[1], reference[1], low[1]):
        assert_low_precision_rule(a, b, c)


@pytest.mark.parametrize("with_bn", [True, False])
def test_gradcheck_float64(with_bn):
    sizes = [(3, 2), (2, 2), (1, 2)]
    x, weight, bias, scale, shift, bns = make_problem(torch.float64, batch=2, c_in=2, c_out=3, sizes=sizes)
    bns = [bn.train() for bn in bns]

    def fn(x, weight, bias, scale, shift, *params):
        if not with_bn:
            return conv3x3_levels(x, sizes, weight, bias, scale, shift, "swish")
        return conv3x3_bn_levels(x, sizes, weight, bias, scale, shift, "swish", bn_weights=list(params[:3]),
                                 bn_biases=list(params[3:]), eps=1e-3)  # fmt: skip

    params = [b.weight.detach() for b in bns] + [b.bias.detach() for b in bns]
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias, scale, shift, *params)]
    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, inputs if with_bn else inputs[:5])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    sizes = [3, 2, 2, 2]
    x, weight, bias, scale, shift, bns = make_problem(torch.float32, c_in=3, c_out=4, sizes=[(3, 2), (2, 2)])
    stats, counters = torch.zeros(2, 2, 4), torch.zeros(2, dtype=torch.int32)
    gammas, betas = [b.weight.detach() for b in bns], [b.bias.detach() for b in bns]
    running = ([b.running_mean for b in bns], [b.running_var for b in bns], [b.num_batches_tracked for b in bns])
    with use_backend(backend):
        torch.library.opcheck(_plain_op, (x, sizes, weight, bias, scale, shift, "relu"))
        torch.library.opcheck(_forward_op, (x, sizes, weight, bias, scale, shift, "swish", stats, counters, gammas,
                                            betas, 1e-3, *running, 0.1))  # fmt: skip
        fresh = (torch.zeros(2, 2, 4), torch.zeros(2, dtype=torch.int32))
        y, *_, mean, var = _forward_op(x, sizes, weight, bias, scale, shift, "swish", *fresh, gammas, betas, 1e-3, [],
                                       [], [], 0.1)  # fmt: skip
        dy, d_affine = torch.randn_like(y), torch.randn(2, 4)
        torch.library.opcheck(_bn_backward_op, (dy, d_affine, d_affine, y, x, sizes, weight, scale, shift, "swish",
                                                True, gammas, mean, var, 1e-3))  # fmt: skip
        empty = torch.empty(0)
        torch.library.opcheck(_plain_backward_op, (dy, empty, empty, empty, x, sizes, weight, None, None, "identity",
                                                   False, [empty], empty, empty, 1.0))  # fmt: skip


def test_bad_input():
    x, weight, bias, scale, shift, bns = make_problem(torch.float32)
    bn = dict(bn_weights=[b.weight for b in bns], bn_biases=[b.bias for b in bns], eps=1e-3)
    with pytest.raises(ValueError, match="sizes must be 1 to 5"):
        conv3x3_levels(x, SIZES * 2, weight)
    with pytest.raises(ValueError, match=r"x must be a float \(N, 54, C\)"):
        conv3x3_levels(x[:, 1:], SIZES, weight)
    with pytest.raises(ValueError, match="weight must be"):
        conv3x3_levels(x, SIZES, weight[:, :2])
    with pytest.raises(ValueError, match=r"scale must be a torch.float32 \(5, 5\)"):
        conv3x3_levels(x, SIZES, weight, bias, scale[:2], shift[:2], "relu")
    with pytest.raises(ValueError, match="scale and shift"):
        conv3x3_levels(x, SIZES, weight, bias, scale, None, "relu")
    with pytest.raises(ValueError, match="activation"):
        conv3x3_levels(x, SIZES, weight, bias, scale, shift, "gelu")
    with pytest.raises(ValueError, match="bn_weights must be a list of 5"):
        conv3x3_bn_levels(x, SIZES, weight, **{**bn, "bn_weights": bn["bn_weights"][:4]})
    with pytest.raises(ValueError, match="count must be an int >= 2"):  # batch 1 and a 1×1 level: one value
        conv3x3_bn_levels(x[:1], SIZES, weight, **bn)
    with pytest.raises(ValueError, match="stats_buffer must be"):
        conv3x3_bn_levels(x, SIZES, weight, **bn, stats_buffer=torch.zeros(3))
