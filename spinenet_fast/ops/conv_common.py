"""Pieces shared by the convolution ops (``conv1x1_bn_stats``, ``conv3x3_bn_stats``) and the max-pool: checks,
fakes, the prologue and the folded output gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .activation import ACTIVATIONS, activation_forward, activation_grad, stats_dtype
from .bn_finalize import STATS_DTYPE
from .checks import check_accumulator, describe, is_dense
from .padding import PADDING_MODES

CHANNELS_LAST = torch.channels_last


def check_affine_prologue(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> None:
    """``scale`` and ``shift``: both None, or both (C,) vectors of x's statistics dtype on x's device."""
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (the BN affine) or both be None")
    expected = f"{str(stats_dtype(x))[6:]} ({x.shape[1]},) tensor on {x.device}"
    for name, vector in (("scale", scale), ("shift", shift)):
        if vector is None:
            continue
        if (
            not isinstance(vector, Tensor)
            or vector.shape != (x.shape[1],)
            or vector.dtype != stats_dtype(x)
            or (vector.device != x.device)
        ):
            raise ValueError(f"{name} must be a {expected}, got {describe(vector)}")


def check_window_input(name: str, x, scale, shift, activation, padding, stride: int = 2) -> None:
    """The input of a 3×3 window op (the 3×3 conv, the max-pools) of ``stride`` 1 or 2: a floating (N, C, H, W)
    tensor (H and W even for stride 2), its prologue's vectors, activation and padding mode."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating (N, C, H, W) tensor, got {describe(x)}")
    if x.shape[2] % stride or x.shape[3] % stride:
        raise ValueError(f"{name} must have even H and W for a stride-2 op, got shape {tuple(x.shape)}")
    check_affine_prologue(x, scale, shift)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")


def conv_outputs(y: Tensor, x: Tensor, statistics: bool = True) -> list[Tensor]:
    """A conv op's ``[y, stats = [Σy; Σy²] (2, C) float64]`` from its result y (any dtype): y stored channels_last in
    x's dtype, the statistics summed (``channel_sums``) from y *as stored*. BN later normalises
    the stored y, and its backward cancels the statistics' gradient against the stored y's: statistics of the
    unrounded y would not describe the tensor they normalise, and in bf16 that mismatch grew gradient errors to 3×
    eager's (as eager BN, which takes its statistics from the bf16 conv output, does not). Without ``statistics``
    an empty stand-in (``no_statistics``)."""
    stored = y.to(x.dtype).contiguous(memory_format=CHANNELS_LAST)
    return [stored, channel_sums(stored, STATS_DTYPE) if statistics else no_statistics(x)]


def no_statistics(x: Tensor) -> Tensor:
    """What a conv op returns for its statistics where none are taken (``statistics=False``: a conv whose BN uses
    running statistics, or a conv without BN): an empty (0,) float64 tensor on x's device."""
    return x.new_empty((0,), dtype=STATS_DTYPE)


def channel_sums(y: Tensor, dtype: torch.dtype) -> Tensor:
    """[Σy; Σy²] (2, C) over (N, H, W) of y (N, C, H, W) in ``dtype``. Wider than y's maths dtype (float64 from fp32):
    from y's moments per channel in its maths dtype — mean m, then M2 = Σ(y − m)², which cancels nothing — as n·m
    and M2 + n·m² in ``dtype`` (as the kernels add each tile's, ``kernels/epilogue.py``), so that the variance
    Σy²/n − mean² loses nothing and no float64 copy of y is made."""
    values = y.to(stats_dtype(y))
    if values.dtype == dtype:
        return torch.stack([values.sum((0, 2, 3)), (values * values).sum((0, 2, 3))])
    count = y.shape[0] * y.shape[2] * y.shape[3]
    mean = values.sum((0, 2, 3), keepdim=True) / max(count, 1)
    deviation = values - mean
    spread = (deviation * deviation).sum((0, 2, 3)).to(dtype)
    share = mean.view(-1).to(dtype) * count
    return torch.stack([share, spread + share * mean.view(-1).to(dtype)])


def accumulating(forward):
    """A backend of a conv op's ``_into`` variant from a backend of the op: y returned, the statistics added into the
    caller's ``stats`` (the last argument)."""

    def run(*args):
        *args, stats = args
        y, new_stats = forward(*args)
        stats.add_(new_stats)
        return y

    return run


