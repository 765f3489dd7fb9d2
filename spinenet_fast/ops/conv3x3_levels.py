"""3×3 stride-1 convs (padding 1, shared weight and bias) of up to five pyramid levels as one op: a RetinaNet head's
tower layer (``conv3x3_bn_levels``: each level's own training-mode BN) and predictor (``conv3x3_levels``).

The levels are one packed ragged batch, image-major: ``x`` is (N, S, C) contiguous, S = Σ_l H_l·W_l, level l's pixel
(n, h, w) at row n·S + Σ_{k<l} H_k·W_k + h·W_l + w (``sizes`` = [(H_l, W_l)]). Level l alone is::

    y_l = F.conv2d(act(scale[l]·x_l + shift[l]), weight, bias, padding=1)      # x_l: level l as (N, C, H_l, W_l)

and with a BN, ``(y, out_scale, out_shift)`` are each level's ``conv3x3_bn`` — its batch statistics finalised, its
running statistics updated — with out_scale, out_shift packed (L, C_out). On Triton each pass is one launch for all
levels (``kernels/conv3x3_levels.py``); the reference and ``cuda`` backends run the single-level ops level by level.
A predictor's packed (N, S, A·V) output viewed as (N, S·A, V) is torchvision's anchor order.
"""

from functools import partial

import torch
from torch import Tensor

from . import backends, op_spec
from .bn_finalize import affine_dtype, aligned, check_bn_args, check_stats_alignment, stats_slots, take_stats
from .checks import describe
from .conv_bn import counter_view
from .op_spec import FUSED_FIRST, Backend
from .schema_types import IntList, TensorList

MAX_LEVELS = 5


def level_views(t: Tensor, sizes: list[int]) -> list[Tensor]:
    """The levels of a packed (N, S, C) tensor as (N, C, H_l, W_l) views (``sizes``: [H_0, W_0, H_1, W_1, ...])."""
    views, offset = [], 0
    n, _, c = t.shape
    for h, w in zip(sizes[::2], sizes[1::2]):
        views.append(t[:, offset : offset + h * w].view(n, h, w, c).permute(0, 3, 1, 2))
        offset += h * w
    return views


def pack_levels(levels: list[Tensor]) -> Tensor:
    """(N, C, H_l, W_l) tensors as one packed (N, S, C) tensor (one copy)."""
    return torch.cat([t.permute(0, 2, 3, 1).flatten(1, 2) for t in levels], 1)


