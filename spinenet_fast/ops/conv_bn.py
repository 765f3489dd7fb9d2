"""A conv op and the training-mode BN of its output as one autograd op: the pieces ``conv1x1_bn`` and
``conv3x3s2_bn`` share.

Forward: the conv op's launch(es) with the statistics epilogue, then ``bn_finalize`` (with the running-statistics
update) — returns ``(y, out_scale, out_shift)``, y raw in x's dtype and the BN's folded affine map fp32, so that the BN
output is ``out_scale·y + out_shift`` (applied by the consumer as it loads y). Owning its BN pays off in the
backward: the gradients of ``out_scale``/``out_shift`` become the statistics' gradients inside the kernels that fold
them into dy (and dγ, dβ are stored by some of their programs), so no finalize-backward launch runs between the
consumer's backward and this one. With a ``process_group`` (SyncBN) the statistics are all-reduced before they are
finalised and the affine gradients before they are folded; dγ, dβ stay this rank's own, as ``nn.SyncBatchNorm``'s
are (DDP averages them).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist

from .activation import stats_dtype
from .bn_finalize import _bn_finalize_backward_op, _bn_finalize_op, bn_finalize_backward_reference, check_bn_args
from .checks import check_accumulator


def with_bn_backward(conv_backward_reference: Callable) -> Callable:
    """The reference backward of conv + BN from the conv op's reference backward ``(dy, dΣ, dΣ², y, x, weight, scale,
    shift, *conv_args)``: BN's backward to the statistics' gradients first; ``[dx, dW, [dγ; dβ]]``, the prologue's
    [d_scale; d_shift] (with a prologue) added into the last argument, a zeroed (2, C_in) buffer."""

    def reference(dy, d_scale, d_shift, y, x, weight, scale, shift, *args):
        *conv_args, bn_weight, mean, var, count, eps, d_affine_out = args
        d_stats, d_gamma, d_beta = bn_finalize_backward_reference(
            d_scale, d_shift, None, None, bn_weight, bn_weight, mean, var, count, eps
        )
        grads = conv_backward_reference(dy, d_stats[0], d_stats[1], y, x, weight, scale, shift, *conv_args)
        if scale is not None:
            d_affine_out.add_(grads.pop(2))
        return [*grads, torch.stack([d_gamma, d_beta])]

    return reference


def conv_bn_forward(ctx, conv_op, conv_into_op, conv_args, x, weight, scale, shift, bn_weight, bn_bias, eps,
                    running_mean, running_var, batches, momentum, upsample_factor, group, stats,
                    prologue_grad) -> tuple:  # fmt: skip
    """The body of a conv + BN ``autograd.Function``'s forward: ``(y, out_scale, out_shift)``, with what its
    backward needs saved on ``ctx``. ``stats``: a zeroed (2, C_out) buffer the conv adds its statistics into
    (``conv_into_op``), or None (``conv_op`` allocates and fills one); ``prologue_grad``: a zeroed (2, C_in) buffer
    the first backward adds the prologue's [d_scale; d_shift] into, or None."""
    if stats is None:
        y, stats = conv_op(x, weight, scale, shift, *conv_args)
    else:
        y = conv_into_op(x, weight, scale, shift, *conv_args, stats)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if group is not None:
        dist.all_reduce(stats, group=group)
        count *= dist.get_world_size(group)  # equal per-rank batches (DDP at a fixed size): no host sync
    n = count * upsample_factor**2
    out_scale, out_shift, mean, var = _bn_finalize_op(
        stats, count, bn_weight, bn_bias, eps, running_mean, running_var, batches, momentum, n / (n - 1)
    )
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, x, weight, scale, shift, bn_weight, bn_bias, mean, var)
    ctx.conv_args, ctx.count, ctx.eps, ctx.group = conv_args, count, eps, group
    ctx.prologue_grad = prologue_grad if scale is not None else None  # used once: a second backward allocates
    return y, out_scale, out_shift


def conv_bn_backward(ctx, backward_op, dy, d_scale, d_shift) -> tuple:
    """The body of the matching backward: gradients of x, weight, the prologue's scale and shift, γ and β."""
    y, x, weight, scale, shift, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    dy = torch.zeros_like(y) if dy is None else dy
    d_scale, d_shift = (torch.zeros_like(mean) if g is None else g for g in (d_scale, d_shift))
    local = (d_scale, d_shift)
    if ctx.group is not None:
        d_affine = torch.stack(local)
        dist.all_reduce(d_affine, group=ctx.group)
        d_scale, d_shift = d_affine
    prologue_grad, ctx.prologue_grad = ctx.prologue_grad, None
    if scale is not None and prologue_grad is None:
        prologue_grad = torch.zeros((2, x.shape[1]), dtype=mean.dtype, device=x.device)
    args = (y, x, weight, scale, shift, *ctx.conv_args, bn_weight, mean, var, ctx.count, ctx.eps, prologue_grad)
    dx, d_weight, d_bn = backward_op(dy, d_scale, d_shift, *args)
    d_gamma, d_beta = d_bn
    if ctx.group is not None:  # this rank's own dγ, dβ
        _, d_gamma, d_beta = _bn_finalize_backward_op(*local, None, None, bn_weight, bn_bias, mean, var, ctx.count,
                                                      ctx.eps)  # fmt: skip
    return dx, d_weight, *(prologue_grad.unbind() if scale is not None else (None, None)), d_gamma, d_beta


def checked_bn_args(x, weight, pixels_out: int, bn_weight, bn_bias, eps, running_mean, running_var,
                    num_batches_tracked, momentum, upsample_factor, process_group, stats_buffer,
                    prologue_grad_buffer) -> tuple:  # fmt: skip
    """The BN arguments of a conv + BN op whose output has ``weight.shape[0]`` channels and ``pixels_out`` pixels,
    checked, as its ``autograd.Function`` takes them after the conv's own: ``(eps, running_mean, running_var,
    batches, momentum, upsample_factor, group, stats, prologue_grad)`` (running statistics: both or neither)."""
    bn = (bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked)
    check_bn_args(weight.shape[0], x.device, pixels_out, *bn)
    dtype = stats_dtype(x)
    check_accumulator("stats_buffer", stats_buffer, (2, weight.shape[0]), dtype, x.device)
    check_accumulator("prologue_grad_buffer", prologue_grad_buffer, (2, x.shape[1]), dtype, x.device)
    if isinstance(upsample_factor, bool) or not isinstance(upsample_factor, int) or upsample_factor < 1:
        raise ValueError(f"upsample_factor must be a positive int, got {upsample_factor!r}")
    update = running_mean is not None and running_var is not None
    running = (running_mean, running_var) if update else (None, None)
    return (float(eps), *running, num_batches_tracked, float(momentum), upsample_factor, process_group, stats_buffer,
            prologue_grad_buffer)  # fmt: skip
