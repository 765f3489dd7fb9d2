"""``bn_act_maxpool``: ``num_pools`` × 3×3/s2 max-pool of ``act(scale·y + shift)`` — equivalent to::

    a = act(scale[:, None, None] * y + shift[:, None, None]); for _ in range(num_pools): a = maxpool3x3s2(a)

``padding`` is ``"torch"`` (1 each side) or ``"tf_same"`` (0 before, 1 after), padding with −inf, for inputs whose H and
W are multiples of 2^num_pools. Tensors are (N, C, H, W), any memory format; outputs are channels_last. The
reference runs ATen's max-pool on the materialised activation in fp32 maths (the CPU path and the test oracle); the
``cuda`` backend is the extension's one-pass kernel, whose backward recomputes each window's argmax exactly as
ATen's pool-by-pool backward picks it.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .conv_common import CHANNELS_LAST, check_stride2_input, prologue_backward, prologue_forward
from .padding import crop_window, pad_window
from .schema_types import TensorList


def bn_act_maxpool_reference(y, scale, shift, activation, num_pools, padding) -> Tensor:
    """``num_pools`` 3×3/s2 max-pools of the activation, with ATen's max-pool (fp32 maths)."""
    a = prologue_forward(y, scale, shift, activation)
    for _ in range(num_pools):
        a = F.max_pool2d(pad_window(a, padding, float("-inf")), 3, 2)
    return a.to(y.dtype).contiguous(memory_format=CHANNELS_LAST)


backends.register("bn_act_maxpool", "reference", lambda *args: [])(bn_act_maxpool_reference)


@backends.register("bn_act_maxpool", "cuda", lambda y, scale, shift, *args: backends.extension_reasons(y, scale))
def _maxpool_extension(y, scale, shift, activation, num_pools, padding) -> Tensor:
    return torch.ops.spinenet_fast.ext_bn_act_maxpool(y, scale, shift, activation, num_pools, padding)


def bn_act_maxpool_backward_reference(grad, y, scale, shift, activation, num_pools, padding) -> list[Tensor]:
    """``[dy, (d_affine = [d_scale; d_shift] (2, C))]``: max-pool argmaxes recomputed stage by stage, then
    scattered back."""
    a = prologue_forward(y, scale, shift, activation)
    stages = []
    for _ in range(num_pools):
        padded = pad_window(a, padding, float("-inf"))
        a, indices = torch.ops.aten.max_pool2d_with_indices(padded, [3, 3], [2, 2])
        stages.append((padded, indices))
    d_a = grad.to(a.dtype)
    for padded, indices in reversed(stages):
        d_a = crop_window(torch.ops.aten.max_pool2d_with_indices_backward(d_a, padded, [3, 3], [2, 2], [0, 0], [1, 1],
                                                                    False, indices), padding)  # fmt: skip
    dy, *d_affine = prologue_backward(d_a, y, scale, shift, activation)
    return [dy, torch.stack(d_affine)] if d_affine else [dy]


backends.register("bn_act_maxpool_backward", "reference", lambda *args: [])(bn_act_maxpool_backward_reference)


@backends.register("bn_act_maxpool_backward", "cuda",
                   lambda grad, y, scale, *args: backends.extension_reasons(grad, y, scale))  # fmt: skip
def _maxpool_backward_extension(grad, y, scale, shift, activation, num_pools, padding) -> list[Tensor]:
    return torch.ops.spinenet_fast.ext_bn_act_maxpool_backward(grad, y, scale, shift, activation, num_pools, padding)


@torch.library.custom_op("spinenet_fast::bn_act_maxpool", mutates_args=())
def _maxpool_op(y: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, num_pools: int,
                padding: str) -> Tensor:  # fmt: skip
    args = (y, scale, shift, activation, num_pools, padding)
    return backends.run("bn_act_maxpool", *args)


@_maxpool_op.register_fake
def _(y, scale, shift, activation, num_pools, padding):
    shape = (y.shape[0], y.shape[1], y.shape[2] >> num_pools, y.shape[3] >> num_pools)
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST)


@torch.library.custom_op("spinenet_fast::bn_act_maxpool_backward", mutates_args=())
def _maxpool_backward_op(grad: Tensor, y: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str,
                         num_pools: int, padding: str) -> TensorList:  # fmt: skip
    args = (grad, y, scale, shift, activation, num_pools, padding)
    return backends.run("bn_act_maxpool_backward", *args)


@_maxpool_backward_op.register_fake
def _(grad, y, scale, shift, activation, num_pools, padding):
    grads = [torch.empty_like(y, memory_format=CHANNELS_LAST)]
    return grads + ([scale.new_empty((2, *scale.shape))] if scale is not None else [])


def _pool_setup_context(ctx, inputs, output):
    y, scale, shift, activation, num_pools, padding = inputs
    ctx.has_affine, ctx.activation, ctx.num_pools, ctx.padding = scale is not None, activation, num_pools, padding
    ctx.save_for_backward(y, *((scale, shift) if scale is not None else ()))


def _pool_backward(ctx, grad):
    y, *affine = ctx.saved_tensors
    scale, shift = affine if ctx.has_affine else (None, None)
    grads = _maxpool_backward_op(grad, y, scale, shift, ctx.activation, ctx.num_pools, ctx.padding)
    return grads[0], *(grads[1].unbind() if ctx.has_affine else (None, None)), None, None, None


_maxpool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def bn_act_maxpool(
    y: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, num_pools: int = 1, padding: str = "torch"
) -> Tensor:
    """``num_pools`` 3×3/s2 max-pools of ``act(scale·y + shift)`` (see the module docstring)."""
    check_stride2_input("y", y, scale, shift, activation, padding)
    if isinstance(num_pools, bool) or not isinstance(num_pools, int) or num_pools < 1:
        raise ValueError(f"num_pools must be a positive int, got {num_pools!r}")
    if y.shape[2] % 2**num_pools or y.shape[3] % 2**num_pools:
        raise ValueError(f"y: H and W must be multiples of 2^num_pools = {2**num_pools}, got {tuple(y.shape)}")
    return _maxpool_op(y, scale, shift, activation, num_pools, padding)
