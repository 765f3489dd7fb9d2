"""``bn_act_maxpool``: ``num_pools`` × 3×3/s2 max-pool of ``act(scale·y + shift)`` — equivalent to::

    a = act(scale[:, None, None] * y + shift[:, None, None]); for _ in range(num_pools): a = maxpool3x3s2(a)

``padding`` is ``"torch"`` (1 each side) or ``"tf_same"`` (0 before, 1 after), padding with −inf, for inputs whose H and
W are multiples of 2^num_pools. Tensors are (N, C, H, W), any memory format; outputs are channels_last. The
reference runs ATen's max-pool on the materialised activation in fp32 maths (the CPU path and the test oracle); the
``cuda`` backend is the extension's one-pass kernel, which in training also stores each output's route — the input
pixel ATen's pool-by-pool backward sends its gradient to — so that its backward is one pass gathering through it.
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .checks import check_accumulator
from .conv_common import CHANNELS_LAST, check_window_input, prologue_backward, prologue_forward
from .op_spec import Backend
from .padding import crop_window, pad_window, spatial_padding
from .schema_types import TensorList


def _pool_stages(y, scale, shift, activation, num_pools, padding) -> tuple[Tensor, list]:
    """The pooled activation (fp32 maths) and each stage's (padded input, ATen's argmax indices)."""
    a = prologue_forward(y, scale, shift, activation)
    stages = []
    for _ in range(num_pools):
        padded = pad_window(a, padding, float("-inf"))
        a, indices = torch.ops.aten.max_pool2d_with_indices(padded, [3, 3], [2, 2])
        stages.append((padded, indices))
    return a, stages


def _route(stages, padding, width: int) -> Tensor:
    """The level-0 pixel h·W + w of (unpadded) y that each output's gradient goes to, as ATen's pool-by-pool backward
    routes it: int32 (N, C, OH, OW) channels_last."""
    before = spatial_padding(3, 2, padding)[0]
    indices = stages[-1][1]
    for k in range(len(stages) - 1, 0, -1):  # an index into stage k's padded input -> stage k − 1's argmax there
        padded_width, earlier = stages[k][0].shape[-1], stages[k - 1][1]
        row, col = indices // padded_width - before, indices % padded_width - before
        indices = earlier.flatten(2).gather(2, (row * earlier.shape[-1] + col).flatten(2)).view_as(indices)
    padded_width = stages[0][0].shape[-1]
    row, col = indices // padded_width - before, indices % padded_width - before
    return (row * width + col).to(torch.int32).contiguous(memory_format=CHANNELS_LAST)


def bn_act_maxpool_reference(y, scale, shift, activation, num_pools, padding, with_route) -> tuple[Tensor, Tensor]:
    """``num_pools`` 3×3/s2 max-pools of the activation, with ATen's max-pool (fp32 maths), and the route (an empty
    int32 tensor without ``with_route``)."""
    a, stages = _pool_stages(y, scale, shift, activation, num_pools, padding)
    route = _route(stages, padding, y.shape[3]) if with_route else y.new_empty(0, dtype=torch.int32)
    return a.to(y.dtype).contiguous(memory_format=CHANNELS_LAST), route


def _extension_reasons(y, scale, *args) -> list[str]:
    return backends.extension_reasons(y, scale)


def _fake_forward(y, scale, shift, activation, num_pools, padding, with_route, affine_grad_buffer):
    shape = (y.shape[0], y.shape[1], y.shape[2] >> num_pools, y.shape[3] >> num_pools)
    pooled = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST)
    route = torch.empty(shape if with_route else (0,), dtype=torch.int32, device=y.device)
    return pooled, route.contiguous(memory_format=CHANNELS_LAST) if with_route else route


@op_spec.custom_op(
    "bn_act_maxpool",
    fake=_fake_forward,
    implementations={
        "reference": Backend(bn_act_maxpool_reference),
        "cuda": Backend(op_spec.extension("ext_bn_act_maxpool"), _extension_reasons),
    },
    prepare=lambda *args: args[:-1],  # the buffer is the backward's
)
def _maxpool_op(
    y: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, num_pools: int, padding: str,
    with_route: bool, affine_grad_buffer: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(pooled, route)``; ``affine_grad_buffer``: unused by the forward, the backward adds [d_scale; d_shift] into
    it (see :func:`bn_act_maxpool`)."""


def bn_act_maxpool_backward_reference(grad, y, route, scale, shift, activation, num_pools, padding) -> list[Tensor]:
    """``[dy, (d_affine = [d_scale; d_shift] (2, C))]``: ATen's max-pool backward, stage by stage, on argmaxes it
    recomputes (the route is the extension's; the oracle takes none), then the prologue's backward."""
    a, stages = _pool_stages(y, scale, shift, activation, num_pools, padding)
    d_a = grad.to(a.dtype)
    for padded, indices in reversed(stages):
        d_a = crop_window(torch.ops.aten.max_pool2d_with_indices_backward(d_a, padded, [3, 3], [2, 2], [0, 0], [1, 1],
                                                                    False, indices), padding)  # fmt: skip
    dy, *d_affine = prologue_backward(d_a, y, scale, shift, activation)
    return [dy, torch.stack(d_affine)] if d_affine else [dy]


def _extension_backward_reasons(grad, y, route, scale, *args) -> list[str]:
    return backends.extension_reasons(grad, y, scale)


