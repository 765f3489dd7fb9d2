"""``bn_finalize`` against ``nn.BatchNorm2d`` in training mode: affine map, gradients, running statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinenet_fast.ops import use_backend
from spinenet_fast.ops.bn_finalize import _bn_finalize_op, bn_finalize, bn_finalize_op, bn_finalize_reference

from ..conftest import require_backend


def stats(y: torch.Tensor):
    """``([Σy; Σy²] (2, C), values per channel)``."""
    y = y.float()
    return torch.stack([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))]), y.numel() // y.shape[1]


def random_stats(channels: int, count: int = 8, dtype=torch.float32) -> torch.Tensor:
    """[Σ; Σ²] of some count values per channel with a positive variance."""
    sums = torch.randn(channels, dtype=dtype) * 4
    return torch.stack([sums, torch.rand(channels, dtype=dtype) * 10 + sums**2 / count + 1])


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_matches_batchnorm_forward_backward_and_running_stats(device, backend):
    require_backend(backend)
    torch.manual_seed(0)
    y = torch.randn(3, 133, 5, 7, device=device) * 3 + 1
    bn = nn.BatchNorm2d(133, momentum=0.1, eps=1e-3).to(device).train()
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    expected = bn(y)

    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    y_fused = y.clone().requires_grad_()
    running_mean, running_var = torch.zeros(133, device=device), torch.ones(133, device=device)
    grad = torch.randn_like(expected)
    with use_backend(backend):  # the backward chooses its backend when it runs: inside the block
        batches = torch.zeros((), dtype=torch.long, device=device)
        scale, shift = bn_finalize(*stats(y_fused), weight, bias, eps=1e-3, running_mean=running_mean,
                                   running_var=running_var, num_batches_tracked=batches, momentum=0.1)  # fmt: skip
        out = y_fused * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        got = torch.autograd.grad(out, (y_fused, weight, bias), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert batches.item() == bn.num_batches_tracked.item() == 1

    y_ref = y.clone().requires_grad_()
    ref = F.batch_norm(y_ref, None, None, bn.weight, bn.bias, training=True, eps=1e-3)
    want = torch.autograd.grad(ref, (y_ref, bn.weight, bn.bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_running_variance_uses_the_upsampled_count():
    y = torch.randn(2, 4, 3, 3)
    running_mean, running_var = torch.zeros(4), torch.zeros(4)
    bn_finalize(*stats(y), torch.ones(4), torch.zeros(4), eps=1e-3, running_mean=running_mean,
                running_var=running_var, momentum=1.0, upsample_factor=4)  # fmt: skip
    upsampled = F.interpolate(y, scale_factor=4)
    torch.testing.assert_close(running_mean, upsampled.mean((0, 2, 3)))
    torch.testing.assert_close(running_var, upsampled.var((0, 2, 3), unbiased=True))


def test_stats_reducer_hook_sees_the_statistics_first():
    calls = []

    def doubled(stats, count):
        calls.append(count)
        return 2 * stats, 2 * count

    y = torch.randn(2, 3, 4, 4)
    scale, shift = bn_finalize(*stats(y), torch.ones(3), torch.zeros(3), eps=1e-5, stats_reducer=doubled)
    expected_scale, expected_shift, _, _ = bn_finalize_reference(*stats(y), torch.ones(3), torch.zeros(3), 1e-5)
    assert calls == [32]
    torch.testing.assert_close(scale, expected_scale)
    torch.testing.assert_close(shift, expected_shift)


def test_gradcheck_float64():
    statistics = random_stats(5, dtype=torch.float64).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(s, w, b):
        return tuple(bn_finalize_reference(s, 8, w, b, 1e-3))

    assert torch.autograd.gradcheck(fn, (statistics, weight, bias))

    def through_op(s, w, b):
        return bn_finalize_op(s.float(), 8, w.float(), b.float(), 1e-3)

    # The op's own backward against autograd of the reference, in float32.
    inputs = [t.detach().float().requires_grad_() for t in (statistics, weight, bias)]
    grads = [torch.randn(5) for _ in range(4)]
    with use_backend("reference"):
        got = torch.autograd.grad(through_op(*inputs), inputs, grads)
    want = torch.autograd.grad(fn(*inputs), inputs, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("with_statistic_grads", [False, True])
def test_backward_of_every_backend_matches_autograd_of_the_reference(backend, with_statistic_grads):
    """The one-kernel backward, with and without gradients of the batch mean and variance (None: no launch)."""
    require_backend(backend)
    weight, bias = torch.randn(133), torch.randn(133)
    inputs = [t.clone().requires_grad_() for t in (random_stats(133), weight, bias)]
    grads = [torch.randn(133) for _ in range(4)]
    outputs = slice(None) if with_statistic_grads else slice(0, 2)
    with use_backend(backend):
        fused = bn_finalize_op(inputs[0], 8, inputs[1], inputs[2], 1e-3)
        got = torch.autograd.grad(fused[outputs], inputs, grads[outputs])
    reference = bn_finalize_reference(inputs[0], 8, *inputs[1:], 1e-3)
    want = torch.autograd.grad(reference[outputs], inputs, grads[outputs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_opcheck(backend):
    require_backend(backend)
    y = torch.randn(2, 6, 3, 3)
    with use_backend(backend):
        torch.library.opcheck(_bn_finalize_op, (*stats(y), torch.rand(6), torch.randn(6), 1e-3, None, None, None,
                                                0.1, 1.0))  # fmt: skip
        running = (torch.randn(6), torch.rand(6), torch.zeros((), dtype=torch.long))
        torch.library.opcheck(_bn_finalize_op, (*stats(y), torch.rand(6), torch.randn(6), 1e-3, *running, 0.1, 1.5))


RUNNING = {"running_mean": torch.zeros(4), "running_var": torch.ones(4)}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stats": torch.zeros(2, 4, dtype=torch.float16)}, TypeError, r"stats must be float32 \(or float64\)"),
        ({"stats": torch.zeros(4)}, TypeError, r"stats must be a \(2, C\) tensor \[Σy; Σy²\]"),
        ({"weight": torch.ones(5)}, ValueError, r"weight must be a float tensor of shape \(4,\)"),
        ({"count": 1}, ValueError, "count must be an int >= 2"),
        ({"eps": 0.0}, ValueError, "eps must be positive"),
        ({"num_batches_tracked": torch.zeros(2)}, TypeError, "num_batches_tracked must be a one-element int64 tensor"),
        (
            {"running_mean": torch.zeros(5), "running_var": torch.ones(4)},
            ValueError,
            r"running_mean must be a float tensor of shape \(4,\)",
        ),
        (
            {**RUNNING, "running_var": torch.zeros(4, device="meta")},
            ValueError,
            "running_var must be a float tensor .* on cpu",
        ),
        ({"eps": float("nan")}, ValueError, "eps must be positive and finite, got nan"),
        ({"eps": "1e-3"}, TypeError, "eps must be a real number, got str"),
        ({"weight": torch.ones(4, dtype=torch.long)}, ValueError, r"weight must be a float tensor of shape \(4,\)"),
        ({"upsample_factor": 0}, ValueError, "upsample_factor must be a positive int, got 0"),
        ({"running_mean": torch.zeros(4)}, ValueError, "running_mean was given without running_var"),
        ({**RUNNING, "momentum": 5.0}, ValueError, r"momentum must be in \[0, 1\], got 5.0"),
        ({**RUNNING, "momentum": None}, TypeError, "momentum must be a real number in .*, got NoneType"),
        (
            {"num_batches_tracked": torch.zeros((), dtype=torch.long, device="meta")},
            ValueError,
            "num_batches_tracked must be on cpu",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"stats": torch.stack([torch.zeros(4), torch.ones(4)]), "count": 8, "weight": torch.ones(4),
            "bias": torch.zeros(4), "eps": 1e-3, **kwargs}  # fmt: skip
    eps = args.pop("eps")
    with pytest.raises(error, match=match):
        bn_finalize(**args, eps=eps)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_gradcheck_float64_through_the_op(backend):
    require_backend(backend)
    statistics = random_stats(5, dtype=torch.float64).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: bn_finalize_op(t[0], 8, t[1], t[2], 1e-3),
                                        (statistics, weight, bias))  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_counter", [False, True])
def test_running_update_in_the_same_op(backend, dtype, with_counter):
    """The finalize launch also updates both running statistics (as ``nn.BatchNorm2d``'s lerps do) and the batch
    counter; buffers of another dtype than the statistics' (a model cast to bf16) are updated too."""
    require_backend(backend)
    statistics = random_stats(133)
    mean, var = statistics[0] / 8, statistics[1] / 8 - (statistics[0] / 8) ** 2
    running_mean, running_var = torch.randn(133).to(dtype), torch.rand(133).to(dtype)
    expected_mean = running_mean.float().lerp(mean, 0.3).to(dtype)
    expected_var = running_var.float().lerp(var * 8 / 7, 0.3).to(dtype)
    batches = torch.full((), 41, dtype=torch.long) if with_counter else None
    with use_backend(backend):
        outputs = _bn_finalize_op(statistics, 8, torch.randn(133), torch.randn(133), 1e-3, running_mean, running_var,
                                  batches, 0.3, 8 / 7)  # fmt: skip
    torch.testing.assert_close(outputs[2], mean)
    torch.testing.assert_close(outputs[3], var, rtol=1e-5, atol=1e-5)
    tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(running_mean, expected_mean, **tolerance)
    torch.testing.assert_close(running_var, expected_var, **tolerance)
    assert batches is None or batches.item() == 42


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_counter_without_running_statistics(backend):
    require_backend(backend)
    batches = torch.zeros((), dtype=torch.long)
    with use_backend(backend):
        _bn_finalize_op(random_stats(4), 8, torch.ones(4), torch.zeros(4), 1e-3, None, None, batches, 0.1, 1.0)
    assert batches.item() == 1


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_float64_statistics_with_fp32_parameters(backend):
    """The conv + BN ops' statistics are float64, γ and β fp32: the affine map, mean and variance come out fp32 (the
    variance subtracted in float64 first: here Σ²/n and mean² agree to 8 digits, which fp32 would lose), the running
    statistics updated in the launch, and the statistics' gradient is float64 like them."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    y = 1000.0 + 0.1 * torch.randn(16, 4096, generator=g, dtype=torch.float64)  # mean/std 10⁴
    statistics = torch.stack([y.sum(1), (y * y).sum(1)]).requires_grad_()
    weight, bias = torch.randn(16, generator=g).requires_grad_(), torch.randn(16, generator=g).requires_grad_()
    running = [torch.zeros(16), torch.ones(16)]
    with use_backend(backend):
        scale, shift = bn_finalize(statistics, 4096, weight, bias, eps=1e-5, running_mean=running[0],
                                   running_var=running[1])  # fmt: skip
        (scale.sum() + shift.sum()).backward()
    var = y.var(1, unbiased=False)
    want_scale = weight.detach().double() / torch.sqrt(var + 1e-5)
    assert scale.dtype == shift.dtype == torch.float32
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(running[1].double(), 0.9 + 0.1 * y.var(1), rtol=1e-6, atol=0)
    assert statistics.grad.dtype == torch.float64 and statistics.grad.abs().sum() > 0
