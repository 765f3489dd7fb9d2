"""The compiled extension: optional to import, and its ops check their arguments before any kernel runs."""

import pytest
import torch

from spinenet_fast import _extension

from .conftest import require_backend


def test_missing_extension_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "extension", None)
    monkeypatch.setattr(_extension, "unavailable_reason", "spinenet_fast._C is not available (test)")
    with pytest.raises(RuntimeError, match=r"merge needs the compiled extension.*FORCE_CUDA=1"):
        _extension.require_extension("merge")


def merge_args():
    parents = [torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)]
    return dict(parents=parents, scales=[torch.ones(4)] * 2, shifts=[torch.zeros(4)] * 2, ratios=[1, 2], extra=None,
                row_scale=None, activation="relu")  # fmt: skip


THREE_PARENTS = dict(parents=[torch.randn(1, 4, 4, 4)] * 3, scales=[torch.ones(4)] * 3, shifts=[torch.zeros(4)] * 3,
                     ratios=[1, 1, 1])  # fmt: skip


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (THREE_PARENTS, ValueError, "parents: the extension's merge takes 1 or 2 parents, got 3"),
        (dict(ratios=[1, 3]), ValueError, r"parents\[1\] of shape \[1, 4, 2, 2\] upsampled ×3"),
        (dict(ratios=[1, 0]), ValueError, r"ratios\[1\] must be a positive int, got 0"),
        (dict(scales=[torch.ones(4), torch.ones(4).double()]), TypeError, r"scales\[1\] must be Float, got Double"),
        (dict(shifts=[torch.zeros(5), torch.zeros(4)]), ValueError, r"shifts\[0\] must be a \(4,\) tensor"),
        (dict(extra=torch.zeros(1, 4, 2, 4)), ValueError, r"extra must have shape \[1, 4, 4, 4\]"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
        (dict(row_scale=torch.ones(2)), ValueError, r"row_scale must be a \(1,\) tensor on cpu, got shape \[2\]"),
        (dict(row_scale=torch.ones(1).double()), TypeError, "row_scale must be Float, got Double"),
        (dict(parents=[torch.zeros(1, 4, 4, 4, dtype=torch.int32)] * 2), TypeError, r"parents\[0\] must be float32"),
    ],
)
def test_extension_merge_rejects_bad_input(change, error, match):
    require_backend("cuda")
    args = {**merge_args(), **change}
    with pytest.raises(error, match=match):
        torch.ops.spinenet_fast.ext_merge(*args.values())


