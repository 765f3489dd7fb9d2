"""``merge``: the sum of a block's resampled parents, each read at its own resolution, then the activation.

Equivalent to::

    act(sum(F.interpolate(scale_i[:, None, None] * y_i + shift_i[:, None, None], scale_factor=ρ_i)) + extra)

parents y_i: (N, C, H/ρ_i, W/ρ_i), any memory format (channels_last is the fast one); scales, shifts: (C,)
fp32 (BN folded to an affine map); extra: (N, C, H, W) or None; row_scale: (N,) or None, a per-sample factor of
the first parent's term (stochastic depth: a block's residual branch, kept samples scaled by 1/(1 - rate), dropped
ones 0). Returns (N, C, H, W) in the parents' dtype.
No upsampled copy is ever written; the backward block-sums the gradient back to each parent's resolution.
``merge_for_readers`` returns the output once per reader, so that the backward sums the readers' gradients as it
loads them (autograd adds none).
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .activation import ACTIVATIONS, activation_forward, activation_grad, stats_dtype
from .checks import check_accumulator, describe
from .op_spec import Backend
from .schema_types import IntList, TensorList

CHANNELS_LAST = torch.channels_last  # every 4-D output of the merge ops (NHWC in memory)
MAX_READERS = 4  # the output gradient terms the backward kernels sum as they load them


def check_merge_args(
    parents: list[Tensor],
    scales: list[Tensor],
    shifts: list[Tensor],
    ratios: list[int],
    extra: Tensor | None,
    activation: str,
    row_scale: Tensor | None = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one valid merge."""
    if not isinstance(parents, (list, tuple)) or not parents or not all(isinstance(p, Tensor) for p in parents):
        raise TypeError(f"parents must be a non-empty list of tensors, got {type(parents).__name__}")
    first = parents[0]
    for name, values in (("scales", scales), ("shifts", shifts), ("ratios", ratios)):
        if not isinstance(values, (list, tuple)) or len(values) != len(parents):
            raise ValueError(f"{name} must be a list with one entry per parent ({len(parents)}), got {values!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not first.is_floating_point():
        raise TypeError(f"parents must be floating-point tensors, got dtype {first.dtype}")
    channels = first.shape[1] if first.dim() == 4 else None
    target = None
    for i, (y, scale, shift, ratio) in enumerate(zip(parents, scales, shifts, ratios)):
        if y.dim() != 4:
            raise ValueError(f"parents[{i}] must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
        if y.dtype != first.dtype or y.device != first.device:
            raise TypeError(
                f"parents[{i}] must match parents[0]'s dtype and device ({first.dtype}, {first.device}), "
                f"got ({y.dtype}, {y.device})"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"ratios[{i}] must be a positive int (the upsampling factor), got {ratio!r}")
        size = (y.shape[0], channels, y.shape[2] * ratio, y.shape[3] * ratio)
        if y.shape[1] != channels or (target is not None and size != target):
            raise ValueError(
                f"parents[{i}] of shape {tuple(y.shape)} upsampled ×{ratio} gives {size}, but parents[0] gives {target}"
            )
        target = size
        for name, vector in (("scales", scale), ("shifts", shift)):
            if not isinstance(vector, Tensor) or vector.shape != (channels,) or vector.device != first.device:
                raise ValueError(
                    f"{name}[{i}] must be a ({channels},) tensor on {first.device}, got "
                    f"{tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__}"
                )
            if vector.dtype != stats_dtype(first):
                raise TypeError(f"{name}[{i}] must be {str(stats_dtype(first))[6:]}, got {vector.dtype}")
    fits = isinstance(extra, Tensor) and extra.shape == target and extra.dtype == first.dtype
    if extra is not None and not (fits and extra.device == first.device):
        raise ValueError(f"extra must be None or a {first.dtype} tensor of shape {target} on {first.device}, got "
                         f"{describe(extra)}")  # fmt: skip
    fits = isinstance(row_scale, Tensor) and row_scale.shape == (first.shape[0],) and row_scale.device == first.device
    if row_scale is not None and not (fits and row_scale.dtype == stats_dtype(first)):
        raise ValueError(f"row_scale must be None or a {stats_dtype(first)} tensor of shape ({first.shape[0]},) on "
                         f"{first.device}, got {describe(row_scale)}")  # fmt: skip


def _upsample(x: Tensor, ratio: int) -> Tensor:
    """Nearest ×ρ upsampling of (N, C, H, W); a channels_last x gives a channels_last result."""
    if ratio == 1:
        return x
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=CHANNELS_LAST):  # copied in NHWC: the result stays channels_last
        rows = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, ratio, w, ratio, c)
        return rows.reshape(n, h * ratio, w * ratio, c).permute(0, 3, 1, 2)
    return x.repeat_interleave(ratio, 2).repeat_interleave(ratio, 3)


