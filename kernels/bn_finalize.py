"""Triton kernels of ``bn_finalize``: per-channel Σy, Σy² into BatchNorm's folded affine map (and batch mean /
variance) with the running-statistics update (and the batch counter) in the same launch — or in the last program
of the GEMM that produced the statistics (``finalize_when_last``, :class:`Finalize`); its backward."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .bn_grad import bn_statistics_grad

BLOCK_C = 128


@triton.jit
def finalize_channels(c, mask, sums_ptr, sumsq_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr,
                      running_mean_ptr, running_var_ptr, count, eps, momentum, unbias,
                      HAS_RUNNING: tl.constexpr):  # fmt: skip
    """Channels ``c`` (where ``mask``): mean = Σ/n, var = Σ²/n − mean² (biased, ≥ 0) in the statistics' dtype
    (float64: the subtraction loses nothing that the outputs keep), scale = γ/sqrt(var + eps), shift = β − mean·scale
    stored with the mean and variance in the outputs' dtype (fp32, or float64); then running ←
    running + momentum·(batch − running), the variance unbiased by ``unbias`` = n/(n − 1). The statistics are read
    from L2 (``.cg``): other programs of the same launch may have added them."""
    mean = tl.load(sums_ptr + c, mask=mask, cache_modifier=".cg") / count
    var = tl.maximum(tl.load(sumsq_ptr + c, mask=mask, cache_modifier=".cg") / count - mean * mean, 0.0)
    mean, var = mean.to(mean_ptr.dtype.element_ty), var.to(var_ptr.dtype.element_ty)
    affine = scale_ptr.dtype.element_ty
    scale = tl.load(weight_ptr + c, mask=mask).to(affine) / tl.sqrt(var + eps)
    tl.store(scale_ptr + c, scale, mask=mask)
    tl.store(shift_ptr + c, tl.load(bias_ptr + c, mask=mask).to(affine) - mean * scale, mask=mask)
    tl.store(mean_ptr + c, mean, mask=mask)
    tl.store(var_ptr + c, var, mask=mask)
    if HAS_RUNNING:
        running = tl.load(running_mean_ptr + c, mask=mask)
        tl.store(running_mean_ptr + c, running + momentum * (mean - running), mask=mask)
        running = tl.load(running_var_ptr + c, mask=mask)
        tl.store(running_var_ptr + c, running + momentum * (var * unbias - running), mask=mask)


@triton.jit
def finalize_when_last(stats_ptr, counter_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr,
                       running_mean_ptr, running_var_ptr, batches_ptr, C, count, eps, momentum, unbias,
                       HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """A GEMM epilogue's BN finalize: after this program has added its share of the (2, C) ``stats``, it takes a
    ticket from the zeroed integer ``counter``; the program holding the last ticket (every other program's statistics
    are complete) finalizes all C channels (``finalize_channels``) and adds 1 to the batch counter. No finalize
    launch: the last-block reduction, with an acquire-release ticket after a barrier of the program's threads."""
    finalize_when_last_of(tl.num_programs(0) * tl.num_programs(1), stats_ptr, counter_ptr, weight_ptr, bias_ptr,
                          scale_ptr, shift_ptr, mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, batches_ptr, C,
                          count, eps, momentum, unbias, HAS_RUNNING, HAS_COUNTER, BLOCK_C)  # fmt: skip


