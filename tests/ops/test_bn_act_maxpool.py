"""``bn_act_maxpool`` against the eager model's max-pools and its reference, in both padding modes."""

import pytest
import torch
import torch.nn.functional as F

from spinenet_fast.models.layers import MaxPool3x3s2
from spinenet_fast.ops import bn_act_maxpool, use_backend
from spinenet_fast.ops.bn_act_maxpool import _maxpool_backward_into_op, _maxpool_backward_op, _maxpool_op

from ..conftest import require_backend
from .tolerance import assert_close_by_dtype, assert_low_precision_rule


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("num_pools", [1, 2, 3, 4])  # ↓4, ↓8, ↓16 and ↓32 connections
@pytest.mark.parametrize("channels", [3, 8])  # scalar loads; fp32 packs of 4 in the extension
def test_bn_act_maxpool_matches_the_eager_modules(device, backend, padding, num_pools, channels):
    require_backend(backend)
    y = torch.randn(2, channels, 32, 16, device=device, requires_grad=True)
    scale = torch.randn(channels, device=device, requires_grad=True)  # γ < 0 too: the affine comes before the max
    shift = torch.randn(channels, device=device, requires_grad=True)
    expected = F.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    for _ in range(num_pools):
        expected = MaxPool3x3s2(padding)(expected)
    grad = torch.randn_like(expected)
    with use_backend(backend):
        out = bn_act_maxpool(y, scale, shift, "relu", num_pools, padding)
        got = torch.autograd.grad(out, (y, scale, shift), grad)
    torch.testing.assert_close(out, expected)
    for g, w in zip(got, torch.autograd.grad(expected, (y, scale, shift), grad)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("num_pools", [1, 2, 3])
def test_bn_act_maxpool_ties_route_like_pool_by_pool_aten(device, backend, padding, num_pools):
    """Integer inputs tie everywhere: the gradient must reach the element ATen's stage-by-stage argmax picks."""
    require_backend(backend)
    y = torch.randint(-2, 3, (1, 4, 16, 24), device=device).float().requires_grad_()
    expected = y
    for _ in range(num_pools):
        expected = MaxPool3x3s2(padding)(expected)
    grad = torch.randn_like(expected)
    with use_backend(backend):
        out = bn_act_maxpool(y, None, None, "identity", num_pools, padding)
        (got,) = torch.autograd.grad(out, (y,), grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(got, torch.autograd.grad(expected, (y,), grad)[0])


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [5, 16])  # scalar loads; 16-byte packs (4 × fp32, 8 × bf16) in the extension
def test_bn_act_maxpool_layouts_batch_one_and_bf16(device, backend, layout, dtype, channels):
    require_backend(backend)
    shape = (1, channels, 8, 12) if layout == "channels_last" else (1, channels, 8, 24)
    y = torch.randn(shape, device=device)
    y = y.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else y[..., ::2]
    y = y.to(dtype).requires_grad_()
    scale = torch.randn(channels, device=device, requires_grad=True)
    shift = torch.randn(channels, device=device, requires_grad=True)
    with use_backend(backend):
        out = bn_act_maxpool(y, scale, shift, "swish", 2, "tf_same")
        grad = torch.randn(out.shape, device=device)
        got = torch.autograd.grad(out, (y, scale, shift), grad.to(dtype))
    a = F.silu(y.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    expected = MaxPool3x3s2("tf_same")(MaxPool3x3s2("tf_same")(a))
    eager = MaxPool3x3s2("tf_same")(MaxPool3x3s2("tf_same")(F.silu(y * scale.to(dtype).view(1, -1, 1, 1)
                                                                    + shift.to(dtype).view(1, -1, 1, 1))))  # fmt: skip
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_by_dtype(out, expected, eager)
    want = torch.autograd.grad(expected, (y, scale, shift), grad)
    eager_grads = torch.autograd.grad(eager, (y, scale, shift), grad.to(dtype))
    for g, w, e in zip(got, want, eager_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        else:
            assert_low_precision_rule(g, w, e)


def test_gradcheck_float64_through_the_op():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *t: bn_act_maxpool(*t, "swish", 1, "torch"), (x, scale, shift))


def test_gradcheck_float64_through_the_extension():
    require_backend("cuda")
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with use_backend("cuda"):
        assert torch.autograd.gradcheck(lambda *t: bn_act_maxpool(*t, "swish", 1, "torch"), (x, scale, shift))
        assert torch.autograd.gradcheck(lambda *t: bn_act_maxpool(*t, "swish", 2, "tf_same"), (x, scale, shift))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("prologue", [False, True])
def test_opcheck(backend, prologue):
    require_backend(backend)
    x = torch.randn(1, 2, 8, 8)
    scale, shift = (torch.randn(2), torch.randn(2)) if prologue else (None, None)
    with use_backend(backend):
        for with_route in (False, True):
            torch.library.opcheck(_maxpool_op, (x, scale, shift, "relu", 2, "tf_same", with_route, None))
        route = _maxpool_op(x, scale, shift, "relu", 2, "tf_same", True, None)[1]
        args = (torch.randn(1, 2, 2, 2), x, route, scale, shift, "relu", 2, "tf_same")
        torch.library.opcheck(_maxpool_backward_op, args)
        if prologue:
            torch.library.opcheck(_maxpool_backward_into_op, (*args, torch.zeros(2, 2)))


@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("num_pools", [1, 2, 3])
def test_extension_route_is_aten_pool_by_pool_argmax(padding, num_pools):
    """The route the extension's forward stores (with ties everywhere) equals the reference's, composed from ATen's
    stage-by-stage argmax indices; no route is computed where no gradient can be needed."""
    require_backend("cuda")
    y = torch.randint(-2, 3, (2, 6, 16, 24)).float()
    scale, shift = torch.rand(6) + 0.5, torch.zeros(6)
    routes = []
    for backend in ("reference", "cuda"):
        with use_backend(backend):
            routes.append(_maxpool_op(y, scale, shift, "relu", num_pools, padding, True, None)[1])
    assert routes[0].dtype == routes[1].dtype == torch.int32
    assert torch.equal(routes[0], routes[1])
    with use_backend("cuda"):
        assert _maxpool_op(y, scale, shift, "relu", num_pools, padding, False, None)[1].numel() == 0


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_affine_gradients_into_a_buffer_and_a_second_backward(backend):
    """``affine_grad_buffer``: the first backward adds d_scale, d_shift into it (nothing else of it is written); a
    second backward through the same graph gets its own, equal ones; without a gradient no route is stored."""
    require_backend(backend)
    y = torch.randn(2, 5, 8, 8, requires_grad=True)
    scale, shift = (torch.rand(5) + 0.5).requires_grad_(), torch.randn(5, requires_grad=True)
    expected = MaxPool3x3s2("torch")(F.silu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)))
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (y, scale, shift), grad)
    shared = torch.zeros(3, 2, 5)
    with use_backend(backend):
        out = bn_act_maxpool(y, scale, shift, "swish", 1, "torch", affine_grad_buffer=shared[1])
        first = torch.autograd.grad(out, (y, scale, shift), grad, retain_graph=True)
        second = torch.autograd.grad(out, (y, scale, shift), grad)
        with pytest.raises(ValueError, match=r"affine_grad_buffer must be a contiguous float32 \(2, 5\) tensor"):
            bn_act_maxpool(y, scale, shift, "swish", 1, "torch", affine_grad_buffer=shared[:, 0])
        with torch.no_grad():
            torch.testing.assert_close(bn_act_maxpool(y, scale, shift, "swish", 1, "torch"), expected)
    for got in (first, second, (first[0], *shared[1].unbind())):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert shared[0].abs().sum() == 0 and shared[2].abs().sum() == 0


def test_bad_input():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="num_pools must be a positive int"):
        bn_act_maxpool(x, None, None, "relu", 0)
    with pytest.raises(ValueError, match=r"multiples of 2\^num_pools = 8"):
        bn_act_maxpool(x, None, None, "relu", 3)
    with pytest.raises(ValueError, match="scale and shift must be given together"):
        bn_act_maxpool(x, torch.ones(2), None, "relu")
    with pytest.raises(ValueError, match=r"y must have even H and W"):
        bn_act_maxpool(torch.randn(1, 2, 5, 4), None, None, "relu")