def _block_sum(x: Tensor, ratio: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H/ρ, W/ρ): the sum of each ρ×ρ block (the adjoint of nearest upsampling)."""
    if ratio == 1:
        return x
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=CHANNELS_LAST):  # summed in NHWC: the result stays channels_last, no copy
        return x.permute(0, 2, 3, 1).reshape(n, h // ratio, ratio, w // ratio, ratio, c).sum((2, 4)).permute(0, 3, 1, 2)
    return x.reshape(n, c, h // ratio, ratio, w // ratio, ratio).sum((3, 5))


def _row_factors(parents, row_scale) -> list:
    """Each parent's per-sample factor, (N, 1, 1, 1) or 1: ``row_scale`` for the first, 1 for the others."""
    first = 1 if row_scale is None else row_scale.to(stats_dtype(parents[0])).view(-1, 1, 1, 1)
    return [first] + [1] * (len(parents) - 1)


def _pre_activation(parents, scales, shifts, ratios, extra, row_scale) -> Tensor:
    dtype = stats_dtype(parents[0])
    pre = sum(
        _upsample(f * (y.to(dtype) * s.to(dtype).view(1, -1, 1, 1) + b.to(dtype).view(1, -1, 1, 1)), r)
        for y, s, b, r, f in zip(parents, scales, shifts, ratios, _row_factors(parents, row_scale))
    )
    return pre if extra is None else pre + extra.to(dtype)


def merge_reference(parents, scales, shifts, ratios, extra, row_scale, activation) -> Tensor:
    """Plain-PyTorch merge (fp32 maths), the CPU path and the test oracle."""
    pre = _pre_activation(parents, scales, shifts, ratios, extra, row_scale)
    return activation_forward(pre, activation).to(parents[0].dtype).contiguous(memory_format=CHANNELS_LAST)


def coarse_first(ratios: list[int]) -> list[int]:
    """The parents' order in the backward's sums: the coarser (larger ratio) first, ties in the given order."""
    return sorted(range(len(ratios)), key=lambda i: -ratios[i])


def sums_rows(num_parents: int, row_scaled: bool) -> int:
    """Rows of the merge backward's ``sums`` (see :func:`backward_sums`)."""
    return max(num_parents, 2) + 1 + row_scaled


def backward_sums(d_scales: list[Tensor], d_shifts: list[Tensor], ratios: list[int], row_scaled: bool) -> Tensor:
    """The merge backward's ``sums`` (:func:`sums_rows`, C): Σ d_pre·y_i (row-scaled for the first parent) in
    :func:`coarse_first` order (a zero row for a single parent), then Σ d_pre, the gradient of every parent's shift,
    and with a ``row_scale`` Σ row_scale·d_pre, the first parent's."""
    rows = [d_scales[i] for i in coarse_first(ratios)]
    rows += [torch.zeros_like(d_shifts[-1])] * (2 - len(rows)) + [d_shifts[-1]] + d_shifts[:row_scaled]
    return torch.stack(rows)


def merge_backward_reference(grads, parents, scales, shifts, ratios, extra, row_scale, activation) -> list[Tensor]:
    """``[*d_parents, sums, (d_extra)]`` of :func:`merge_reference` for the output gradient Σ ``grads``, in plain
    PyTorch (``sums``: :func:`backward_sums`)."""
    pre = _pre_activation(parents, scales, shifts, ratios, extra, row_scale)
    d_pre = sum(g.to(pre.dtype) for g in grads) * activation_grad(pre, activation)
    factors = _row_factors(parents, row_scale)
    sums = [_block_sum(f * d_pre, r) for r, f in zip(ratios, factors)]
    d_parents = [
        (s * scale.to(s.dtype).view(1, -1, 1, 1)).to(y.dtype).contiguous(memory_format=CHANNELS_LAST)
        for s, scale, y in zip(sums, scales, parents)
    ]
    d_scales = [(s * y.to(s.dtype)).sum((0, 2, 3)).to(scale.dtype) for s, y, scale in zip(sums, parents, scales)]
    d_shifts = [d_pre.sum((0, 2, 3)).to(shifts[0].dtype)]
    if row_scale is not None:
        d_shifts.insert(0, sums[0].sum((0, 2, 3)).to(shifts[0].dtype))
    d_extra = [d_pre.to(extra.dtype).contiguous(memory_format=CHANNELS_LAST)] if extra is not None else []
    return [*d_parents, backward_sums(d_scales, d_shifts, ratios, row_scale is not None), *d_extra]