def backward_sums(x: Tensor, weight: Tensor, levels: int, has_bias: bool, has_prologue: bool, with_bn: bool
                  ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:  # fmt: skip
    """A backward's one zeroed buffer (the statistics' dtype) and its parts: dW in the weight's (dense) layout, the
    bias gradient (C_out,), the prologue's [d_scale; d_shift] (2, L, C_in) and, for a conv without a BN, the zero
    statistics' gradients it folds (2, L, C_out) — each empty where absent."""
    sums = torch.zeros(sum(_sums_sizes(x, weight, levels, has_bias, has_prologue, with_bn)),
                       dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)  # fmt: skip
    return sums, split_sums(sums, x, weight, levels, has_bias, has_prologue, with_bn)


def _sums_sizes(x, weight, levels, has_bias, has_prologue, with_bn) -> list[int]:
    c_in, c_out = x.shape[2], weight.shape[0]
    # (conditionals, not products with bools: symbolic sizes under torch 2.6's fake tensors refuse those)
    return [weight.numel(), c_out if has_bias else 0, 2 * levels * c_in if has_prologue else 0,
            0 if with_bn else 2 * levels * c_out]  # fmt: skip


def split_sums(sums, x, weight, levels, has_bias, has_prologue, with_bn) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The parts of :func:`backward_sums`' buffer."""
    flat_dw, d_bias, d_affine, zero_stats = sums.split(_sums_sizes(x, weight, levels, has_bias, has_prologue, with_bn))
    dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
    d_weight = flat_dw.as_strided(weight.shape, weight.stride()) if dense else flat_dw.view(weight.shape)
    d_affine = d_affine.view(2, levels, x.shape[2]) if has_prologue else d_affine
    return d_weight, d_bias, d_affine, zero_stats.view(2, levels, weight.shape[0]) if not with_bn else zero_stats


def _pairs(sizes: list[int]) -> list[tuple[int, int]]:
    return list(zip(sizes[::2], sizes[1::2]))


def _rows(sizes: list[int]) -> int:
    return sum(h * w for h, w in _pairs(sizes))


def check_levels_args(x, sizes, weight, bias, scale, shift, activation) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless these describe one packed multi-level conv."""
    if not (isinstance(sizes, (list, tuple)) and 1 <= len(sizes) <= MAX_LEVELS
            and all(isinstance(s, (list, tuple)) and len(s) == 2 for s in sizes)):  # fmt: skip
        raise ValueError(f"sizes must be 1 to {MAX_LEVELS} (height, width) pairs, got {sizes!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for s in sizes for v in s):
        raise ValueError(f"sizes must hold positive ints, got {sizes!r}")
    rows = sum(h * w for h, w in sizes)
    if not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == rows and x.is_floating_point()):
        raise ValueError(f"x must be a float (N, {rows}, C) tensor (the levels packed image-major), got {describe(x)}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else (x.dtype,)
    c_in = x.shape[2]
    if not (isinstance(weight, Tensor) and weight.dim() == 4 and weight.shape[1:] == (c_in, 3, 3)
            and weight.dtype in allowed and weight.device == x.device):  # fmt: skip
        raise ValueError(f"weight must be a {' or '.join(map(str, allowed))} (C_out, {c_in}, 3, 3) tensor on "
                         f"{x.device}, got {describe(weight)}")  # fmt: skip
    if bias is not None and not (isinstance(bias, Tensor) and bias.shape == weight.shape[:1]
                                 and bias.dtype in allowed and bias.device == x.device):  # fmt: skip
        raise ValueError(f"bias must be None or a ({weight.shape[0]},) tensor on {x.device}, got {describe(bias)}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must both be given (the prologue) or both be None")
    stats = torch.promote_types(x.dtype, torch.float32)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and not (isinstance(t, Tensor) and t.shape == (len(sizes), c_in) and t.dtype == stats
                                  and t.device == x.device):  # fmt: skip
            raise ValueError(f"{name} must be a {stats} ({len(sizes)}, {c_in}) tensor (one row per level) on "
                             f"{x.device}, got {describe(t)}")  # fmt: skip
    if activation not in ("identity", "relu", "swish"):
        raise ValueError(f"activation must be 'identity', 'relu' or 'swish', got {activation!r}")


def _triton_reasons(x, *tensors) -> list[str]:
    reasons = backends.triton_reasons(x, *(t for t in tensors if isinstance(t, Tensor)))
    if x.dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


def _library_reasons(x, *_) -> list[str]:
    return backends.library_reasons(x)


def _per_level_forward(backend: str):
    """``conv3x3_bn_levels_forward`` on ``backend``: its ``conv3x3_bn_forward`` level by level."""

    def run(x, sizes, weight, bias, scale, shift, activation, stats, counters, bn_weights, bn_biases, eps,
            running_means, running_vars, batches, momentum):  # fmt: skip
        forward = backends.implementation("conv3x3_bn_forward", backend)
        y = x.new_empty((*x.shape[:2], weight.shape[0]))
        outputs = [[] for _ in range(4)]
        for level, (x_l, y_l) in enumerate(zip(level_views(x, sizes), level_views(y, sizes))):
            count = x_l.shape[0] * x_l.shape[2] * x_l.shape[3]
            running = (running_means[level], running_vars[level]) if running_means else (None, None)
            out = forward(x_l, weight, None if scale is None else scale[level], None if shift is None else shift[level],
                          activation, "torch", 1, bias, stats[level], counters[level : level + 1], count,
                          bn_weights[level], bn_biases[level], eps, *running,
                          batches[level] if batches else None, momentum, count / (count - 1))  # fmt: skip
            y_l.copy_(out[0])
            for kept, value in zip(outputs, out[1:]):
                kept.append(value)
        return (y, *(torch.stack(values) for values in outputs))

    return run


def _triton_forward(x, sizes, weight, bias, scale, shift, activation, stats, counters, bn_weights, bn_biases, eps,
                    running_means, running_vars, batches, momentum):  # fmt: skip
    from spinenet_fast.kernels.conv3x3_levels import LevelsFinalize, conv3x3_levels_forward

    levels, c_out = len(sizes) // 2, weight.shape[0]
    outputs = tuple(stats.new_empty((levels, c_out), dtype=affine_dtype(bn_weights[0])) for _ in range(4))
    finalize = LevelsFinalize(counters, [w.contiguous() for w in bn_weights], [b.contiguous() for b in bn_biases],
                              outputs, running_means or None, running_vars or None, batches or None, eps,
                              momentum)  # fmt: skip
    y = conv3x3_levels_forward(x, _pairs(sizes), weight, _vectors(scale), _vectors(shift), activation, bias, stats,
                               finalize)  # fmt: skip
    return (y, *outputs)


def _vectors(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


@op_spec.custom_op(
    "conv3x3_bn_levels_forward",
    fake=lambda x, sizes, weight, *args: (
        x.new_empty((*x.shape[:2], weight.shape[0])),
        *(args[4].new_empty((len(sizes) // 2, weight.shape[0]), dtype=affine_dtype(args[6][0])) for _ in range(4)),
    ),
    implementations={
        "reference": Backend(_per_level_forward("reference")),
        "cuda": Backend(_per_level_forward("cuda"), _library_reasons),
        "triton": Backend(_triton_forward, _triton_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("stats", "counters", "running_means", "running_vars", "batches"),
)
def _forward_op(
    x: Tensor, sizes: IntList, weight: Tensor, bias: Tensor | None, scale: Tensor | None, shift: Tensor | None,
    activation: str, stats: Tensor, counters: Tensor, bn_weights: TensorList, bn_biases: TensorList, eps: float,
    running_means: TensorList, running_vars: TensorList, batches: TensorList, momentum: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, out_scale, out_shift, mean, var)``: y packed, the rest (L, C_out) fp32; each level's statistics added
    into ``stats`` (zeroed (L, 2, C_out)), its programs counted on ``counters`` (zeroed int32 (L,)); running
    statistics (empty lists: none) and batch counters updated."""


def _per_level_backward(backend: str, with_bn: bool):
    """The backward op on ``backend``: its single-level backward (``conv3x3_bn_backward`` or
    ``conv3x3_bn_stats_backward``) level by level, every dW and d_bias added up."""

    def run(dy, d_scale, d_shift, y, x, sizes, weight, scale, shift, activation, has_bias, bn_weights, mean, var, eps):
        dx = torch.empty_like(x)
        sums, (d_weight, d_bias, d_affine, _) = backward_sums(x, weight, len(sizes) // 2, has_bias, scale is not None,
                                                              with_bn)  # fmt: skip
        d_bn = []
        y = y if with_bn else dy  # a plain conv has no y (nor statistics) to fold
        views = zip(level_views(dy, sizes), level_views(y, sizes), level_views(x, sizes), level_views(dx, sizes))
        for level, (dy_l, y_l, x_l, dx_l) in enumerate(views):
            affine = (None, None) if scale is None else (scale[level], shift[level])
            if with_bn:
                count = x_l.shape[0] * x_l.shape[2] * x_l.shape[3]
                grads = backends.implementation("conv3x3_bn_backward", backend)(
                    dy_l, d_scale[level], d_shift[level], y_l, x_l, weight, *affine, activation, "torch", 1,
                    d_bias if has_bias else None, bn_weights[level], mean[level], var[level], count, eps,
                    None if scale is None else d_affine[:, level], d_weight,
                )  # fmt: skip
                d_bn.append(grads[2].to(sums.dtype))
            else:
                zeros = sums.new_zeros(weight.shape[0])
                grads = backends.implementation("conv3x3_bn_stats_backward", backend)(
                    dy_l, zeros, zeros, dy_l, x_l, weight, *affine, activation, "torch", 1, has_bias
                )  # fmt: skip
                d_weight += grads[1]
                if scale is not None:
                    d_affine[:, level] += grads[2]
                if has_bias:
                    d_bias += grads[-1]
            dx_l.copy_(grads[0])
        return dx, sums, torch.stack(d_bn) if with_bn else sums.new_empty(0)

    return run


def _triton_backward(with_bn: bool):
    def run(dy, d_scale, d_shift, y, x, sizes, weight, scale, shift, activation, has_bias, bn_weights, mean, var, eps):
        from spinenet_fast.kernels.conv3x3_levels import conv3x3_levels_backward

        sums, (d_weight, d_bias, d_affine, zeros) = backward_sums(x, weight, len(sizes) // 2, has_bias,
                                                                  scale is not None, with_bn)  # fmt: skip
        bn = (bn_weights, mean.contiguous(), var.contiguous(), eps) if with_bn else None
        d_scale, d_shift = (d_scale, d_shift) if with_bn else zeros
        dx, d_bn = conv3x3_levels_backward(
            dy.contiguous(), d_scale, d_shift, y, x, _pairs(sizes), weight, _vectors(scale), _vectors(shift),
            activation, d_weight, d_bias if has_bias else None, d_affine if scale is not None else None, bn,
        )  # fmt: skip
        return dx, sums, d_bn

    return run


def _fake_backward(dy, d_scale, d_shift, y, x, sizes, weight, scale, shift, activation, has_bias, bn_weights, *_):
    levels, c_out = len(sizes) // 2, weight.shape[0]
    with_bn = bool(bn_weights) and bn_weights[0].numel() > 0
    stats = dict(dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    layout = _sums_sizes(x, weight, levels, has_bias, scale is not None, with_bn)
    return torch.empty_like(x), torch.empty(sum(layout), **stats), torch.empty((levels, 2, c_out) if with_bn else 0,
                                                                              **stats)  # fmt: skip


def _backward_op_for(name: str, with_bn: bool):
    @op_spec.custom_op(
        name,
        fake=_fake_backward,
        implementations={
            "reference": Backend(_per_level_backward("reference", with_bn)),
            "cuda": Backend(_per_level_backward("cuda", with_bn), _library_reasons),
            "triton": Backend(_triton_backward(with_bn), lambda dy, *args: _triton_reasons(args[3], dy, *args[:3])),
        },
        auto_order=FUSED_FIRST,
    )
    def _backward_op(
        dy: Tensor, d_scale: Tensor, d_shift: Tensor, y: Tensor, x: Tensor, sizes: IntList, weight: Tensor,
        scale: Tensor | None, shift: Tensor | None, activation: str, has_bias: bool, bn_weights: TensorList,
        mean: Tensor, var: Tensor, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """``(dx, sums, [dγ; dβ] (L, 2, C_out) or empty)``: ``sums`` holds dW, d_bias and [d_scale; d_shift]
        (2, L, C_in) (:func:`split_sums`), it and [dγ; dβ] in the statistics' dtype (fp32, or
        float64). With a BN, d_scale/d_shift (L, C_out) are the gradients of its affine map; without one they, y,
        γs, mean and var are unused."""

    return _backward_op


_bn_backward_op = _backward_op_for("conv3x3_bn_levels_backward", True)
_plain_backward_op = _backward_op_for("conv3x3_levels_backward", False)


def _plain_forward(backend: str):
    def run(x, sizes, weight, bias, scale, shift, activation):
        if backend == "triton":
            from spinenet_fast.kernels.conv3x3_levels import conv3x3_levels_forward

            return conv3x3_levels_forward(x, _pairs(sizes), weight, _vectors(scale), _vectors(shift), activation, bias,
                                          None, None)  # fmt: skip
        conv = backends.implementation("conv3x3_bn_stats", backend)
        y = x.new_empty((*x.shape[:2], weight.shape[0]))
        for level, (x_l, y_l) in enumerate(zip(level_views(x, sizes), level_views(y, sizes))):
            affine = (None, None) if scale is None else (scale[level], shift[level])
            y_l.copy_(conv(x_l, weight, *affine, activation, "torch", 1, bias)[0])
        return y

    return run


@op_spec.custom_op(
    "conv3x3_levels",
    fake=lambda x, sizes, weight, *_: x.new_empty((*x.shape[:2], weight.shape[0])),
    implementations={
        "reference": Backend(_plain_forward("reference")),
        "cuda": Backend(_plain_forward("cuda"), _library_reasons),
        "triton": Backend(_plain_forward("triton"), _triton_reasons),
    },
    auto_order=FUSED_FIRST,
)
def _plain_op(x: Tensor, sizes: IntList, weight: Tensor, bias: Tensor | None, scale: Tensor | None,
              shift: Tensor | None, activation: str) -> Tensor:  # fmt: skip
    """y packed: each level's conv of act(scale[l]·x_l + shift[l]) plus bias, no statistics."""


def _grads(ctx, weight, x, sums) -> tuple:
    """The gradients of weight, bias, scale and shift from the backward's ``sums``."""
    has_bias = ctx.bias_dtype is not None
    d_weight, d_bias, d_affine, _ = split_sums(sums, x, weight, len(ctx.sizes) // 2, has_bias, ctx.has_prologue,
                                               ctx.with_bn)  # fmt: skip
    d_prologue = d_affine.unbind() if ctx.has_prologue else (None, None)  # contiguous (L, C) each
    return d_weight.to(weight.dtype), d_bias.to(ctx.bias_dtype) if has_bias else None, *d_prologue


class _Conv3x3Levels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, sizes, activation):
        ctx.sizes, ctx.activation, ctx.with_bn = sizes, activation, False
        ctx.has_prologue, ctx.bias_dtype = scale is not None, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, scale, shift)
        return _plain_op(x, sizes, weight, bias, scale, shift, activation)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, shift = ctx.saved_tensors
        empty = dy.new_empty(0)
        dx, sums, _ = _plain_backward_op(
            dy, empty, empty, empty, x, ctx.sizes, weight, scale, shift, ctx.activation, ctx.bias_dtype is not None,
            [empty], empty, empty, 1.0,
        )  # fmt: skip
        return dx, *_grads(ctx, weight, x, sums), None, None


class _Conv3x3BNLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, sizes, activation, eps, momentum, stats, counters, running_means,
                running_vars, batches, *bn):  # fmt: skip
        levels = len(sizes) // 2
        bn_weights, bn_biases = list(bn[:levels]), list(bn[levels:])
        y, out_scale, out_shift, mean, var = _forward_op(x, sizes, weight, bias, scale, shift, activation, stats,
                                                         counters, bn_weights, bn_biases, eps, running_means,
                                                         running_vars, batches, momentum)  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.sizes, ctx.activation, ctx.eps, ctx.with_bn = sizes, activation, eps, True
        ctx.has_prologue, ctx.bias_dtype = scale is not None, None if bias is None else bias.dtype
        ctx.save_for_backward(y, x, weight, scale, shift, mean, var, *bn_weights)
        return y, out_scale, out_shift

    @staticmethod
    def backward(ctx, dy, d_scale, d_shift):
        y, x, weight, scale, shift, mean, var, *bn_weights = ctx.saved_tensors
        dy = torch.zeros_like(y) if dy is None else dy
        d_scale, d_shift = (torch.zeros_like(mean) if g is None else g for g in (d_scale, d_shift))
        dx, sums, d_bn = _bn_backward_op(
            dy, d_scale, d_shift, y, x, ctx.sizes, weight, scale, shift, ctx.activation, ctx.bias_dtype is not None,
            bn_weights, mean, var, ctx.eps,
        )  # fmt: skip
        d_gammas = [d_bn[level, 0].to(w.dtype) for level, w in enumerate(bn_weights)]
        d_betas = [d_bn[level, 1].to(w.dtype) for level, w in enumerate(bn_weights)]
        return (dx, *_grads(ctx, weight, x, sums), *(None,) * 9, *d_gammas, *d_betas)