@triton.jit
def finalize_when_last_of(programs, stats_ptr, counter_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr,
                          var_ptr, running_mean_ptr, running_var_ptr, batches_ptr, C, count, eps, momentum, unbias,
                          HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """``finalize_when_last`` where ``programs`` programs of the launch add to these statistics (one segment of a
    launch that finalizes several BNs: a level of ``conv3x3_levels``)."""
    tl.debug_barrier()  # every thread's statistics atomics precede this program's ticket
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == programs - 1:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            finalize_channels(c, c < C, stats_ptr, stats_ptr + C, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr,
                              var_ptr, running_mean_ptr, running_var_ptr, count, eps, momentum, unbias,
                              HAS_RUNNING)  # fmt: skip
        if HAS_COUNTER:
            tl.store(batches_ptr, tl.load(batches_ptr) + 1)


@triton.jit
def _bn_finalize_kernel(
    sums_ptr, sumsq_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr, running_mean_ptr,
    running_var_ptr, batches_ptr, C, count, eps, momentum, unbias, HAS_RUNNING: tl.constexpr,
    HAS_COUNTER: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``finalize_channels`` for one block of channels; program 0 adds 1 to the batch counter."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    finalize_channels(c, c < C, sums_ptr, sumsq_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr,
                      running_mean_ptr, running_var_ptr, count, eps, momentum, unbias, HAS_RUNNING)  # fmt: skip
    if HAS_COUNTER:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if tl.program_id(0) == 0:
            tl.store(batches_ptr, tl.load(batches_ptr) + 1)


@dataclass
class Finalize:
    """A BN finalize folded into a GEMM's epilogue (``finalize_when_last``): its tensors and scalars. ``counter``: a
    zeroed int32 (or int64) element; ``outputs``: the (C,) scale, shift, mean and var it writes (fp32, or float64);
    the running statistics (their dtype, contiguous; or both None) and the one-element counter ``batches`` (or None)
    it updates."""

    counter: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    batches: torch.Tensor | None
    count: float
    eps: float
    momentum: float
    unbias: float

    def launch_args(self) -> tuple[tuple, dict]:
        """The kernel's arguments after the statistics (pointers, then scalars), and its constexprs."""
        unused = self.outputs[0]  # the pointer of an absent tensor, never dereferenced
        has_running, has_counter = self.running_mean is not None, self.batches is not None
        tensors = (self.counter, self.weight, self.bias, *self.outputs, self.running_mean if has_running else unused,
                   self.running_var if has_running else unused, self.batches if has_counter else unused)  # fmt: skip
        scalars = (float(self.count), float(self.eps), float(self.momentum), float(self.unbias))
        return tensors + scalars, dict(FINALIZE=True, HAS_RUNNING=has_running, HAS_COUNTER=has_counter)

    @staticmethod
    def absent_args(stand_in: torch.Tensor) -> tuple[tuple, dict]:
        """The same arguments for a GEMM that finalizes nothing (``stand_in``'s pointer, never dereferenced)."""
        return (stand_in,) * 10 + (1.0, 1.0, 0.0, 1.0), dict(FINALIZE=False, HAS_RUNNING=False, HAS_COUNTER=False)


def bn_finalize_forward(stats, count, weight, bias, eps, running_mean, running_var, batches, momentum, unbias):
    """From contiguous ``stats`` = [Σ; Σ²] (2, C) (fp32 or float64), returns ``(scale, shift, mean, var)``, each (C,)
    of ``affine_dtype(weight)``; updates ``running_mean``/``running_var`` (that dtype, contiguous; or both None) and
    the one-element counter ``batches`` (or None) in the same launch."""
    from spinenet_fast.ops.bn_finalize import affine_dtype

    channels = stats.shape[1]
    outputs = tuple(stats.new_empty(channels, dtype=affine_dtype(weight)) for _ in range(4))
    has_running, has_counter = running_mean is not None, batches is not None
    unused = outputs[0]  # the pointer of an absent tensor, never dereferenced
    grid = (triton.cdiv(channels, BLOCK_C),)
    _bn_finalize_kernel[grid](
        stats[0], stats[1], weight, bias, *outputs, running_mean if has_running else unused,
        running_var if has_running else unused, batches if has_counter else unused, channels, float(count), eps,
        float(momentum), float(unbias), HAS_RUNNING=has_running, HAS_COUNTER=has_counter, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return outputs


@triton.jit
def _bn_finalize_bwd_kernel(
    dsums_ptr, dsumsq_ptr, dweight_ptr, dbias_ptr, dscale_ptr, dshift_ptr, dmean_ptr, dvar_ptr, weight_ptr, mean_ptr,
    var_ptr, C, count, eps, HAS_DMEAN: tl.constexpr, HAS_DVAR: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The chain rule through scale = γ·invstd, shift = β − mean·scale, mean = Σ/n, var = Σ²/n − mean²."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    d_scale = tl.load(dscale_ptr + c, mask=mask, other=0.0)
    d_shift = tl.load(dshift_ptr + c, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    var = tl.load(var_ptr + c, mask=mask, other=0.0)
    weight = tl.load(weight_ptr + c, mask=mask, other=0.0).to(tl.float32)
    d_sum, d_sumsq, d_weight, d_bias = bn_statistics_grad(d_scale, d_shift, weight, mean, var, count, eps)
    if HAS_DMEAN:
        d_sum += tl.load(dmean_ptr + c, mask=mask, other=0.0) / count
    if HAS_DVAR:  # var = Σ²/n − mean²: a gradient of var reaches Σ² directly and Σ through mean
        d_var = tl.load(dvar_ptr + c, mask=mask, other=0.0)
        d_sumsq += d_var / count
        d_sum -= 2.0 * mean * d_var / count
    tl.store(dsums_ptr + c, d_sum, mask=mask)
    tl.store(dsumsq_ptr + c, d_sumsq, mask=mask)
    tl.store(dweight_ptr + c, d_weight.to(dweight_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_ptr + c, d_bias.to(dbias_ptr.dtype.element_ty), mask=mask)


def bn_finalize_backward(d_scale, d_shift, d_mean, d_var, weight, bias, mean, var, count, eps) -> list[torch.Tensor]:
    """``[d_stats = [dΣ; dΣ²] (2, C) fp32, dγ (γ's dtype), dβ (β's dtype)]``; ``d_mean``/``d_var`` may be None (no
    gradient), ``d_scale``/``d_shift`` may not."""
    d_stats = mean.new_empty((2, mean.numel()))
    outputs = [d_stats, torch.empty_like(weight), torch.empty_like(bias)]
    grid = (triton.cdiv(mean.numel(), BLOCK_C),)
    _bn_finalize_bwd_kernel[grid](
        d_stats[0], d_stats[1], *outputs[1:], d_scale, d_shift,
        d_scale if d_mean is None else d_mean, d_scale if d_var is None else d_var, weight, mean, var, mean.numel(),
        float(count), eps, HAS_DMEAN=d_mean is not None, HAS_DVAR=d_var is not None, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return outputs
