"""BN statistics of lopsided maps — a channel whose mean dwarfs its spread — in every op that owns a training-mode BN
besides ``conv1x1_bn`` / ``conv3x3_bn`` (``test_conv_bn.py``): ``expand_merge``, ``conv3x3_bn_levels`` and the
depthwise ``conv3x3_bn``; and the statistics ops' own [Σy; Σy²] through ``bn_finalize``. The variance Σy²/n − mean²
cancels ~(mean/std)² of its digits; the ops keep the statistics in float64 (each tile's moments added), so their fp32
BN output is as accurate as eager's. Also the float64 views of the statistics in a shared fp32 buffer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.ops import (
    bn_finalize,
    conv1x1_bn_stats,
    conv3x3_bn,
    conv3x3_bn_levels,
    expand_merge,
    level_views,
    pack_levels,
    use_backend,
)
from spinenet_fast.ops.bn_finalize import check_stats_alignment, stats_slots, take_stats
from spinenet_fast.ops.conv3x3_levels import levels_stats_size
from spinenet_fast.ops.expand_merge import workspace_size

from ..conftest import require_backend
from .tolerance import max_abs_error

BACKENDS = ["reference", "triton", "cuda"]
RATIOS = [20, 80]


def assert_as_accurate_as_eager(fused, eager, reference, ratio) -> None:
    """The fused fp32 output's error against float64 at most twice eager's fp32 one (itself ~eps·ratio)."""
    eager_error = max_abs_error(eager.double(), reference)
    fused_error = max_abs_error(fused.double(), reference)
    assert eager_error < ratio * 5e-6
    assert fused_error <= 2 * eager_error, (fused_error, eager_error)


def assert_lopsided(y: torch.Tensor, ratio: int) -> None:
    """Every channel's |mean| / std of y (N, C, H, W) is at least half ``ratio``: the test tests what it says."""
    achieved = (y.mean((0, 2, 3)) / y.std((0, 2, 3))).abs().min()
    assert achieved > ratio / 2, achieved