def _triton_reasons(parents, scales, shifts, ratios, extra, row_scale, activation) -> list[str]:
    reasons = backends.triton_reasons(*parents, extra, row_scale)
    if len(parents) > 2:
        reasons.append(f"the Triton merge takes 1 or 2 parents, got {len(parents)}")
    if parents[0].dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {parents[0].dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


def _readers_reasons(grads: list[Tensor]) -> list[str]:
    if len(grads) > MAX_READERS:
        return [f"the fused merge backward sums at most {MAX_READERS} output gradients, got {len(grads)}"]
    return []


def _triton_backward_reasons(grads, *args) -> list[str]:
    return _triton_reasons(*args) + backends.triton_reasons(*grads) + _readers_reasons(grads)


def _extension_reasons(parents, scales, shifts, ratios, extra, row_scale, activation) -> list[str]:
    reasons = backends.extension_reasons(*parents, extra, row_scale)
    if len(parents) > 2:
        reasons.append(f"the extension's merge takes 1 or 2 parents, got {len(parents)}")
    elif max(ratios) % min(ratios):
        reasons.append(f"the extension's merge needs one ratio to divide the other, got {list(ratios)}")
    return reasons


def _extension_backward_reasons(grads, *args) -> list[str]:
    return _extension_reasons(*args) + backends.extension_reasons(*grads) + _readers_reasons(grads)


def _merge_backward_triton(grads, parents, scales, shifts, ratios, extra, row_scale, activation) -> list[Tensor]:
    from spinenet_fast.kernels.merge import merge_backward

    d_parents, d_scales, d_shifts, d_extra = merge_backward(
        grads, parents, scales, shifts, ratios, extra, row_scale, activation
    )
    sums = backward_sums(d_scales, d_shifts, ratios, row_scale is not None)
    return [*d_parents, sums, *([d_extra] if d_extra is not None else [])]


def _triple(grads: list[Tensor], k: int, has_extra: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``merge_backward_into``'s fixed outputs from ``[*d_parents, sums, (d_extra)]``: (d_parent0, d_parent1,
    d_extra), an empty tensor for a second parent or an extra that is not there."""
    return grads[0], grads[1] if k == 2 else grads[0].new_empty(0), grads[k + 1] if has_extra else grads[0].new_empty(0)


def _into(backward):
    """A ``merge_backward_into`` backend from a ``merge_backward`` one: its sums added into ``sums_out``."""

    def run(grads, parents, scales, shifts, ratios, extra, row_scale, activation, sums_out):
        outputs = backward(grads, parents, scales, shifts, ratios, extra, row_scale, activation)
        sums_out.add_(outputs[len(parents)])
        return _triple(outputs, len(parents), extra is not None)

    return run


def _merge_backward_into_extension(grads, parents, scales, shifts, ratios, extra, row_scale, activation, sums_out):
    args = (grads, parents, scales, shifts, ratios, extra, row_scale, activation, sums_out)
    return _triple(torch.ops.spinenet_fast.ext_merge_backward(*args), len(parents), extra is not None)


def _fake_merge(parents, scales, shifts, ratios, extra, row_scale, activation, sums_buffer):
    y = parents[0]
    shape = (y.shape[0], y.shape[1], y.shape[2] * ratios[0], y.shape[3] * ratios[0])
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST)


def _fake_backward(grads, parents, scales, shifts, ratios, extra, row_scale, activation):
    d_parents = [torch.empty_like(y, memory_format=CHANNELS_LAST) for y in parents]
    sums = scales[0].new_empty((sums_rows(len(parents), row_scale is not None), *scales[0].shape))
    d_extra = [torch.empty_like(extra, memory_format=CHANNELS_LAST)] if extra is not None else []
    return [*d_parents, sums, *d_extra]


def _fake_backward_into(grads, parents, scales, shifts, ratios, extra, row_scale, activation, sums_out):
    d_parents = [torch.empty_like(y, memory_format=CHANNELS_LAST) for y in parents]
    empty = grads[0].new_empty(0)
    d_extra = torch.empty_like(extra, memory_format=CHANNELS_LAST) if extra is not None else empty
    return d_parents[0], d_parents[1] if len(parents) == 2 else empty, d_extra


def nhwc_samples(x: Tensor) -> bool:
    """Whether x (N, C, H, W) is NHWC-contiguous within each sample, its samples a multiple of C elements apart and
    not overlapping (a dimension of size 1 may have any stride): e.g. one level's slice of a level-packed (N, Σ H·W,
    C) gradient."""
    n, c, h, w = x.shape
    inner = (c == 1 or x.stride(1) == 1) and (w == 1 or x.stride(3) == c) and (h == 1 or x.stride(2) == w * c)
    return inner and (n == 1 or (x.stride(0) % c == 0 and x.stride(0) >= h * w * c))


def _nhwc_grads(grads, *args) -> tuple:
    """The output gradient's terms as the backward kernels read them: in place where all are NHWC within a sample, of
    one layout (:func:`nhwc_samples`), else each copied channels_last."""
    if all(nhwc_samples(g) and g.stride() == grads[0].stride() for g in grads):
        return grads, *args
    return [g.contiguous(memory_format=CHANNELS_LAST) for g in grads], *args


@op_spec.custom_op(
    "merge",
    fake=_fake_merge,
    implementations={
        "reference": Backend(merge_reference),
        "triton": Backend(op_spec.kernel("merge", "merge_forward"), _triton_reasons),
        "cuda": Backend(op_spec.extension("ext_merge"), _extension_reasons),
    },
    prepare=lambda *args: args[:-1],  # the buffer is the backward's
)
def _merge_op(
    parents: TensorList, scales: TensorList, shifts: TensorList, ratios: IntList, extra: Tensor | None,
    row_scale: Tensor | None, activation: str, sums_buffer: Tensor | None,
) -> Tensor:  # fmt: skip
    """``sums_buffer``: unused by the forward; the backward adds its sums into it (see :func:`merge`)."""


@op_spec.custom_op(
    "merge_backward",
    fake=_fake_backward,
    implementations={
        "reference": Backend(merge_backward_reference),
        "triton": Backend(_merge_backward_triton, _triton_backward_reasons),
        "cuda": Backend(op_spec.extension("ext_merge_backward"), _extension_backward_reasons),
    },
    prepare=_nhwc_grads,
)
def _merge_backward_op(
    grads: TensorList, parents: TensorList, scales: TensorList, shifts: TensorList, ratios: IntList,
    extra: Tensor | None, row_scale: Tensor | None, activation: str,
) -> TensorList:  # fmt: skip
    """``[*d_parents, sums (:func:`backward_sums`), (d_extra)]`` for the output gradient Σ ``grads`` (one term per
    reader of the output)."""


@op_spec.custom_op(
    "merge_backward_into",
    fake=_fake_backward_into,
    implementations={
        "reference": Backend(_into(merge_backward_reference)),
        "triton": Backend(_into(_merge_backward_triton), lambda *args: _triton_backward_reasons(*args[:-1])),
        "cuda": Backend(_merge_backward_into_extension, lambda *args: _extension_backward_reasons(*args[:-1])),
    },
    mutates_args=("sums_out",),
    prepare=_nhwc_grads,
)
def _merge_backward_into_op(
    grads: TensorList, parents: TensorList, scales: TensorList, shifts: TensorList, ratios: IntList,
    extra: Tensor | None, row_scale: Tensor | None, activation: str, sums_out: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``merge_backward`` of one or two parents whose sums are added into the caller's zeroed ``sums_out``
    (:func:`sums_rows`, C): ``(d_parent0, d_parent1, d_extra)``, empty where absent."""


