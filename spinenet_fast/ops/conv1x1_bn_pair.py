"""``conv1x1_bn_pair``: two ``conv1x1_bn`` of one input x (a bottleneck's first conv and its projection shortcut) as
one autograd op, so that their backward is one launch.

Equivalent to::

    y_a, scale_a, shift_a = conv1x1_bn(x, weight_a, **bn_a)
    y_b, scale_b, shift_b = conv1x1_bn(x, weight_b, **bn_b)

(no prologue: x is read as it is). Forward: the two ops' launches. Backward: one GEMM launch whose dgrad tiles sum
both convs' g·W in one accumulator — dx is stored once, instead of one gradient per conv that the producer of x then
reads both of — and whose wgrad tiles cover both weights (x read by one launch); each conv's BN backward is folded
into the loads of its dy, as in ``conv1x1_bn``.
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .conv1x1_bn import _conv1x1_bn_forward_op, _triton_reasons, conv1x1_bn_backward_reference
from .conv1x1_bn_stats import _conv1x1_into_op, check_conv1x1_args
from .conv_bn import ConvBNBackward, checked_bn_args, conv_bn_forward
from .conv_common import fake_conv_grads
from .op_spec import FUSED_FIRST, Backend

CONV_ARGS = 10  # per conv: dy, d_scale, d_shift, y, weight, γ, mean, var, eps, d_weight_out


def _conv_args(args) -> list[tuple]:
    """The two convs' arguments of ``(x, *args)``, each ``CONV_ARGS`` long."""
    return [args[1 : 1 + CONV_ARGS], args[1 + CONV_ARGS : 1 + 2 * CONV_ARGS]]


def conv1x1_bn_pair_backward_reference(x, *args) -> list[Tensor]:
    """``[dx, dW_a, [dγ_a; dβ_a], dW_b, [dγ_b; dβ_b]]``: each conv's reference backward, dx their sum."""
    count = args[-1]
    grads = []
    for dy, d_scale, d_shift, y, weight, gamma, mean, var, eps, d_weight_out in _conv_args((x, *args)):
        grads.append(conv1x1_bn_backward_reference(dy, d_scale, d_shift, y, x, weight, None, None, "identity", gamma,
                                                   mean, var, count, eps, None, d_weight_out))  # fmt: skip
    (dx_a, *rest_a), (dx_b, *rest_b) = grads
    return [dx_a + dx_b, *rest_a, *rest_b]


def _triton_pair_reasons(x, *args) -> list[str]:
    return [
        reason
        for dy, d_scale, d_shift, y, weight, gamma, mean, var, *_ in _conv_args((x, *args))
        for reason in _triton_reasons(dy, d_scale, d_shift, y, x, weight, None, None, "identity", gamma, mean, var)
    ]


def _backward_triton(x, *args) -> list[Tensor]:
    from spinenet_fast.kernels.conv1x1_backward import conv1x1_bn_pair_backward

    count = args[-1]
    convs = [
        (dy, d_scale, d_shift, y, weight, (gamma, mean, var, count, eps),
         None if d_weight_out is None else d_weight_out.view(weight.shape[:2]))
        for dy, d_scale, d_shift, y, weight, gamma, mean, var, eps, d_weight_out in _conv_args((x, *args))
    ]  # fmt: skip
    return conv1x1_bn_pair_backward(x, convs)


def _fake(x, *args) -> list[Tensor]:
    grads = [fake_conv_grads(x, args[4], None)[0]]
    for _, _, _, _, weight, gamma, _, _, _, d_weight_out in _conv_args((x, *args)):
        d_weight = torch.empty_like(weight) if d_weight_out is None else weight.new_empty(0)
        grads += [d_weight, gamma.new_empty((2, *gamma.shape))]
    return grads


