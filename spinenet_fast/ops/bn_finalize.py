"""``bn_finalize``: per-channel [Σy; Σy²] -> BatchNorm's folded ``scale``, ``shift``; running-statistics update.

Equivalent to training-mode ``nn.BatchNorm2d`` split in two: with mean = Σy/n and biased var = Σy²/n − mean²,
``scale = weight / sqrt(var + eps)`` and ``shift = bias − mean·scale``, so that ``BN(y) = scale·y + shift``.
When y is later nearest-upsampled by ρ, its statistics are unchanged but its count is n·ρ²: the running
variance takes the unbiased variance of that upsampled count. Differentiable in the statistics, weight and bias.
The statistics are one (2, C) tensor, as the conv ops produce them: one buffer per BN (one fill, one all-reduce
under SyncBN, one gradient).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import backends, op_spec
from .activation import stats_dtype
from .checks import describe
from .op_spec import Backend
from .schema_types import TensorList

StatsReducer = Callable[[Tensor, int], tuple[Tensor, int]]

STATS_DTYPE = torch.float64
"""The dtype of the statistics a training-mode BN of the conv + BN ops accumulates (every activation dtype): the
variance Σy²/n − mean² cancels ~(mean/std)² of its digits, which fp32 sums lose for a channel whose mean dwarfs its
spread (the kernels add each tile's moments, ``kernels/epilogue.py``)."""


def affine_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of a BN's folded affine map and batch statistics: the maths dtype of γ (fp32 under autocast and for
    a bf16-cast model, float64 in a float64 one), whatever the statistics' dtype."""
    return stats_dtype(weight)


def alignment_slack(dtype: torch.dtype) -> int:
    """Elements of a ``dtype`` buffer (fp32 or float64) skipped at most to reach an 8-byte boundary."""
    return STATS_DTYPE.itemsize // dtype.itemsize - 1


def aligned(offset: int, dtype: torch.dtype) -> int:
    """The first 8-byte-aligned element at or after ``offset`` of a ``dtype`` buffer whose start is 8-byte aligned."""
    return offset + -offset % (alignment_slack(dtype) + 1)


def stats_slots(channels: int, dtype: torch.dtype) -> int:
    """Elements of a 1-D ``dtype`` buffer (fp32 or float64) that ``take_stats`` takes for one BN's float64
    (2, ``channels``) statistics, the alignment it may skip included."""
    return 2 * channels * (alignment_slack(dtype) + 1) + alignment_slack(dtype)


def take_stats(buffer: Tensor, offset: int, channels: int) -> tuple[Tensor, int]:
    """``(stats, end)``: one BN's float64 (2, ``channels``) statistics viewed in the 1-D fp32 (or float64) ``buffer``
    from its first element at or after ``offset`` that is 8 bytes from its start, and the element after them.
    ``stats_slots`` elements from ``offset`` always hold them. ``buffer`` must start at an 8-byte boundary of its
    storage (``check_stats_alignment``): a fresh allocation, or a slice of one at an 8-byte boundary."""
    start = aligned(offset, buffer.dtype)
    end = start + 2 * channels * (alignment_slack(buffer.dtype) + 1)
    return buffer[start:end].view(STATS_DTYPE).view(2, channels), end


def check_stats_alignment(name: str, buffer: Tensor) -> None:
    """``buffer``, which holds float64 statistics (``take_stats``), must start at an 8-byte boundary of its storage
    (checked outside ``torch.compile``, whose tracing of the float64 view raises on a misaligned one itself)."""
    if torch.compiler.is_compiling():
        return
    if buffer.storage_offset() * buffer.element_size() % STATS_DTYPE.itemsize:
        raise ValueError(f"{name} holds float64 statistics and must start at an 8-byte boundary of its storage, got "
                         f"{describe(buffer)} from element {buffer.storage_offset()}")  # fmt: skip