def added_into_buffers(backward):
    """A backend of a conv op's ``..._backward_into`` op (its statistics without a gradient; arguments dy, x, weight,
    scale, shift, the conv's own, then ``d_affine_out``, ``d_weight_out``) from a backend of the op's backward
    (``[dx, dW, (d_affine)]`` from dy, dΣ, dΣ², y, x, weight, scale, shift, the conv's own): the prologue's gradients
    added into ``d_affine_out``, dW into ``d_weight_out`` where given (then returned as an empty stand-in);
    ``(dx, dW)``."""

    def run(dy, x, weight, scale, shift, *args):
        *conv_args, d_affine_out, d_weight_out = args
        dx, d_weight, *d_affine = backward(dy, None, None, dy, x, weight, scale, shift, *conv_args)  # y: not read
        if d_affine:
            d_affine_out.add_(d_affine[0])
        if d_weight_out is not None:
            d_weight_out.add_(d_weight)
            d_weight = d_weight.new_empty(0)
        return dx, d_weight

    return run


def fake_backward_into(dy, x: Tensor, weight: Tensor, *args) -> tuple[Tensor, Tensor]:
    """Meta outputs of a ``..._backward_into`` op: dx, and dW (an empty stand-in where ``d_weight_out``, the last
    argument, holds it)."""
    dx, d_weight = fake_conv_grads(x, weight, None)
    return dx, d_weight if args[-1] is None else d_weight.new_empty(0)


def check_grad_buffers(x: Tensor, weight: Tensor, scale: Tensor | None, prologue_grad_buffer,
                       weight_grad_buffer) -> None:  # fmt: skip
    """A conv op's gradient buffers (each None, or a caller's zeroed accumulator): ``prologue_grad_buffer`` a
    contiguous (2, C_in) tensor of x's statistics dtype, for a conv with a prologue; ``weight_grad_buffer`` a float32
    tensor laid out as the dense float32 weight. Raises ``ValueError`` naming the argument otherwise."""
    if prologue_grad_buffer is not None and scale is None:
        raise ValueError("prologue_grad_buffer needs a prologue (scale and shift): the conv has none to differentiate")
    check_accumulator("prologue_grad_buffer", prologue_grad_buffer, (2, x.shape[1]), stats_dtype(x), x.device)
    check_weight_grad_buffer(weight_grad_buffer, weight, x.device)


def check_weight_grad_buffer(buffer, weight: Tensor, device: torch.device) -> None:
    """``buffer`` (if given): a float32 tensor with the shape and strides of ``weight``, a dense float32 weight, on
    ``device`` — where a conv op adds dW (fp32 accumulation). Raises ``ValueError`` naming it otherwise."""
    if buffer is None:
        return
    if weight.dtype != torch.float32:
        raise ValueError(f"weight_grad_buffer needs a float32 weight (dW accumulates in fp32), got {weight.dtype}")
    fits = isinstance(buffer, Tensor) and buffer.dtype == torch.float32 and buffer.device == device
    if not (fits and buffer.shape == weight.shape and buffer.stride() == weight.stride() and is_dense(weight)):
        strides = buffer.stride() if isinstance(buffer, Tensor) else None
        raise ValueError(
            f"weight_grad_buffer must be a float32 tensor with the dense weight's shape {tuple(weight.shape)} and "
            f"strides {weight.stride()} on {device}, got {describe(buffer)} with strides {strides}"
        )


def into_buffers_forward(ctx, forward_op, forward_args: tuple, x: Tensor, weight: Tensor, scale, shift,
                         prologue_grad: Tensor | None, weight_grad: Tensor | None) -> Tensor:  # fmt: skip
    """The body of the ``autograd.Function`` forward of a conv op without statistics whose backward adds into the
    caller's zeroed buffers (``prologue_grad``: (2, C_in), ``weight_grad``: laid out as the fp32 weight; either None):
    ``forward_op(x, weight, scale, shift, *forward_args)``'s y, what the backward needs saved on ``ctx``."""
    y, _ = forward_op(x, weight, scale, shift, *forward_args)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, scale, shift)
    ctx.prologue_grad = prologue_grad if scale is not None else None  # used once: a second backward allocates
    ctx.weight_grad, ctx.y_shape = weight_grad, tuple(y.shape)
    return y