def bn_affine(bn: nn.BatchNorm2d, dtype=torch.float32) -> dict:
    return dict(bn_weight=bn.weight.to(dtype), bn_bias=bn.bias.to(dtype), eps=bn.eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_views_are_aligned_float64(dtype):
    """``take_stats``: a float64 (2, C) view 8 bytes from the buffer's start, inside the ``stats_slots`` elements from
    the offset asked for; what the view holds lands in the buffer. A buffer that starts off an 8-byte boundary is
    refused by name (``check_stats_alignment``), as the ops that take one do."""
    per = 8 // torch.empty(0, dtype=dtype).element_size()
    storage = torch.zeros(64, dtype=dtype)
    for start in range(0, 4, per):
        for offset in range(3):
            buffer = storage[start:]
            check_stats_alignment("buffer", buffer)
            stats, end = take_stats(buffer, offset, 5)
            assert stats.dtype == torch.float64 and stats.shape == (2, 5) and stats.data_ptr() % 8 == 0
            assert offset <= end - 10 * per and end <= offset + stats_slots(5, dtype)
            stats.fill_(1.0)
            assert buffer[:end].count_nonzero() > 0 and buffer[end:].count_nonzero() == 0
            storage.zero_()
    if dtype == torch.float32:
        with pytest.raises(ValueError, match="buffer holds float64 statistics and must start at an 8-byte boundary"):
            check_stats_alignment("buffer", storage[1:])
        with pytest.raises(ValueError, match="stats_buffer holds float64 statistics"):
            sizes = [(2, 2)]
            conv3x3_bn_levels(torch.randn(2, 4, 3), sizes, torch.randn(3, 3, 3, 3), bn_weights=[torch.ones(3)],
                              bn_biases=[torch.zeros(3)], eps=1e-5,
                              stats_buffer=torch.zeros(levels_stats_size(1, 3, dtype) + 1)[1:])  # fmt: skip
        with pytest.raises(ValueError, match="workspace holds float64 statistics"):
            size = workspace_size(3, [4], dtype)
            expand_merge([torch.randn(2, 4, 2, 2)], None, None, [torch.randn(3, 4, 1, 1)], [1], None, "relu",
                         bn_weights=[torch.ones(3)], bn_biases=[torch.zeros(3)], eps=[1e-5],
                         workspace=torch.zeros(size + 1)[1:])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_expand_merge(backend, ratio):
    """Two parents (one upsampled ×2), raw (no prologue), of mean 0.25 through expand weights of one sign."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    spread = 0.25 / ratio * 8  # a sum of 64 terms of weight ~1/64
    parents = [0.25 + spread * torch.randn(2, 64, size, size, generator=g) for size in (8, 4)]
    parents = [p.contiguous(memory_format=torch.channels_last) for p in parents]
    weights = [(1.0 + 0.1 * torch.randn(16, 64, 1, 1, generator=g)) / 64 for _ in parents]
    bns = [nn.BatchNorm2d(16, eps=1e-5) for _ in parents]

    def eager(dtype):
        out = 0
        for h, weight, bn, ratio_ in zip(parents, weights, bns, (1, 2)):
            e = F.conv2d(h.to(dtype), weight.to(dtype))
            y = F.batch_norm(e, None, None, bn.weight.to(dtype), bn.bias.to(dtype), True, 0.0, bn.eps)
            out = out + F.interpolate(y, scale_factor=ratio_, mode="nearest")
        return out

    with torch.no_grad():
        assert_lopsided(F.conv2d(parents[0].double(), weights[0].double()), ratio)
        with use_backend(backend):
            fused = expand_merge(parents, None, None, weights, [1, 2], None, "identity",
                                 bn_weights=[bn.weight for bn in bns], bn_biases=[bn.bias for bn in bns],
                                 eps=[bn.eps for bn in bns])[0]  # fmt: skip
        assert_as_accurate_as_eager(fused, eager(torch.float32), eager(torch.float64), ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_conv3x3_bn_levels(backend, ratio):
    """Two levels, a conv of output spread ~1 and a bias of ``ratio``."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (4, 4)]
    x = pack_levels([torch.randn(2, 16, h, w, generator=g) for h, w in sizes])
    weight = torch.randn(16, 16, 3, 3, generator=g) / 12
    bias = torch.full((16,), float(ratio))
    bns = [nn.BatchNorm2d(16, eps=1e-5) for _ in sizes]

    def eager(dtype):
        flat = [v for s in sizes for v in s]
        convs = [F.conv2d(x_l.to(dtype), weight.to(dtype), bias.to(dtype), padding=1) for x_l in level_views(x, flat)]
        return pack_levels([F.batch_norm(y, None, None, bn.weight.to(dtype), bn.bias.to(dtype), True, 0.0, bn.eps)
                            for y, bn in zip(convs, bns)]), convs  # fmt: skip

    with torch.no_grad():
        reference, convs = eager(torch.float64)
        assert_lopsided(convs[0], ratio)
        with use_backend(backend):
            y, scale, shift = conv3x3_bn_levels(x, sizes, weight, bias, bn_weights=[bn.weight for bn in bns],
                                                bn_biases=[bn.bias for bn in bns], eps=1e-5)  # fmt: skip
        pixels = torch.tensor([h * w for h, w in sizes])
        fused = y * scale.repeat_interleave(pixels, 0) + shift.repeat_interleave(pixels, 0)
        assert_as_accurate_as_eager(fused, eager(torch.float32)[0], reference, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("ratio", RATIOS)
def test_depthwise_conv3x3_bn(backend, stride, ratio):
    """SpineNet-Mobile's depthwise 3×3 conv + BN: output spread ~1, a bias of ``ratio``."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 1, 3, 3, generator=g) / 3
    bias = torch.full((16,), float(ratio))
    bn = nn.BatchNorm2d(16, eps=1e-5)

    def eager(dtype):
        y = F.conv2d(x.to(dtype), weight.to(dtype), bias.to(dtype), stride=stride, padding=1, groups=16)
        return F.batch_norm(y, None, None, bn.weight.to(dtype), bn.bias.to(dtype), True, 0.0, bn.eps), y

    with torch.no_grad():
        reference, conv = eager(torch.float64)
        assert_lopsided(conv, ratio)
        with use_backend(backend):
            y, scale, shift = conv3x3_bn(x, weight, stride=stride, bias=bias, **bn_affine(bn))
        fused = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        assert_as_accurate_as_eager(fused, eager(torch.float32)[0], reference, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_statistics_op_through_bn_finalize(backend, ratio):
    """``conv1x1_bn_stats`` then ``bn_finalize``: the float64 statistics the op returns keep the fp32 BN output as
    accurate as eager's, and their gradient flows back (cast to the maths dtype the backward kernels read)."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = (0.25 + 0.25 / ratio * 8 * torch.randn(2, 64, 8, 8, generator=g)).contiguous(memory_format=torch.channels_last)
    weight = ((1.0 + 0.1 * torch.randn(16, 64, 1, 1, generator=g)) / 64).requires_grad_()
    bn = nn.BatchNorm2d(16, eps=1e-5)

    def eager(dtype):
        y = F.conv2d(x.to(dtype), weight.detach().to(dtype))
        return F.batch_norm(y, None, None, bn.weight.to(dtype), bn.bias.to(dtype), True, 0.0, bn.eps), y

    reference, conv = eager(torch.float64)
    assert_lopsided(conv.detach(), ratio)
    with use_backend(backend):
        y, stats = conv1x1_bn_stats(x, weight)
        scale, shift = bn_finalize(stats, 2 * 8 * 8, bn.weight, bn.bias, eps=bn.eps)
        fused = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        (d_weight,) = torch.autograd.grad(fused.square().sum(), weight)
    assert stats.dtype == torch.float64 and d_weight.abs().sum() > 0
    assert_as_accurate_as_eager(fused.detach(), eager(torch.float32)[0].detach(), reference.detach(), ratio)