@op_spec.custom_op(
    "conv1x1_bn_pair_backward",
    fake=_fake,
    implementations={
        "reference": Backend(conv1x1_bn_pair_backward_reference),
        # as for conv1x1_bn: the cuda backend's backward is ATen's GEMMs around the elementwise steps
        "cuda": Backend(conv1x1_bn_pair_backward_reference, lambda x, *args: backends.library_reasons(x)),
        "triton": Backend(_backward_triton, _triton_pair_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("d_weight_out_a", "d_weight_out_b"),
)
def _conv1x1_bn_pair_backward_op(
    x: Tensor, dy_a: Tensor, d_scale_a: Tensor, d_shift_a: Tensor, y_a: Tensor, weight_a: Tensor, bn_weight_a: Tensor,
    mean_a: Tensor, var_a: Tensor, eps_a: float, d_weight_out_a: Tensor | None, dy_b: Tensor, d_scale_b: Tensor,
    d_shift_b: Tensor, y_b: Tensor, weight_b: Tensor, bn_weight_b: Tensor, mean_b: Tensor, var_b: Tensor,
    eps_b: float, d_weight_out_b: Tensor | None, count: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dW_a, [dγ_a; dβ_a], dW_b, [dγ_b; dβ_b])`` of the two convs + BNs (``conv1x1_bn_backward``'s arguments
    per conv, without a prologue); dW added into ``d_weight_out_*`` where given (its dW returned empty)."""


class _ConvContext:
    """What ``conv_bn_forward`` leaves on a ctx, kept per conv of the pair (the tensors saved on the real ctx)."""

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors) -> None:
        self.to_save = tensors


class _Conv1x1BNPair(torch.autograd.Function):
    """A Function around the custom ops (the finalizes mutate the running statistics, as in ``conv1x1_bn``)."""

    @staticmethod
    def forward(ctx, x, weight_a, bn_weight_a, bn_bias_a, weight_b, bn_weight_b, bn_bias_b, bn_a, bn_b):
        outputs, saved, ctx.convs = [], [], []
        for weight, gamma, beta, bn in ((weight_a, bn_weight_a, bn_bias_a, bn_a), (weight_b, bn_weight_b, bn_bias_b,
                                                                                    bn_b)):  # fmt: skip
            conv = _ConvContext()
            outputs += conv_bn_forward(conv, _conv1x1_into_op, _conv1x1_bn_forward_op, ("identity",), x, weight, None,
                                       None, gamma, beta, *bn)  # fmt: skip
            saved += conv.to_save
            ctx.convs.append(conv)
        # each conv's gradient buffers, used once (a second backward allocates): on ctx, which backward may clear
        ctx.buffers = tuple((conv.prologue_grad, conv.weight_grad, conv.bias_grad) for conv in ctx.convs)
        for conv in ctx.convs:
            del conv.to_save, conv.prologue_grad, conv.weight_grad, conv.bias_grad
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, dy_a, d_scale_a, d_shift_a, dy_b, d_scale_b, d_shift_b):
        saved = ctx.saved_tensors
        half = len(saved) // 2
        buffers, ctx.buffers = ctx.buffers, ((None,) * 3,) * 2
        outputs = ((dy_a, d_scale_a, d_shift_a), (dy_b, d_scale_b, d_shift_b))
        steps = [
            ConvBNBackward(conv, conv_saved, *grads, buffers=conv_buffers)
            for conv, conv_saved, grads, conv_buffers in zip(ctx.convs, (saved[:half], saved[half:]), outputs, buffers)
        ]
        per_conv = []
        for step in steps:  # conv1x1_bn_backward's arguments less x, the prologue's, the activation and the count
            dy, d_scale, d_shift, y, x, weight, _, _, _, gamma, mean, var, count, eps, _, d_weight_out = step.op_args
            per_conv += [dy, d_scale, d_shift, y, weight, gamma, mean, var, eps, d_weight_out]
        dx, *grads = _conv1x1_bn_pair_backward_op(x, *per_conv, count)
        (_, dw_a, _, _, dg_a, db_a), (_, dw_b, _, _, dg_b, db_b) = (
            step.grads(None, *grads[2 * i : 2 * i + 2]) for i, step in enumerate(steps)
        )
        return dx, dw_a, dg_a, db_a, dw_b, dg_b, db_b, None, None


BN_DEFAULTS = dict(running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1, upsample_factor=1,
                   process_group=None, stats_buffer=None, counter_buffer=None, weight_grad_buffer=None)  # fmt: skip


def conv1x1_bn_pair(x: Tensor, weight_a: Tensor, weight_b: Tensor, *, bn_a: dict, bn_b: dict) -> tuple[Tensor, ...]:
    """``(y_a, out_scale_a, out_shift_a, y_b, out_scale_b, out_shift_b)`` (see the module docstring); checks
    arguments first. ``bn_a``/``bn_b``: each conv's BN keyword arguments of ``conv1x1_bn`` (``bn_weight``, ``bn_bias``,
    ``eps`` and any of ``BN_DEFAULTS``'s; no prologue, so no ``prologue_grad_buffer``)."""
    for weight in (weight_a, weight_b):
        check_conv1x1_args(x, weight, None, None, "identity")
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    allowed = {"bn_weight", "bn_bias", "eps", *BN_DEFAULTS}
    bns = []
    for name, weight, bn in (("bn_a", weight_a, bn_a), ("bn_b", weight_b, bn_b)):
        if not isinstance(bn, dict) or not {"bn_weight", "bn_bias", "eps"} <= set(bn) <= allowed:
            got = sorted(bn) if isinstance(bn, dict) else type(bn).__name__
            raise TypeError(f"{name} must be a dict of bn_weight, bn_bias, eps and optionally {sorted(BN_DEFAULTS)}, "
                            f"got {got}")  # fmt: skip
        kwargs = dict(BN_DEFAULTS)  # (no dict union: torch 2.6's dynamo cannot trace it)
        kwargs.update(bn)
        bns.append((bn["bn_weight"], bn["bn_bias"], checked_bn_args(x, weight, pixels, prologue_grad_buffer=None,
                                                                    **kwargs)))  # fmt: skip
    (gamma_a, beta_a, args_a), (gamma_b, beta_b, args_b) = bns
    return _Conv1x1BNPair.apply(x, weight_a, gamma_a, beta_a, weight_b, gamma_b, beta_b, args_a, args_b)