def check_bn_args(channels, device, count, weight, bias, eps, running_mean, running_var, num_batches_tracked,
                  momentum=0.1, upsample_factor=1, channels_of="stats", count_of=None,
                  group_size=1) -> None:  # fmt: skip
    """Raise ``TypeError``/``ValueError`` naming the argument unless these describe one BN of ``channels`` channels
    on ``device`` normalising ``count`` values per channel (running statistics: both or neither; ``momentum`` is
    checked where they are given). ``channels_of`` says where the channel count comes from; ``count_of``, a callable
    returning where the count does, is called for the message only (the checks run on every call of an op).
    ``group_size``: the ranks a SyncBN normalises over together (``count`` is this rank's): like
    ``nn.SyncBatchNorm``, more than one value per channel in all, one per rank will do."""
    if (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise ValueError(f"{given} was given without {missing}: pass both running statistics or neither")
    vectors = (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var))
    for name, t in vectors:
        fits = isinstance(t, Tensor) and t.is_floating_point() and t.shape == (channels,) and t.device == device
        if not fits and (t is not None or name in ("weight", "bias")):
            raise ValueError(
                f"{name} must be a float tensor of shape ({channels},) (the channels of {channels_of}) on {device}, "
                f"got {describe(t)}"
            )
    least = 2 if group_size < 2 else 1
    if isinstance(count, bool) or not isinstance(count, int) or count < least:
        where = f" ({count_of()})" if count_of is not None else ""
        together = f" across its {group_size} ranks" if group_size > 1 else ""
        raise ValueError(f"count must be an int >= {least}: a training-mode BatchNorm needs more than 1 value per "
                         f"channel{together}, as nn.BatchNorm2d does; got {count!r}{where}")  # fmt: skip
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not 0 < eps < math.inf:  # (NaN fails too; comparisons, unlike math.isfinite, trace with a symbolic float)
        raise ValueError(f"eps must be positive and finite, got {eps!r}")
    if running_mean is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"momentum must be a real number in [0, 1], got {type(momentum).__name__}")
    if running_mean is not None and not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if isinstance(upsample_factor, bool) or not isinstance(upsample_factor, int) or upsample_factor < 1:
        raise ValueError(f"upsample_factor must be a positive int, got {upsample_factor!r}")
    counter_ok = isinstance(num_batches_tracked, Tensor) and num_batches_tracked.dtype == torch.long
    if num_batches_tracked is not None and not (counter_ok and num_batches_tracked.numel() == 1):
        raise TypeError(f"num_batches_tracked must be a one-element int64 tensor, got {describe(num_batches_tracked)}")
    if num_batches_tracked is not None and num_batches_tracked.device != device:
        raise ValueError(f"num_batches_tracked must be on {device}, got {describe(num_batches_tracked)}")


def check_stats(stats) -> None:
    """``stats`` must be one (2, C) float32/float64 tensor [Σy; Σy²]."""
    if not isinstance(stats, Tensor) or stats.dim() != 2 or stats.shape[0] != 2:
        raise TypeError(f"stats must be a (2, C) tensor [Σy; Σy²], got {describe(stats)}")
    if stats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"stats must be float32 (or float64), got {describe(stats)}")


def running_update_reference(running_mean, running_var, mean, var, momentum, unbias) -> None:
    """``running ← lerp(running, batch, momentum)`` in place (``nn.BatchNorm2d``'s update), the batch variance
    multiplied by ``unbias``."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * unbias).to(running_var.dtype), momentum)


def bn_finalize_reference(
    stats, count, weight, bias, eps, running_mean=None, running_var=None, batches=None, momentum=0.1, unbias=1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain PyTorch: ``(scale, shift, mean, var)`` of ``affine_dtype(weight)``, the mean and variance taken in the
    statistics' dtype; the running statistics (if given) and ``batches`` (if given) updated in place."""
    dtype = affine_dtype(weight)
    mean = stats[0] / count
    var = (stats[1] / count - mean * mean).clamp_min(0)
    mean, var = mean.to(dtype), var.to(dtype)
    scale = weight.to(dtype) * torch.rsqrt(var + eps)
    if running_mean is not None:
        with torch.no_grad():
            running_update_reference(running_mean, running_var, mean, var, momentum, unbias)
    if batches is not None:
        batches.add_(1)
    return scale, bias.to(dtype) - mean * scale, mean, var