def test_extension_merge_backward_and_pool_and_finalize_reject_bad_input():
    require_backend("cuda")
    ops = torch.ops.spinenet_fast
    args = merge_args()
    with pytest.raises(ValueError, match=r"grads\[1\] must have shape \[1, 4, 4, 4\], got \[1, 4, 2, 2\]"):
        ops.ext_merge_backward([torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)], *args.values())
    with pytest.raises(ValueError, match="grads: the extension's merge backward sums 1 to 4 output gradients, got 5"):
        ops.ext_merge_backward([torch.zeros(1, 4, 4, 4)] * 5, *args.values())
    with pytest.raises(ValueError, match="sums 1 to 4 output gradients, got 0"):
        ops.ext_merge_backward([], *args.values())
    grad = [torch.zeros(1, 4, 4, 4)]
    with pytest.raises(ValueError, match=r"sums_out must be a contiguous \(3, 4\) tensor"):
        ops.ext_merge_backward(grad, *args.values(), torch.zeros(4, 3).t())
    with pytest.raises(TypeError, match="sums_out must be Float, got Double"):
        ops.ext_merge_backward(grad, *args.values(), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sums_out must be a contiguous \(4, 4\) tensor"):  # a row-scaled merge's
        ops.ext_merge_backward(grad, *{**args, "row_scale": torch.ones(1)}.values(), torch.zeros(3, 4))
    args["parents"] = [torch.randn(1, 4, 3, 3), torch.randn(1, 4, 2, 2)]
    with pytest.raises(ValueError, match="needs one ratio to divide the other"):
        ops.ext_merge_backward([torch.zeros(1, 4, 6, 6)], *{**args, "ratios": [2, 3]}.values())
    y = torch.randn(1, 4, 8, 8)
    route = ops.ext_bn_act_maxpool(y, None, None, "relu", 1, "torch", True)[1]
    with pytest.raises(ValueError, match=r"y: H and W must be multiples of 2\^num_pools = 16"):
        ops.ext_bn_act_maxpool(y, None, None, "relu", 4, "torch", True)
    with pytest.raises(ValueError, match="padding must be one of"):
        ops.ext_bn_act_maxpool(y, None, None, "relu", 1, "same", True)
    with pytest.raises(ValueError, match="scale and shift must be given together"):
        ops.ext_bn_act_maxpool(y, torch.ones(4), None, "relu", 1, "torch", True)
    with pytest.raises(ValueError, match=r"y must be 4-D \(N, C, H, W\)"):
        ops.ext_bn_act_maxpool(y[0], None, None, "relu", 1, "torch", True)
    with pytest.raises(ValueError, match=r"grad must have shape \[1, 4, 4, 4\]"):
        ops.ext_bn_act_maxpool_backward(torch.zeros(1, 4, 2, 2), y, route, None, None, "relu", 1, "torch")
    grad = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"route must be the forward's int32 \[1, 4, 4, 4\] route"):
        ops.ext_bn_act_maxpool_backward(grad, y, route.long(), None, None, "relu", 1, "torch")
    with pytest.raises(ValueError, match=r"sums_out must be a contiguous \(2, 4\) tensor"):
        ops.ext_bn_act_maxpool_backward(grad, y, route, None, None, "relu", 1, "torch", torch.zeros(4, 2).t())
    no_update = (None, None, None, 0.1, 1.0)
    with pytest.raises(TypeError, match="sums must be float32 or float64, got Half"):
        ops.ext_bn_finalize(torch.zeros(4).half(), torch.ones(4), 8, torch.ones(4), torch.zeros(4), 1e-3, *no_update)
    with pytest.raises(ValueError, match=r"weight must have shape \[4\]"):
        ops.ext_bn_finalize(torch.zeros(4), torch.ones(4), 8, torch.ones(5), torch.zeros(4), 1e-3, *no_update)
    with pytest.raises(ValueError, match="count must be a positive int"):
        ops.ext_bn_finalize(torch.zeros(4), torch.ones(4), 0, torch.ones(4), torch.zeros(4), 1e-3, *no_update)
    finalize_args = (torch.zeros(4), torch.ones(4), 8, torch.ones(4), torch.zeros(4), 1e-3)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        ops.ext_bn_finalize(*finalize_args, torch.zeros(4), None, None, 0.1, 1.0)
    with pytest.raises(TypeError, match="running_var must be Float like the statistics, got BFloat16"):
        ops.ext_bn_finalize(*finalize_args, torch.zeros(4), torch.ones(4).bfloat16(), None, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"running_mean must be a contiguous tensor of shape \[4\]"):
        ops.ext_bn_finalize(*finalize_args, torch.zeros(8)[::2], torch.ones(4), None, 0.1, 1.0)
    with pytest.raises(ValueError, match="batches must be one int64"):
        ops.ext_bn_finalize(*finalize_args, None, None, torch.zeros(2, dtype=torch.long), 0.1, 1.0)
    vectors = [torch.ones(4)] * 2
    with pytest.raises(ValueError, match=r"d_var must have shape \[4\]"):
        ops.ext_bn_finalize_backward(*vectors, None, torch.ones(5), torch.ones(4), *vectors, 8, 1e-3)
    with pytest.raises(TypeError, match="mean must be float32 or float64, got Half"):
        ops.ext_bn_finalize_backward(*vectors, None, None, torch.ones(4), torch.ones(4).half(), vectors[0], 8, 1e-3)


def test_extension_handles_empty_batches():
    require_backend("cuda")
    ops = torch.ops.spinenet_fast
    parents = [torch.randn(0, 4, 4, 4), torch.randn(0, 4, 2, 2)]
    vectors = [torch.ones(4)] * 2
    assert ops.ext_merge(parents, vectors, vectors, [1, 2], None, None, "swish").shape == (0, 4, 4, 4)
    grads = ops.ext_merge_backward([torch.zeros(0, 4, 4, 4)], parents, vectors, vectors, [1, 2], None, None, "swish")
    assert [tuple(g.shape) for g in grads] == [(0, 4, 4, 4), (0, 4, 2, 2), (3, 4)]  # d_parents, sums
    assert grads[2].abs().sum() == 0
    pooled, route = ops.ext_bn_act_maxpool(torch.zeros(0, 4, 8, 8), None, None, "relu", 2, "torch", True)
    assert pooled.shape == route.shape == (0, 4, 2, 2)