def _setup_context(ctx, inputs, output):
    parents, scales, shifts, ratios, extra, row_scale, activation, sums_buffer = inputs
    optional = [t for t in (extra, row_scale) if t is not None]
    ctx.save_for_backward(*parents, *scales, *shifts, *optional)
    ctx.num_parents, ctx.ratios, ctx.activation = len(parents), list(ratios), activation
    ctx.has_extra, ctx.row_scaled = extra is not None, row_scale is not None
    ctx.sums_buffer = sums_buffer if len(parents) <= 2 else None  # used once: a second backward allocates


def _gradients(ctx, grads: list[Tensor]) -> tuple:
    """``(d_parents, d_scales, d_shifts, d_extra)`` for the output gradient Σ ``grads`` (the defined ones)."""
    k = ctx.num_parents
    saved = ctx.saved_tensors
    parents, scales, shifts = list(saved[:k]), list(saved[k : 2 * k]), list(saved[2 * k : 3 * k])
    optional = iter(saved[3 * k :])
    extra = next(optional) if ctx.has_extra else None
    row_scale = next(optional) if ctx.row_scaled else None
    sums, ctx.sums_buffer = ctx.sums_buffer, None
    args = (grads, parents, scales, shifts, ctx.ratios, extra, row_scale, ctx.activation)
    if sums is not None:
        d_first, d_second, d_extra = _merge_backward_into_op(*args, sums)
        d_parents = [d_first, d_second][:k]
    else:
        outputs = _merge_backward_op(*args)
        d_parents, sums, d_extra = outputs[:k], outputs[k], (outputs[k + 1] if ctx.has_extra else None)
    d_extra = d_extra if ctx.has_extra else None
    d_scales = [None] * k
    for row, i in enumerate(coarse_first(ctx.ratios)):
        d_scales[i] = sums[row]
    shift_row = max(k, 2)
    d_shifts = [sums[shift_row + ctx.row_scaled]] + [sums[shift_row]] * (k - 1)
    return d_parents, d_scales, d_shifts, d_extra