def conv3x3_levels(
    x: Tensor, sizes: list[tuple[int, int]], weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
    shift: Tensor | None = None, activation: str = "identity",
) -> Tensor:  # fmt: skip
    """y (N, S, C_out) packed: each level's 3×3 conv (padding 1) of act(scale[l]·x_l + shift[l]) plus ``bias``
    (see the module docstring); ``scale``/``shift``: (L, C_in) in the statistics' dtype, or None."""
    check_levels_args(x, sizes, weight, bias, scale, shift, activation)
    flat = [v for s in sizes for v in s]
    return _Conv3x3Levels.apply(x.contiguous(), weight, bias, scale, shift, flat, activation)


def levels_stats_size(levels: int, channels: int, dtype: torch.dtype) -> int:
    """Elements of ``conv3x3_bn_levels``' ``dtype`` statistics buffer: ``levels`` BNs' float64 (2, ``channels``)
    statistics (one (L, 2, C) view) and their counters, rounded up to 8 bytes (so that such buffers can follow each
    other in one allocation)."""
    return aligned(stats_slots(levels * channels, dtype) + levels, dtype)


def conv3x3_bn_levels(
    x: Tensor, sizes: list[tuple[int, int]], weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
    shift: Tensor | None = None, activation: str = "identity", *, bn_weights: list[Tensor], bn_biases: list[Tensor],
    eps: float, momentum: float = 0.1, running_means: list[Tensor] | None = None,
    running_vars: list[Tensor] | None = None, num_batches_tracked: list[Tensor] | None = None,
    stats_buffer: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, out_scale, out_shift)``: each level's conv and its training-mode BN (``bn_weights``/``bn_biases``: one
    (C_out,) γ, β per level; running statistics and counters: one per level, or None), so that level l's BN output is
    ``out_scale[l]·y_l + out_shift[l]``. ``stats_buffer``: a zeroed (``levels_stats_size``,) tensor of x's
    statistics dtype that the float64 statistics (a view) and the programs' counters take (one fill per caller), or
    None."""
    check_levels_args(x, sizes, weight, bias, scale, shift, activation)
    levels, c_out = len(sizes), weight.shape[0]
    lists = {"bn_weights": bn_weights, "bn_biases": bn_biases, "running_means": running_means,
             "running_vars": running_vars, "num_batches_tracked": num_batches_tracked}  # fmt: skip
    for name, values in lists.items():
        if values is not None and (not isinstance(values, (list, tuple)) or len(values) != levels):
            raise ValueError(f"{name} must be a list of {levels} tensors (one per level), got {describe(values)}")
    for level, (h, w) in enumerate(sizes):
        pick = {name: None if values is None else values[level] for name, values in lists.items()}
        check_bn_args(c_out, x.device, x.shape[0] * h * w, pick["bn_weights"], pick["bn_biases"], eps,
                      pick["running_means"], pick["running_vars"], pick["num_batches_tracked"], momentum,
                      channels_of="the conv's output",
                      count_of=partial("N·H·W of level {}, {}×{}".format, level, h, w))  # fmt: skip
    dtype = torch.promote_types(x.dtype, torch.float32)
    size = levels_stats_size(levels, c_out, dtype)
    if stats_buffer is None:
        stats_buffer = torch.zeros(size, dtype=dtype, device=x.device)
    elif not (stats_buffer.shape == (size,) and stats_buffer.dtype == dtype and stats_buffer.is_contiguous()
              and stats_buffer.device == x.device):  # fmt: skip
        raise ValueError(f"stats_buffer must be a contiguous {dtype} ({size},) tensor on {x.device}, got "
                         f"{describe(stats_buffer)}")  # fmt: skip
    check_stats_alignment("stats_buffer", stats_buffer)
    stats, end = take_stats(stats_buffer, 0, levels * c_out)
    stats = stats.view(levels, 2, c_out)
    counters = counter_view(stats_buffer[end : end + levels])
    flat = [v for s in sizes for v in s]
    running = [list(values or []) for values in (running_means, running_vars, num_batches_tracked)]
    return _Conv3x3BNLevels.apply(x.contiguous(), weight, bias, scale, shift, flat, activation, float(eps),
                                  float(momentum), stats, counters, *running, *bn_weights, *bn_biases)  # fmt: skip