def test_extension_depthwise_rejects_bad_input_and_handles_empty_batches():
    require_backend("cuda")
    ops = torch.ops.spinenet_fast
    x, weight = torch.zeros(1, 4, 4, 4), torch.zeros(4, 9)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        ops.ext_depthwise3x3(x, weight, None, None, None, "relu", 3, 1)
    with pytest.raises(ValueError, match="pad must be 0 or 1"):
        ops.ext_depthwise3x3(x, weight, None, None, None, "relu", 2, 2)
    with pytest.raises(ValueError, match=r"weight must be a \(4, 9\) tensor on cpu, got shape \[4, 1, 3, 3\]"):
        ops.ext_depthwise3x3(x, weight.view(4, 1, 3, 3), None, None, None, "relu", 2, 1)
    with pytest.raises(TypeError, match="weight must be Float, got Half"):
        ops.ext_depthwise3x3(x, weight.half(), None, None, None, "relu", 2, 1)
    with pytest.raises(ValueError, match="H and W must be multiples of the stride 2"):
        ops.ext_depthwise3x3(torch.zeros(1, 4, 5, 4), weight, None, None, None, "relu", 2, 1)
    with pytest.raises(ValueError, match="scale and shift must be given together"):
        ops.ext_depthwise3x3(x, weight, None, torch.ones(4), None, "relu", 2, 1)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.ext_depthwise3x3(x, weight, None, None, None, "gelu", 2, 1)
    y, stats = ops.ext_depthwise3x3(x, weight, None, None, None, "relu", 2, 1)
    assert stats.dtype == torch.float64  # the statistics; their gradients come back in the maths dtype
    with pytest.raises(TypeError, match="d_sum must be Float, got Double"):
        ops.ext_depthwise3x3_backward(y, stats[0], stats[1], y, x, weight, None, None, "relu", 2, 1)
    d_stats = stats.float()
    with pytest.raises(ValueError, match=r"dy must have shape \[1, 4, 2, 2\], got \[1, 4, 4, 4\]"):
        ops.ext_depthwise3x3_backward(x, d_stats[0], d_stats[1], y, x, weight, None, None, "relu", 2, 1)
    empty = torch.zeros(0, 4, 4, 4)
    y, stats = ops.ext_depthwise3x3(empty, weight, None, None, None, "relu", 2, 1)
    assert y.shape == (0, 4, 2, 2) and stats.shape == (2, 4) and stats.abs().sum() == 0
    d_stats = stats.float()
    dx, sums = ops.ext_depthwise3x3_backward(y, d_stats[0], d_stats[1], y, empty, weight, None, None, "relu", 2, 1)
    assert dx.shape == empty.shape and sums.shape == (10, 4) and sums.abs().sum() == 0


def test_extension_depthwise_backward_without_the_statistics_gradients():
    """d_sum, d_sumsq None: g = dy, y not read (None) — the gradients of zero statistics' gradients, y ignored; one of
    them alone, or y missing beside them, is refused."""
    require_backend("cuda")
    ops = torch.ops.spinenet_fast
    x = torch.randn(2, 5, 6, 4).contiguous(memory_format=torch.channels_last)
    weight, scale, shift = torch.randn(5, 9), torch.rand(5) + 0.5, torch.randn(5)
    y, _ = ops.ext_depthwise3x3(x, weight, None, scale, shift, "swish", 2, 0)
    dy, zeros = torch.randn_like(y), torch.zeros(5)
    got = ops.ext_depthwise3x3_backward(dy, None, None, None, x, weight, scale, shift, "swish", 2, 0)
    want = ops.ext_depthwise3x3_backward(dy, zeros, zeros, y, x, weight, scale, shift, "swish", 2, 0)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"d_sum and d_sumsq must be given together .* got d_sum alone"):
        ops.ext_depthwise3x3_backward(dy, zeros, None, y, x, weight, scale, shift, "swish", 2, 0)
    with pytest.raises(ValueError, match="y is needed with the statistics' gradients, got None"):
        ops.ext_depthwise3x3_backward(dy, zeros, zeros, None, x, weight, scale, shift, "swish", 2, 0)