def _backward(ctx, grad):
    d_parents, d_scales, d_shifts, d_extra = _gradients(ctx, [grad])
    return d_parents, d_scales, d_shifts, None, d_extra, None, None, None


_merge_op.register_autograd(_backward, setup_context=_setup_context)


class _MergeForReaders(torch.autograd.Function):
    """``merge`` returned once per reader (views of one output): each reader's gradient arrives apart, and the
    backward kernel sums them as it loads them. Inputs flattened, as a Function tracks only tensor arguments."""

    @staticmethod
    def forward(ctx, readers, ratios, activation, row_scale, sums_buffer, has_extra, *tensors):
        k = len(ratios)
        parents, scales, shifts = list(tensors[:k]), list(tensors[k : 2 * k]), list(tensors[2 * k : 3 * k])
        extra = tensors[3 * k] if has_extra else None
        inputs = (parents, scales, shifts, list(ratios), extra, row_scale, activation, sums_buffer)
        out = _merge_op(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.set_materialize_grads(False)
        return (out, *(out.view_as(out) for _ in range(readers - 1)))

    @staticmethod
    def backward(ctx, *grads):
        defined = [g for g in grads if g is not None]
        if not defined:
            return (None,) * (6 + 3 * ctx.num_parents + ctx.has_extra)
        d_parents, d_scales, d_shifts, d_extra = _gradients(ctx, defined)
        optional = [d_extra] if ctx.has_extra else []
        return None, None, None, None, None, None, *d_parents, *d_scales, *d_shifts, *optional


def _checked_args(parents, scales, shifts, ratios, extra, row_scale, activation, sums_buffer) -> tuple:
    check_merge_args(parents, scales, shifts, ratios, extra, activation, row_scale)
    shape = (sums_rows(min(len(parents), 2), row_scale is not None), parents[0].shape[1])
    check_accumulator("sums_buffer", sums_buffer, shape, stats_dtype(parents[0]), parents[0].device)
    ratios = [int(r) for r in ratios]
    return list(parents), list(scales), list(shifts), ratios, extra, row_scale, activation, sums_buffer


def merge(
    parents: list[Tensor],
    scales: list[Tensor],
    shifts: list[Tensor],
    ratios: list[int],
    extra: Tensor | None = None,
    activation: str = "swish",
    *,
    row_scale: Tensor | None = None,
    sums_buffer: Tensor | None = None,
) -> Tensor:
    """Fused cross-scale merge (see the module docstring); checks its arguments before any kernel runs.
    ``row_scale``: None or an (N,) tensor of the scales' dtype multiplying the first parent's term per sample (no
    gradient flows to it). ``sums_buffer``: a zeroed contiguous (:func:`sums_rows`, C) tensor of the scales' dtype —
    (3, C), (4, C) with a ``row_scale`` — that the (first) backward of a one- or two-parent merge adds its channel sums
    into (a slice of one buffer several ops share); None: it allocates its own."""
    return _merge_op(*_checked_args(parents, scales, shifts, ratios, extra, row_scale, activation, sums_buffer))


def merge_for_readers(
    parents: list[Tensor],
    scales: list[Tensor],
    shifts: list[Tensor],
    ratios: list[int],
    extra: Tensor | None = None,
    activation: str = "swish",
    *,
    readers: int,
    row_scale: Tensor | None = None,
    sums_buffer: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """:func:`merge`'s output once per reader (1 to ``MAX_READERS``): tensors of the same values, each to be read by
    one consumer, whose gradients the backward kernel sums as it loads them — where several ops read the output,
    autograd adds no gradients (each addition reads two full-size maps and writes one)."""
    if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers must be an int in [1, {MAX_READERS}], got {readers!r}")
    args = _checked_args(parents, scales, shifts, ratios, extra, row_scale, activation, sums_buffer)
    tensors = [*args[0], *args[1], *args[2], *([extra] if extra is not None else [])]
    if readers == 1 or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return (_merge_op(*args),) * readers
    return _MergeForReaders.apply(readers, args[3], activation, row_scale, sums_buffer, extra is not None, *tensors)
