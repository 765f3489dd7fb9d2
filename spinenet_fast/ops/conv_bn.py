"""A conv op and the training-mode BN of its output as one autograd op: the pieces ``conv1x1_bn`` and
``conv3x3_bn`` share.

Forward: on Triton one launch, the conv GEMM whose statistics epilogue is followed, in the last of its programs to
finish, by the BN's finalize (running statistics and batch counter included); on the other backends the conv op's
launch(es), then ``bn_finalize``. Returns ``(y, out_scale, out_shift)``, y raw in x's dtype and the BN's folded
affine map fp32, so that the BN output is ``out_scale·y + out_shift`` (applied by the consumer as it loads y).
Owning its BN pays off in the backward: the gradients of ``out_scale``/``out_shift`` become the statistics'
gradients inside the kernels that fold them into dy (and dγ, dβ are stored by some of their programs), so no
finalize-backward launch runs between the consumer's backward and this one. With a ``process_group`` (SyncBN) the
statistics are all-reduced before they are finalised and the affine gradients before they are folded; dγ, dβ stay
this rank's own, as ``nn.SyncBatchNorm``'s are (DDP averages them).
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends
from .activation import stats_dtype
from .bn_finalize import (
    STATS_DTYPE,
    _bn_finalize_backward_op,
    _bn_finalize_op,
    affine_dtype,
    bn_finalize_backward_reference,
    check_bn_args,
    with_running_update,
)
from .checks import check_accumulator
from .conv_common import check_weight_grad_buffer, fake_conv_grads
from .op_spec import Backend


def with_bn_backward(conv_backward_reference: Callable) -> Callable:
    """The reference backward of conv + BN from the conv op's reference backward ``(dy, dΣ, dΣ², y, x, weight, scale,
    shift, *conv_args)``: BN's backward to the statistics' gradients first; ``[dx, dW, [dγ; dβ]]``, the prologue's
    [d_scale; d_shift] (with a prologue) added into the last argument, a zeroed (2, C_in) buffer."""

    def reference(dy, d_scale, d_shift, y, x, weight, scale, shift, *args):
        *conv_args, bn_weight, mean, var, count, eps, d_affine_out, d_weight_out = args  # conv_args: the conv op's
        d_stats, d_gamma, d_beta = bn_finalize_backward_reference(
            d_scale, d_shift, None, None, bn_weight, bn_weight, mean, var, count, eps
        )
        grads = conv_backward_reference(dy, d_stats[0], d_stats[1], y, x, weight, scale, shift, *conv_args)
        if scale is not None:
            d_affine_out.add_(grads.pop(2))
        if d_weight_out is not None:
            d_weight_out.add_(grads[1])
            grads[1] = grads[1].new_empty(0)
        return [*grads, torch.stack([d_gamma, d_beta])]

    return reference


def conv_bn_forward(ctx, conv_into_op, train_op, conv_args, x, weight, scale, shift, bn_weight, bn_bias,
                    count, eps, running_mean, running_var, batches, momentum, upsample_factor, group, stats,
                    counter, prologue_grad, weight_grad, side_outputs: int = 0, bias: tuple = (),
                    shares_grads: bool = False) -> tuple:  # fmt: skip
    """The body of a conv + BN ``autograd.Function``'s forward: ``(y, out_scale, out_shift)``, with what its
    backward needs saved on ``ctx``. ``count``: y's pixels (values per channel on this rank). Without a process
    group, one ``train_op`` (the conv with the BN finalized in its last program); with one, the conv, the
    statistics' all-reduce and ``bn_finalize``. ``stats``/``counter``: a zeroed float64 (2, C_out) buffer the conv
    adds its statistics into and a zeroed integer element its programs count themselves on, or None (allocated here,
    one fill); ``prologue_grad``: a zeroed (2, C_in) buffer the first backward adds the prologue's [d_scale; d_shift]
    into, or None; ``weight_grad``: likewise a zeroed fp32 buffer of the weight's shape for dW (an fp32 weight's), or
    None. ``side_outputs``: how many tensors the ops return after y (saved after the rest, not returned). ``bias``:
    ``()`` for ops without one, else ``(bias or None, its gradient's zeroed stats-dtype buffer or None)``: the bias is
    the ops' argument after ``conv_args``, its buffer the backward op's. ``shares_grads``: the weight's and bias'
    gradients are left in their buffers (returned as None) for a caller that shares the buffers across calls (the
    first backward only, as the buffers are used once)."""
    if stats is None:
        fresh = torch.zeros(2 * weight.shape[0] + 1, dtype=STATS_DTYPE, device=x.device)
        stats, counter = fresh[:-1].view(2, -1), counter_view(fresh[-1:])
    elif counter is None:
        counter = torch.zeros(1, dtype=torch.int32, device=x.device)
    running = (running_mean, running_var, batches, momentum)
    op_args = (*conv_args, bias[0]) if bias else conv_args
    if group is None:
        n = count * upsample_factor**2
        y, *rest = train_op(
            x, weight, scale, shift, *op_args, stats, counter, count, bn_weight, bn_bias, eps, *running, n / (n - 1)
        )
        side, (out_scale, out_shift, mean, var) = rest[:side_outputs], rest[side_outputs:]
    else:
        y, *side = as_tuple(conv_into_op(x, weight, scale, shift, *op_args, stats))
        dist.all_reduce(stats, group=group)
        count *= dist.get_world_size(group)  # equal per-rank batches (DDP at a fixed size): no host sync
        n = count * upsample_factor**2
        out_scale, out_shift, mean, var = _bn_finalize_op(stats, count, bn_weight, bn_bias, eps, *running, n / (n - 1))
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, x, weight, scale, shift, bn_weight, bn_bias, mean, var, *side)
    ctx.conv_args, ctx.count, ctx.eps, ctx.group = conv_args, count, eps, group
    ctx.prologue_grad = prologue_grad if scale is not None else None  # used once: a second backward allocates
    ctx.weight_grad, ctx.shares_grads = weight_grad, shares_grads
    ctx.takes_bias = bool(bias)
    ctx.bias_dtype, ctx.bias_grad = (bias[0].dtype, bias[1]) if bias and bias[0] is not None else (None, None)
    return y, out_scale, out_shift


def as_tuple(outputs) -> tuple:
    """A conv op's outputs as a tuple: y alone, or y and its side outputs."""
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def counter_view(element: Tensor) -> Tensor:
    """A one-element slice of a zeroed fp32 (or float64) buffer as the integer of the same size: zero bits are 0."""
    return element.view(torch.int32 if element.element_size() == 4 else torch.int64)


def train_forward_implementations(conv_into: str, conv_arity: int, triton_forward: Callable) -> dict[str, Backend]:
    """The backends of a conv + BN training forward op (arguments: the conv's x, weight, scale, shift, its
    ``conv_arity`` further arguments, then stats, counter, count, γ, β, eps, running mean, running var, batches,
    momentum, unbias; returns y (and the conv's side outputs), scale, shift, mean, var): on Triton
    ``triton_forward(*conv, stats, Finalize)`` (the finalize in the GEMM's last program, running statistics in the
    kernel when they are fp32 buffers, else by ATen after); on the other backends, that backend's ``conv_into`` then
    its ``bn_finalize`` (two launches)."""
    from spinenet_fast.kernels.bn_finalize import Finalize

    def split(args):
        conv, (stats, counter, count, *bn) = args[: 4 + conv_arity], args[4 + conv_arity :]
        return conv, stats, counter, (stats, count, *bn)

    def sequence(backend):
        def run(*args):
            conv, stats, _, bn = split(args)
            y = as_tuple(backends.implementation(conv_into, backend)(*conv, stats))
            stats, count, weight, bias, *rest = bn
            return (*y, *backends.implementation("bn_finalize", backend)(stats, count, weight.contiguous(),
                                                                          bias.contiguous(), *rest))  # fmt: skip

        def reasons(*args):
            conv, stats, _, bn = split(args)
            conv_reasons = backends.reasons_by_backend(conv_into, *conv, stats)[backend]
            return conv_reasons + backends.reasons_by_backend("bn_finalize", *bn)[backend]

        return Backend(run, reasons)

    implementations = {backend: sequence(backend) for backend in ("reference", "cuda")}

    def triton_reasons(*args):
        conv, stats, counter, bn = split(args)
        reasons = backends.reasons_by_backend(conv_into, *conv, stats)["triton"]
        return reasons + backends.reasons_by_backend("bn_finalize", *bn)["triton"] + backends.triton_reasons(counter)

    def run_triton(*args):
        conv, _, counter, bn = split(args)
        launched = []

        def finalizing_conv(stats, count, weight, bias, eps, running_mean, running_var, batches, momentum, unbias):
            outputs = tuple(stats.new_empty(stats.shape[1], dtype=affine_dtype(weight)) for _ in range(4))
            finalize = Finalize(counter, weight.contiguous(), bias.contiguous(), outputs, running_mean, running_var,
                                batches, count, eps, momentum, unbias)  # fmt: skip
            launched.append(triton_forward(*conv, stats, finalize))
            return outputs

        outputs = with_running_update(finalizing_conv, *bn)
        return (*as_tuple(launched[0]), *outputs)

    return implementations | {"triton": Backend(run_triton, triton_reasons)}


def fake_conv_bn_backward(*args, input_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Meta outputs of a conv + BN backward op (arguments: dy, d_scale, d_shift, y, x, weight, ..., γ, mean, var,
    count, eps, d_affine_out, d_weight_out): dx (an empty (0, 0, 0, 0) stand-in without ``input_grad``), dW (an empty
    stand-in where ``d_weight_out`` holds it), [dγ; dβ]."""
    x, weight, bn_weight, d_weight_out = args[4], args[5], args[-7], args[-1]
    dx, d_weight = fake_conv_grads(x, weight, None)
    dx = dx if input_grad else dx.new_empty((0, 0, 0, 0))
    return dx, d_weight if d_weight_out is None else d_weight.new_empty(0), bn_weight.new_empty((2, *bn_weight.shape))


def fake_train_forward(y: Tensor, stats: Tensor, bn_weight: Tensor) -> tuple:
    """Meta outputs of a conv + BN training forward: y and four (C,) vectors of the BN's ``affine_dtype``."""
    return (y, *(stats.new_empty(stats.shape[1], dtype=affine_dtype(bn_weight)) for _ in range(4)))


def conv_bn_backward(ctx, backward_op, dy, d_scale, d_shift, conv_input: tuple | None = None,
                     input_grad: bool | None = None, saved: tuple | None = None) -> tuple:  # fmt: skip
    """The body of the matching backward: gradients of x, weight, the prologue's scale and shift, γ and β (and the
    bias, for an op that takes one). ``conv_input``: the (x, scale, shift) the conv's GEMM read, where they are not
    the op's (a max-pool in between). ``input_grad``: for an op that takes one, whether it computes x's gradient
    (appended to its conv arguments; None for x then). ``saved``: ``ctx.saved_tensors`` where the caller has read
    them (read once per backward: non-reentrant activation checkpointing unpacks each saved tensor once)."""
    saved = ctx.saved_tensors if saved is None else saved
    step = ConvBNBackward(ctx, saved, dy, d_scale, d_shift, conv_input, input_grad=input_grad)
    return step.grads(*backward_op(*step.op_args))


class ConvBNBackward:
    """One conv + BN backward around its op: ``op_args`` (the backward op's arguments: gradients autograd passed none
    for as zeros, the affine gradients all-reduced under SyncBN, the buffers the forward left on ``ctx`` taken) and
    :meth:`grads` (the Function's gradients from the op's ``(dx, dW, [dγ; dβ])``). ``saved``: the tensors
    ``conv_bn_forward`` saved on ``ctx``; ``buffers``: the (prologue, weight, bias) gradient buffers it left there,
    where the caller has taken them off ``ctx`` itself (None: taken off ``ctx`` here — they are used once, a second
    backward allocating its own); ``input_grad``: as ``conv_bn_backward``'s."""

    def __init__(self, ctx, saved, dy, d_scale, d_shift, conv_input: tuple | None = None,
                 buffers: tuple | None = None, input_grad: bool | None = None) -> None:  # fmt: skip
        y, x, weight, scale, shift, bn_weight, bn_bias, mean, var, *_ = saved
        x, scale, shift = (x, scale, shift) if conv_input is None else conv_input
        dy = torch.zeros_like(y) if dy is None else dy
        d_scale, d_shift = (torch.zeros_like(mean) if g is None else g for g in (d_scale, d_shift))
        self.local = (d_scale, d_shift)
        if ctx.group is not None:
            d_affine = torch.stack(self.local)
            dist.all_reduce(d_affine, group=ctx.group)
            d_scale, d_shift = d_affine
        if buffers is None:
            buffers = (ctx.prologue_grad, ctx.weight_grad, ctx.bias_grad)
            ctx.prologue_grad = ctx.weight_grad = ctx.bias_grad = None
        prologue_grad, weight_grad, bias_grad = buffers
        if scale is not None and prologue_grad is None:
            prologue_grad = torch.zeros((2, x.shape[1]), dtype=mean.dtype, device=x.device)
        if ctx.bias_dtype is not None and bias_grad is None:
            bias_grad = torch.zeros(weight.shape[0], dtype=mean.dtype, device=x.device)
        conv_args = (*ctx.conv_args, bias_grad) if ctx.takes_bias else ctx.conv_args
        conv_args += () if input_grad is None else (input_grad,)
        self.input_grad = input_grad is not False
        self.op_args = (dy, d_scale, d_shift, y, x, weight, scale, shift, *conv_args, bn_weight, mean, var, ctx.count,
                        ctx.eps, prologue_grad, weight_grad)  # fmt: skip
        self.ctx, self.bn = ctx, (bn_weight, bn_bias, mean, var)
        self.prologue_grad = prologue_grad if scale is not None else None
        self.weight_grad, self.bias_grad = weight_grad, bias_grad

    def grads(self, dx, d_weight, d_bn) -> tuple:
        ctx, bias_grad = self.ctx, self.bias_grad
        dx = dx if self.input_grad else None
        d_weight = d_weight if self.weight_grad is None else self.weight_grad
        if ctx.shares_grads and self.weight_grad is not None:  # left in the shared buffers (a second backward: own)
            d_weight = bias_grad = None
        d_gamma, d_beta = d_bn
        if ctx.group is not None:  # this rank's own dγ, dβ
            bn_weight, bn_bias, mean, var = self.bn
            _, d_gamma, d_beta = _bn_finalize_backward_op(*self.local, None, None, bn_weight, bn_bias, mean, var,
                                                          ctx.count, ctx.eps)  # fmt: skip
        d_affine = self.prologue_grad.unbind() if self.prologue_grad is not None else (None, None)
        if not ctx.takes_bias:
            return dx, d_weight, *d_affine, d_gamma, d_beta
        return dx, d_weight, *d_affine, d_gamma, d_beta, None if bias_grad is None else bias_grad.to(ctx.bias_dtype)


def checked_bn_args(x, weight, pixels_out: int, bn_weight, bn_bias, eps, running_mean, running_var,
                    num_batches_tracked, momentum, upsample_factor, process_group, stats_buffer, counter_buffer,
                    prologue_grad_buffer, weight_grad_buffer) -> tuple:  # fmt: skip
    """The BN arguments of a conv + BN op whose output has ``weight.shape[0]`` channels and ``pixels_out`` pixels,
    checked, as its ``autograd.Function`` takes them after the conv's own: ``(count, eps, running_mean, running_var,
    batches, momentum, upsample_factor, group, stats, counter, prologue_grad, weight_grad)``."""
    bn = (bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum, upsample_factor)
    group_size = dist.get_world_size(process_group) if process_group is not None else 1
    check_bn_args(weight.shape[0], x.device, pixels_out, *bn, channels_of="the conv's output",
                  count_of=partial("N·H·W of the conv's output, for x of shape {}".format, tuple(x.shape)),
                  group_size=group_size)  # fmt: skip
    dtype = stats_dtype(x)
    check_accumulator("stats_buffer", stats_buffer, (2, weight.shape[0]), STATS_DTYPE, x.device)
    check_accumulator("counter_buffer", counter_buffer, (1,), torch.int32 if dtype == torch.float32 else torch.int64,
                      x.device)  # fmt: skip
    check_accumulator("prologue_grad_buffer", prologue_grad_buffer, (2, x.shape[1]), dtype, x.device)
    check_weight_grad_buffer(weight_grad_buffer, weight, x.device)
    momentum = 0.0 if running_mean is None else float(momentum)  # unused without running statistics
    return (pixels_out, float(eps), running_mean, running_var, num_batches_tracked, momentum, upsample_factor,
            process_group, stats_buffer, counter_buffer, prologue_grad_buffer, weight_grad_buffer)  # fmt: skip