def into_buffers_backward(ctx, backward_op, backward_args: tuple, dy: Tensor | None) -> tuple:
    """The matching backward: gradients of x, weight, scale, shift from ``backward_op(dy, x, weight, scale, shift,
    *backward_args, d_affine_out, d_weight_out)`` (a ``..._backward_into`` op), the buffers the forward left on ``ctx``
    taken (a prologue without one: a zeroed (2, C_in) allocated here)."""
    x, weight, scale, shift = ctx.saved_tensors
    prologue_grad, weight_grad = ctx.prologue_grad, ctx.weight_grad
    ctx.prologue_grad = ctx.weight_grad = None
    if scale is not None and prologue_grad is None:
        prologue_grad = torch.zeros((2, x.shape[1]), dtype=stats_dtype(x), device=x.device)
    if dy is None:
        dy = torch.zeros(ctx.y_shape, dtype=x.dtype, device=x.device)
    dx, d_weight = backward_op(dy, x, weight, scale, shift, *backward_args, prologue_grad, weight_grad)
    d_affine = prologue_grad.unbind() if scale is not None else (None, None)
    return dx, d_weight if weight_grad is None else weight_grad, *d_affine


def fake_conv_outputs(x: Tensor, weight: Tensor, height: int, width: int, statistics: bool = True
                      ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Meta outputs of a conv op: y (N, C_out, height, width) channels_last, and the (2, C_out) statistics (or their
    empty stand-in)."""
    y = torch.empty((x.shape[0], weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                    memory_format=CHANNELS_LAST)  # fmt: skip
    return y, x.new_empty((2, weight.shape[0]), dtype=STATS_DTYPE) if statistics else no_statistics(x)


def fake_conv_grads(x: Tensor, weight: Tensor, scale: Tensor | None) -> list[Tensor]:
    """Meta outputs of a conv op's backward: dx, d_weight and, with a prologue, d_affine = [d_scale; d_shift]."""
    grads = [torch.empty_like(x, memory_format=CHANNELS_LAST), torch.empty_like(weight)]
    return grads + ([scale.new_empty((2, *scale.shape))] if scale is not None else [])


def fill_output_grads(dy, d_stats, y_shape, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dy, dΣ, dΣ²)``, dy zeros where autograd passed it no gradient (None); the two statistics' gradients are
    views of ``d_stats`` (2, C) in the maths dtype the kernels read (the float64 statistics' gradient cast, one small
    launch), or both None where the statistics have none (a conv whose BN uses running statistics): the backward
    then neither reads y nor fills zeros."""
    dy = torch.zeros(y_shape, dtype=x.dtype, device=x.device) if dy is None else dy
    if d_stats is None:
        return dy, None, None
    d_sum, d_sumsq = d_stats.to(stats_dtype(x))
    return dy, d_sum, d_sumsq


def folded_output_grad(dy: Tensor, d_sum: Tensor | None, d_sumsq: Tensor | None, y: Tensor,
                       dtype: torch.dtype) -> Tensor:  # fmt: skip
    """``dy + dΣ + 2·y·dΣ²`` in ``dtype``: the gradient of a conv op's output y with its statistics' gradients folded
    in (Σy and Σy² are sums over every pixel of y); dy alone where they are None."""
    if d_sum is None:
        return dy.to(dtype)
    vector = lambda v: v.to(dtype).view(1, -1, 1, 1)  # noqa: E731
    return dy.to(dtype) + vector(d_sum) + 2 * y.to(dtype) * vector(d_sumsq)


def prologue_forward(x: Tensor, scale, shift, activation) -> Tensor:
    """``act(scale·x + shift)`` (or x) in the ops' maths dtype, with x (N, C, H, W) and (C,) vectors.

    The activation is computed in fp32 and rounded to x's dtype: it is the operand of a GEMM in x's dtype (tensor
    cores for bf16/fp16, as eager's autocast conv takes the bf16 output of BN and the activation). Every backend
    computes this same operand, so they differ by summation order only."""
    dtype = stats_dtype(x)
    if scale is None:
        return x.to(dtype)
    pre = x.to(dtype) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    return activation_forward(pre, activation).to(x.dtype).to(dtype)


def prologue_backward(d_a: Tensor, x: Tensor, scale, shift, activation) -> list[Tensor]:
    """``[dx, (d_scale, d_shift)]`` from the gradient of a = act(scale·x + shift) (or a = x)."""
    if scale is None:
        return [d_a.to(x.dtype).contiguous(memory_format=CHANNELS_LAST)]
    dtype = d_a.dtype
    pre = x.to(dtype) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    d_pre = d_a * activation_grad(pre, activation)
    dx = (d_pre * scale.to(dtype).view(1, -1, 1, 1)).to(x.dtype).contiguous(memory_format=CHANNELS_LAST)
    return [dx, (d_pre * x.to(dtype)).sum((0, 2, 3)).to(scale.dtype), d_pre.sum((0, 2, 3)).to(shift.dtype)]