def _triton_reasons(vector: Tensor) -> list[str]:
    reasons = backends.triton_reasons(vector)
    fits = vector.dtype in (torch.float32, torch.float64)
    return reasons + ([] if fits else [f"statistics dtype {vector.dtype} is not float32 or float64"])


def _triton_backward_reasons(d_scale: Tensor) -> list[str]:
    reasons = backends.triton_reasons(d_scale)
    return reasons + ([] if d_scale.dtype == torch.float32 else [f"gradient dtype {d_scale.dtype} is not float32"])


def with_running_update(kernel, stats, count, weight, bias, eps, running_mean, running_var, batches, momentum,
                        unbias):  # fmt: skip
    """``kernel``'s outputs (scale, shift, mean, var), the running statistics updated in its launch where they are
    contiguous buffers of the outputs' dtype (``affine_dtype``: BN keeps them fp32 under autocast); otherwise by ATen
    after it (a model cast to bf16)."""
    running = (running_mean, running_var)
    if running_mean is None or all(t.dtype == affine_dtype(weight) and t.is_contiguous() for t in running):
        return kernel(stats, count, weight, bias, eps, *running, batches, momentum, unbias)
    outputs = kernel(stats, count, weight, bias, eps, None, None, batches, momentum, unbias)
    running_update_reference(*running, outputs[2], outputs[3], momentum, unbias)
    return outputs