def _backward_into_reference(*args) -> Tensor:
    *args, sums_out = args
    dy, d_affine = bn_act_maxpool_backward_reference(*args)
    sums_out.add_(d_affine)
    return dy


@op_spec.custom_op(
    "bn_act_maxpool_backward",
    fake=lambda grad, y, route, scale, *_: (
        [torch.empty_like(y, memory_format=CHANNELS_LAST)]
        + ([scale.new_empty((2, *scale.shape))] if scale is not None else [])
    ),
    implementations={
        "reference": Backend(bn_act_maxpool_backward_reference),
        "cuda": Backend(op_spec.extension("ext_bn_act_maxpool_backward"), _extension_backward_reasons),
    },
)
def _maxpool_backward_op(grad: Tensor, y: Tensor, route: Tensor, scale: Tensor | None, shift: Tensor | None,
                         activation: str, num_pools: int, padding: str) -> TensorList:  # fmt: skip
    """``[dy, ([d_scale; d_shift])]``."""


@op_spec.custom_op(
    "bn_act_maxpool_backward_into",
    fake=lambda grad, y, *_: torch.empty_like(y, memory_format=CHANNELS_LAST),
    implementations={
        "reference": Backend(_backward_into_reference),
        "cuda": Backend(
            lambda *args: torch.ops.spinenet_fast.ext_bn_act_maxpool_backward(*args)[0],
            lambda *args: _extension_backward_reasons(*args[:-1]),
        ),
    },
    mutates_args=("sums_out",),
)
def _maxpool_backward_into_op(grad: Tensor, y: Tensor, route: Tensor, scale: Tensor, shift: Tensor,
                              activation: str, num_pools: int, padding: str, sums_out: Tensor) -> Tensor:  # fmt: skip
    """``bn_act_maxpool_backward`` with an affine, its [d_scale; d_shift] added into the caller's zeroed ``sums_out``
    (2, C): dy."""


def _pool_setup_context(ctx, inputs, output):
    y, scale, shift, activation, num_pools, padding, _, affine_grad_buffer = inputs
    ctx.has_affine, ctx.activation, ctx.num_pools, ctx.padding = scale is not None, activation, num_pools, padding
    ctx.affine_grad = affine_grad_buffer if scale is not None else None  # used once: a second backward allocates
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros launched for the route's (absent) gradient
    ctx.save_for_backward(y, output[1], *((scale, shift) if scale is not None else ()))


def _pool_backward(ctx, grad, _):
    y, route, *affine = ctx.saved_tensors
    if route.numel() == 0 and y.numel() > 0:
        raise RuntimeError("bn_act_maxpool: the forward ran without its route (no input required a gradient)")
    scale, shift = affine if ctx.has_affine else (None, None)
    grad = torch.zeros(route.shape, dtype=y.dtype, device=y.device) if grad is None else grad
    args = (grad, y, route, scale, shift, ctx.activation, ctx.num_pools, ctx.padding)
    buffer, ctx.affine_grad = ctx.affine_grad, None
    # A forward run inside another op or module whose backend was forced (``auto_where_unimplemented``) has its
    # backward's op run the same way.
    if buffer is not None:
        with backends.auto_where_unimplemented("bn_act_maxpool_backward_into"):
            return _maxpool_backward_into_op(*args, buffer), *buffer.unbind(), None, None, None, None, None
    with backends.auto_where_unimplemented("bn_act_maxpool_backward"):
        grads = _maxpool_backward_op(*args)
    return grads[0], *(grads[1].unbind() if ctx.has_affine else (None, None)), None, None, None, None, None


_maxpool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def check_pool_input(name: str, y, scale, shift, activation, num_pools, padding) -> None:
    """The input of ``num_pools`` chained 3×3/s2 max-pools: as any stride-2 op's, with H and W multiples of
    2^num_pools."""
    check_window_input(name, y, scale, shift, activation, padding)
    if isinstance(num_pools, bool) or not isinstance(num_pools, int) or num_pools < 1:
        raise ValueError(f"num_pools must be a positive int, got {num_pools!r}")
    if y.shape[2] % 2**num_pools or y.shape[3] % 2**num_pools:
        raise ValueError(f"{name}: H and W must be multiples of 2^num_pools = {2**num_pools}, got {tuple(y.shape)}")


def bn_act_maxpool(
    y: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, num_pools: int = 1, padding: str = "torch",
    *, affine_grad_buffer: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``num_pools`` 3×3/s2 max-pools of ``act(scale·y + shift)`` (see the module docstring). Where a gradient may
    be needed, the forward also stores each output's route (the pixel its gradient goes to), and the backward gathers
    through it in one pass. ``affine_grad_buffer``: a zeroed contiguous (2, C) tensor of the scale's dtype the (first)
    backward adds [d_scale; d_shift] into (a slice of one buffer several ops share); None: the backward allocates its
    own."""
    check_pool_input("y", y, scale, shift, activation, num_pools, padding)
    if affine_grad_buffer is not None and scale is None:
        raise ValueError("affine_grad_buffer needs scale and shift (the gradients it holds are theirs)")
    if scale is not None:
        check_accumulator("affine_grad_buffer", affine_grad_buffer, (2, y.shape[1]), scale.dtype, y.device)
    inputs = (y, scale, shift)
    with_route = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _maxpool_op(y, scale, shift, activation, num_pools, padding, with_route, affine_grad_buffer)[0]