def _bn_finalize_triton(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from spinenet_fast.kernels.bn_finalize import bn_finalize_forward

    return with_running_update(bn_finalize_forward, *args)


def _extension_kernel(stats, *args):
    return torch.ops.spinenet_fast.ext_bn_finalize(stats[0], stats[1], *args)


def _contiguous_vectors(stats, count, weight, bias, *args) -> tuple:
    return stats.contiguous(), count, weight.contiguous(), bias.contiguous(), *args


@op_spec.custom_op(
    "bn_finalize",
    fake=lambda stats, count, weight, *_: tuple(
        stats.new_empty(stats.shape[1:], dtype=affine_dtype(weight)) for _ in range(4)
    ),
    implementations={
        "reference": Backend(bn_finalize_reference),
        "triton": Backend(_bn_finalize_triton, lambda stats, *args: _triton_reasons(stats)),
        "cuda": Backend(
            lambda *args: with_running_update(_extension_kernel, *args),
            lambda stats, *args: backends.extension_reasons(stats),
        ),
    },
    mutates_args=("running_mean", "running_var", "batches"),
    prepare=_contiguous_vectors,
)
def _bn_finalize_op(
    stats: Tensor, count: int, weight: Tensor, bias: Tensor, eps: float, running_mean: Tensor | None,
    running_var: Tensor | None, batches: Tensor | None, momentum: float, unbias: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One launch: the affine map and batch statistics out, the running statistics and counter updated in place."""


def bn_finalize_backward_reference(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps):
    """``[d_stats = [dΣ; dΣ²], dγ, dβ]``: the chain rule through scale = γ·invstd, shift = β − mean·scale, mean = Σ/n,
    var = Σ²/n − mean², in plain PyTorch; ``d_mean``/``d_var`` may be None (no gradient)."""
    invstd = torch.rsqrt(var + eps)
    d_affine = d_scale - d_shift * mean
    d_var_total = -0.5 * weight.to(mean.dtype) * d_affine * invstd**3
    d_var_total = d_var_total if d_var is None else d_var_total + d_var
    d_mean_total = -d_shift * weight.to(mean.dtype) * invstd - 2 * mean * d_var_total
    d_mean_total = d_mean_total if d_mean is None else d_mean_total + d_mean
    d_weight, d_bias = (invstd * d_affine).to(weight.dtype), d_shift.to(bias.dtype, copy=True)
    return [torch.stack([d_mean_total, d_var_total]) / count, d_weight, d_bias]


def _bn_finalize_backward_extension(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps):
    d_stats, d_weight, d_bias = torch.ops.spinenet_fast.ext_bn_finalize_backward(
        d_scale, d_shift, d_mean, d_var, weight, mean, var, count, eps
    )
    # γ and β are fp32 like the statistics (autocast keeps parameters fp32): no cast then.
    return [d_stats, d_weight.to(weight.dtype), d_bias.to(bias.dtype)]


def _contiguous_grads(*args) -> tuple:
    return *(t if t is None else t.contiguous() for t in args[:6]), *args[6:]


@op_spec.custom_op(
    "bn_finalize_backward",
    fake=lambda d_scale, d_shift, d_mean, d_var, weight, bias, mean, *_: [
        mean.new_empty((2, *mean.shape)),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
    ],
    implementations={
        "reference": Backend(bn_finalize_backward_reference),
        "triton": Backend(
            op_spec.kernel("bn_finalize", "bn_finalize_backward"),
            lambda d_scale, *args: _triton_backward_reasons(d_scale),
        ),
        "cuda": Backend(_bn_finalize_backward_extension, lambda d_scale, *args: backends.extension_reasons(d_scale)),
    },
    prepare=_contiguous_grads,
)
def _bn_finalize_backward_op(
    d_scale: Tensor, d_shift: Tensor, d_mean: Tensor | None, d_var: Tensor | None, weight: Tensor, bias: Tensor,
    mean: Tensor, var: Tensor, count: int, eps: float,
) -> TensorList:  # fmt: skip
    """``[d_stats = [dΣ; dΣ²], dγ, dβ]``."""


class _BNFinalize(torch.autograd.Function):
    """Autograd of ``_bn_finalize_op`` (a custom op that mutates the running statistics cannot carry an autograd
    formula itself): differentiable in the statistics, weight and bias."""

    @staticmethod
    def forward(ctx, stats, weight, bias, count, eps, running_mean, running_var, batches, momentum, unbias):
        outputs = _bn_finalize_op(stats, count, weight, bias, eps, running_mean, running_var, batches, momentum, unbias)
        ctx.set_materialize_grads(False)  # outputs without a gradient (mean, var) arrive as None: no zeros launched
        ctx.save_for_backward(weight, bias, *outputs[2:])
        ctx.count, ctx.eps = count, eps
        return outputs

    @staticmethod
    def backward(ctx, d_scale, d_shift, d_mean, d_var):
        weight, bias, mean, var = ctx.saved_tensors
        d_scale, d_shift = (torch.zeros_like(mean) if g is None else g for g in (d_scale, d_shift))
        d_stats, d_weight, d_bias = _bn_finalize_backward_op(
            d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, ctx.count, ctx.eps
        )
        return d_stats, d_weight, d_bias, *(None,) * 7


def bn_finalize_op(
    stats, count, weight, bias, eps, running_mean=None, running_var=None, batches=None, momentum=0.1, unbias=1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The differentiable op, unchecked: ``(scale, shift, mean, var)``; with ``running_mean``/``running_var``
    (both or neither) and ``batches`` updated in the same launch."""
    return _BNFinalize.apply(stats, weight, bias, count, eps, running_mean, running_var, batches, momentum, unbias)


def bn_finalize(
    stats: Tensor,
    count: int,
    weight: Tensor,
    bias: Tensor,
    *,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float = 0.1,
    upsample_factor: int = 1,
    stats_reducer: StatsReducer | None = None,
) -> tuple[Tensor, Tensor]:
    """BN's ``(scale, shift)`` from ``stats`` = [Σy; Σy²] (2, C) of ``count`` values per channel; updates the
    running statistics (with ``running_mean``, ``running_var``) and adds 1 to ``num_batches_tracked`` (if given) in
    the same launch.

    ``stats_reducer(stats, count)`` is the SyncBN hook: it returns the statistics all-reduced over the
    process group before they are finalised. ``upsample_factor`` ρ: the normalised tensor is later
    upsampled ×ρ, so the running variance uses the unbiased variance of n·ρ² values.
    """
    if stats_reducer is not None:
        stats, count = stats_reducer(stats, count)
    check_stats(stats)
    bn_args = (count, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, upsample_factor)
    check_bn_args(stats.shape[1], stats.device, *bn_args)
    n = count * upsample_factor**2
    momentum = 0.0 if running_mean is None else float(momentum)  # unused without running statistics
    scale, shift, _, _ = bn_finalize_op(
        stats, count, weight, bias, float(eps), running_mean, running_var, num_batches_tracked, momentum, n / (n - 1),
    )  # fmt: skip
    return scale, shift
