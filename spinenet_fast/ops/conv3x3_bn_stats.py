"""``conv3x3_bn_stats``: ``y = conv3x3/s(act(scale·x + shift)) + bias`` plus float64 [Σy; Σy²] (2, C_out) — equivalent
to::

    F.conv2d(F.pad(act(scale[:, None, None] * x + shift[:, None, None]), pads), weight, bias, stride=stride)

``stride`` is 1 (the blocks' and the head's convs) or 2 (the cross-scale downsampling). ``weight`` is dense
(C_out, C_in, 3, 3) — or (C_out, C_in, 7, 7), SpineNet's stem conv, the one other window the op takes — or depthwise
(C_in, 1, 3, 3) for C_in > 1 (``groups=C_in``: SpineNet-Mobile's resampling; a Triton direct conv,
``kernels/depthwise3x3.py``, on the same op, autograd and BN machinery). ``weight`` and the optional (C_out,) ``bias``
are in x's dtype, or fp32 master parameters of a bf16/fp16 x (rounded to x's dtype as they are used, as autocast rounds
them). ``padding`` is ``"torch"`` (K // 2 each side) or ``"tf_same"`` (TF ``SAME``: a 3×3 window of stride 1 pads 1
each side, of stride 2 0 before and 1 after; a 7×7 window of stride 2 2 before and 3 after), for inputs whose H and W
are multiples of the stride. Tensors are (N, C, H, W), any memory format; outputs are channels_last. The reference
materialises the activation and runs ATen's conv in fp32 maths: the CPU path and the test oracle. The op runs as a
Triton implicit GEMM with the prologue and statistics fused, or (``cuda``) as cuDNN on the materialised input in the
storage dtype (fused_ops.md §3: benchmark both, keep the faster). Its backward recomputes the activation (not the
conv): two Triton implicit GEMMs (dgrad, wgrad) with BN's and the prologue's backward inside them, or (``cuda``)
ATen's conv backward between the elementwise steps.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, op_spec
from .activation import stats_dtype
from .checks import check_buffers_without_statistics, check_statistics_flag, describe
from .conv_common import (
    accumulating,
    added_into_buffers,
    check_grad_buffers,
    check_window_input,
    conv_outputs,
    fake_backward_into,
    fake_conv_grads,
    fake_conv_outputs,
    fill_output_grads,
    folded_output_grad,
    into_buffers_backward,
    into_buffers_forward,
    no_statistics,
    prologue_backward,
    prologue_forward,
)
from .op_spec import FUSED_FIRST, Backend
from .padding import crop_window, pad_window, spatial_padding
from .schema_types import TensorList


def check_conv3x3_args(x, weight, scale, shift, activation, padding, stride, bias=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one 3×3 conv."""
    check_window_input("x", x, scale, shift, activation, padding, stride)
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else (x.dtype,)
    expected = " or ".join(map(str, allowed))
    c_in = x.shape[1]
    dense = isinstance(weight, Tensor) and weight.shape[1:] in ((c_in, 3, 3), (c_in, 7, 7))
    depthwise = isinstance(weight, Tensor) and weight.shape == (c_in, 1, 3, 3)
    if not (dense or depthwise) or weight.dtype not in allowed:
        raise ValueError(f"weight must be a {expected} (C_out, {c_in}, 3, 3) or (C_out, {c_in}, 7, 7) tensor (dense) "
                         f"or ({c_in}, 1, 3, 3) (depthwise), got {describe(weight)}")  # fmt: skip
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device} like x, got {weight.device}")
    if bias is not None and (
        not isinstance(bias, Tensor) or bias.shape != weight.shape[:1] or bias.dtype not in allowed
        or bias.device != x.device
    ):  # fmt: skip
        raise ValueError(f"bias must be None or a {expected} ({weight.shape[0]},) tensor on {x.device}, "
                         f"got {describe(bias)}")  # fmt: skip


def conv_groups(x: Tensor, weight: Tensor) -> int:
    """The conv's groups: C_in for a depthwise (C_in, 1, 3, 3) weight of a C_in > 1 input, else 1 (dense)."""
    return x.shape[1] if weight.shape[1] == 1 and x.shape[1] > 1 else 1


def is_depthwise(x: Tensor, weight: Tensor) -> bool:
    return conv_groups(x, weight) > 1


def window(weight: Tensor) -> int:
    """The conv's window: 3 (3×3), or 7 (the stem's 7×7)."""
    return weight.shape[-1]


def pad_before(weight: Tensor, stride: int, padding: str) -> int:
    """The top/left padding of the conv's window (the kernels' ``PAD``)."""
    return spatial_padding(window(weight), stride, padding)[0]


def rounded(parameter: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """A weight or bias rounded to x's dtype (as autocast uses an fp32 master parameter), in ``dtype``."""
    return None if parameter is None else parameter.to(x.dtype).to(dtype)


def conv3x3_bn_stats_reference(x, weight, scale, shift, activation, padding, stride, bias, statistics=True
                               ) -> list[Tensor]:  # fmt: skip
    """``[y, [Σy; Σy²]]`` with ATen's conv on the materialised activation (fp32 maths)."""
    a = prologue_forward(x, scale, shift, activation)
    y = F.conv2d(pad_window(a, padding, 0.0, stride, window(weight)), rounded(weight, x, a.dtype),
                 rounded(bias, x, a.dtype), stride, groups=conv_groups(x, weight))  # fmt: skip
    return conv_outputs(y, x, statistics)


def _conv_input(a: Tensor, padding: str, stride: int, kernel_size: int) -> tuple[Tensor, list[int]]:
    """The conv's input and its ``padding`` argument: symmetric padding is the conv's own (no padded copy);
    TF ``SAME``'s asymmetric padding (stride 2) is materialised."""
    before, after = spatial_padding(kernel_size, stride, padding)
    return (a, [before, before]) if before == after else (pad_window(a, padding, 0.0, stride, kernel_size), [0, 0])


def conv3x3_bn_stats_library(x, weight, scale, shift, activation, padding, stride, bias, statistics=True, stats=None
                             ) -> list[Tensor]:  # fmt: skip
    """cuDNN (ATen's conv) on the materialised activation in x's dtype; statistics of the stored y (added into
    ``stats`` where given; none without ``statistics``). Depthwise: the extension's kernel, prologue and statistics
    inside it (its statistics taken in any case, then dropped without ``statistics``)."""
    if is_depthwise(x, weight):
        dtype = stats_dtype(x)
        y, stats = torch.ops.spinenet_fast.ext_depthwise3x3(
            x, rounded(weight, x, dtype).reshape(-1, 9), rounded(bias, x, dtype), scale, shift, activation, stride,
            pad_before(weight, stride, padding), stats,
        )  # fmt: skip
        return [y, stats if statistics else no_statistics(x)]
    a, pads = _conv_input(prologue_forward(x, scale, shift, activation).to(x.dtype), padding, stride, window(weight))
    y = F.conv2d(a, weight.to(x.dtype), rounded(bias, x, x.dtype), stride=stride, padding=pads)
    y, new_stats = conv_outputs(y, x, statistics)
    return [y, new_stats if stats is None else stats.add_(new_stats)]


def _conv_triton_reasons(x, weight, scale, shift, activation, padding, stride, bias=None, *_) -> list[str]:
    reasons = backends.triton_reasons(x, weight, scale, shift, bias)
    if x.dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


def _library_reasons(x, weight, *args) -> list[str]:
    """The ``cuda`` backend's: ATen's library conv, or for a depthwise weight the compiled extension's kernels."""
    return backends.extension_reasons(x) if is_depthwise(x, weight) else backends.library_reasons(x)


def triton_conv3x3_forward(x, weight, *args, **kwargs) -> list[Tensor]:
    """``kernels.conv3x3.conv3x3_bn_stats_forward`` (dense) or ``kernels.depthwise3x3``'s launcher (depthwise)."""
    if is_depthwise(x, weight):
        from spinenet_fast.kernels.depthwise3x3 import depthwise3x3_bn_stats_forward as forward
    else:
        from spinenet_fast.kernels.conv3x3 import conv3x3_bn_stats_forward as forward
    return forward(x, weight, *args, **kwargs)


def _triton_forward(x, weight, scale, shift, activation, padding, stride, bias, statistics=True, stats=None
                    ) -> list[Tensor]:  # fmt: skip
    return triton_conv3x3_forward(x, weight, scale, shift, activation, pad_before(weight, stride, padding), stride,
                                  bias, stats, statistics=statistics)  # fmt: skip


def _into(forward):
    """A backend of ``conv3x3_bn_stats_into`` (y, the statistics added into the last argument ``stats``) from a
    forward that takes ``stats`` itself."""
    return lambda *args: forward(*args[:-1], stats=args[-1])[0]


def _fake(x, weight, scale, shift, activation, padding, stride, bias=None, statistics=True):
    return fake_conv_outputs(x, weight, x.shape[2] // stride, x.shape[3] // stride, statistics)


@op_spec.custom_op(
    "conv3x3_bn_stats_into",
    fake=lambda *args: _fake(*args[:-1])[0],
    implementations={
        "reference": Backend(accumulating(conv3x3_bn_stats_reference)),
        "cuda": Backend(_into(conv3x3_bn_stats_library), _library_reasons),
        "triton": Backend(_into(_triton_forward), lambda *args: _conv_triton_reasons(*args[:-1])),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("stats",),
)
def _conv3x3_into_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str, stride: int,
    bias: Tensor | None, stats: Tensor,
) -> Tensor:  # fmt: skip
    """As ``conv1x1_bn_stats_into``, for ``conv3x3_bn``: y, the statistics added into ``stats``."""


def _library_conv_backward(grad: Tensor, a: Tensor, weight: Tensor, padding: str, stride: int, groups: int,
                           input_grad: bool = True) -> tuple[Tensor | None, Tensor]:  # fmt: skip
    """ATen's (cuDNN's) conv backward: ``(d_a, d_weight)`` for the unpadded activation a, in a's dtype (d_a None
    without ``input_grad``); d_weight laid out as ``weight`` (ATen follows a channels_last a; the parameter's
    gradient takes the weight's strides in any case, so the copy is the one autograd would make)."""
    a, pads = _conv_input(a, padding, stride, window(weight))
    d_a, d_w, _ = torch.ops.aten.convolution_backward(
        grad, a, weight.to(a.dtype), None, [stride, stride], pads, [1, 1], False, [0, 0], groups,
        [input_grad, True, False],
    )  # fmt: skip
    if d_w.stride() != weight.stride():
        d_w = torch.empty_like(weight, dtype=d_w.dtype).copy_(d_w)
    if d_a is None or pads[0]:
        return d_a, d_w
    return crop_window(d_a, padding, stride, window(weight)), d_w


def conv3x3_bn_stats_backward_reference(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride,
                                        d_bias_out, input_grad: bool = True):  # fmt: skip
    """``[dx, d_weight, (d_affine)]``, d_affine = [d_scale; d_shift] (2, C_in): statistics' gradients folded into dy
    (with the saved y, the tensor the statistics were taken of), then ATen's conv backward, in fp32 maths; the bias
    gradient Σ_p g added into ``d_bias_out`` where it is given. Without ``input_grad`` (no prologue: nothing else
    needs it) dx is not computed: an empty (0, 0, 0, 0) stand-in."""
    a = prologue_forward(x, scale, shift, activation)
    dtype = a.dtype
    grad = folded_output_grad(dy, d_sum, d_sumsq, y, dtype)
    if d_bias_out is not None:
        d_bias_out.add_(grad.sum((0, 2, 3)))
    # the weight rounded as forward
    d_a, d_w = _library_conv_backward(grad, a, weight.to(x.dtype), padding, stride, conv_groups(x, weight),
                                      input_grad)  # fmt: skip
    if d_a is None:
        return [x.new_empty((0, 0, 0, 0)), d_w.to(weight.dtype)]
    dx, *d_affine = prologue_backward(d_a, x, scale, shift, activation)
    return [dx, d_w.to(weight.dtype), torch.stack(d_affine)] if d_affine else [dx, d_w.to(weight.dtype)]


def conv3x3_bn_stats_backward_library(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride,
                                      d_bias_out, input_grad: bool = True):  # fmt: skip
    """The ``cuda`` backward: the reference's (ATen's conv backward), or for a depthwise weight the extension's two
    kernels (dgrad with the prologue's backward; the nine taps' and the bias' wgrad sums; dx always computed)."""
    if not is_depthwise(x, weight):
        return conv3x3_bn_stats_backward_reference(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding,
                                                   stride, d_bias_out, input_grad)  # fmt: skip
    dtype = stats_dtype(x)
    dx, sums, *d_affine = torch.ops.spinenet_fast.ext_depthwise3x3_backward(
        dy, d_sum, d_sumsq, None if d_sum is None else y, x, rounded(weight, x, dtype).reshape(-1, 9), scale, shift,
        activation, stride, pad_before(weight, stride, padding),
    )  # fmt: skip
    if d_bias_out is not None:
        d_bias_out.add_(sums[9])
    d_weight = torch.empty_like(weight).copy_(sums[:9].t().reshape(weight.shape))  # the weight's layout and dtype
    return [dx, d_weight, *d_affine]


def _conv3x3_backward_triton(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride, d_bias_out,
                             bn=None, d_affine=None, d_weight=None, input_grad: bool = True):  # fmt: skip
    """The Triton dgrad and wgrad implicit GEMMs in one launch (``kernels/conv3x3_backward.py``); ``bn``
    (``conv3x3_bn``): d_sum, d_sumsq are the gradients of the BN's scale and shift, [dγ; dβ] appended;
    ``d_affine``/``d_weight``: zeroed buffers the prologue's gradients / dW are added into (then not returned);
    without ``input_grad`` (dense, no prologue) only the wgrad's programs run and dx is empty."""
    if is_depthwise(x, weight):
        from spinenet_fast.kernels.depthwise3x3 import depthwise3x3_bn_stats_backward as backward

        extra = {}
    else:
        from spinenet_fast.kernels.conv3x3_backward import conv3x3_bn_stats_backward as backward

        extra = {"input_grad": input_grad}
    return backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, pad_before(weight, stride, padding),
                    stride, d_bias_out, bn, d_affine, d_weight, **extra)  # fmt: skip


def _library_backward_reasons(dy, d_sum, d_sumsq, y, x, weight, *args) -> list[str]:
    return _library_reasons(x, weight)


def _conv_backward_triton_reasons(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride,
                                  *_) -> list[str]:  # fmt: skip
    reasons = _conv_triton_reasons(x, weight, scale, shift, activation, padding, stride)
    return reasons + backends.triton_reasons(dy, y)


def _bias_grad_output(backward):
    """A backend of the stats op's backward (``has_bias``: the bias gradient returned last) from a backward that adds
    it into a ``d_bias_out`` buffer (an op output rather than a mutated argument: a list-returning op that mutates an
    argument cannot be functionalised for ``torch.compile``)."""

    def run(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride, has_bias):
        d_bias = x.new_zeros(weight.shape[0], dtype=stats_dtype(x)) if has_bias else None
        grads = backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride, d_bias)
        return grads + ([d_bias] if has_bias else [])

    return run


def _fake_backward(dy, d_sum, d_sumsq, y, x, weight, scale, shift, activation, padding, stride, has_bias):
    grads = fake_conv_grads(x, weight, scale)
    return grads + ([x.new_empty(weight.shape[0], dtype=stats_dtype(x))] if has_bias else [])


# Until a GPU benchmark decides between the implicit GEMM and cuDNN on a materialised input (fused_ops.md §3).
@op_spec.custom_op(
    "conv3x3_bn_stats",
    fake=_fake,
    implementations={
        "reference": Backend(conv3x3_bn_stats_reference),
        "cuda": Backend(conv3x3_bn_stats_library, _library_reasons),
        "triton": Backend(_triton_forward, _conv_triton_reasons),
    },
    auto_order=FUSED_FIRST,
)
def _conv3x3_op(
    x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str, stride: int,
    bias: Tensor | None, statistics: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(y, [Σy; Σy²])`` (without ``statistics``: ``(y, no_statistics)``)."""


@op_spec.custom_op(
    "conv3x3_bn_stats_backward",
    fake=_fake_backward,
    implementations={
        "reference": Backend(_bias_grad_output(conv3x3_bn_stats_backward_reference)),
        "cuda": Backend(_bias_grad_output(conv3x3_bn_stats_backward_library), _library_backward_reasons),
        "triton": Backend(_bias_grad_output(_conv3x3_backward_triton), _conv_backward_triton_reasons),
    },
    auto_order=FUSED_FIRST,
)
def _conv3x3_backward_op(
    dy: Tensor, d_sum: Tensor | None, d_sumsq: Tensor | None, y: Tensor, x: Tensor, weight: Tensor,
    scale: Tensor | None, shift: Tensor | None, activation: str, padding: str, stride: int, has_bias: bool,
) -> TensorList:  # fmt: skip
    """``[dx, dW, ([d_scale; d_shift]), (d_bias)]``; d_bias (the statistics' dtype) with ``has_bias``; ``d_sum``,
    ``d_sumsq`` None: the statistics have no gradient, and y is not read."""


def _backward_into_triton(dy, x, weight, scale, shift, activation, padding, stride, d_bias_out, d_affine_out,
                          d_weight_out):  # fmt: skip
    dx, d_weight = _conv3x3_backward_triton(dy, None, None, dy, x, weight, scale, shift, activation, padding, stride,
                                            d_bias_out, None, d_affine_out, d_weight_out)  # fmt: skip
    return dx, d_weight


def _library_backward_into_reasons(dy, x, weight, *_) -> list[str]:
    return _library_reasons(x, weight)


def _triton_backward_into_reasons(dy, x, weight, scale, shift, activation, padding, stride, *_) -> list[str]:
    return _conv_backward_triton_reasons(dy, None, None, dy, x, weight, scale, shift, activation, padding, stride)


@op_spec.custom_op(
    "conv3x3_bn_stats_backward_into",
    fake=fake_backward_into,
    implementations={
        "reference": Backend(added_into_buffers(conv3x3_bn_stats_backward_reference)),
        "cuda": Backend(added_into_buffers(conv3x3_bn_stats_backward_library), _library_backward_into_reasons),
        "triton": Backend(_backward_into_triton, _triton_backward_into_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("d_bias_out", "d_affine_out", "d_weight_out"),
)
def _conv3x3_backward_into_op(
    dy: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str, padding: str,
    stride: int, d_bias_out: Tensor | None, d_affine_out: Tensor | None, d_weight_out: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """As ``conv1x1_bn_stats_backward_into``: ``(dx, dW)``, the bias gradient Σ_p dy (the statistics' dtype) added
    into ``d_bias_out`` (given wherever there is a bias)."""


class _Conv3x3IntoBuffers(torch.autograd.Function):
    """``conv3x3_bn_stats(statistics=False)`` whose backward adds the prologue's gradients and dW into the caller's
    zeroed buffers (``conv1x1_bn_stats``'s ``_Conv1x1IntoBuffers``); a bias' gradient in a buffer of its own."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, activation, padding, stride, bias, prologue_grad, weight_grad):
        ctx.conv_args, ctx.bias_dtype = (activation, padding, stride), None if bias is None else bias.dtype
        ctx.bias_grad = dict(size=(weight.shape[0],), dtype=stats_dtype(x), device=x.device)  # (a zeroed buffer's)
        forward_args = (activation, padding, stride, bias, False)
        return into_buffers_forward(ctx, _conv3x3_op, forward_args, x, weight, scale, shift, prologue_grad,
                                    weight_grad)  # fmt: skip

    @staticmethod
    def backward(ctx, dy):
        d_bias = None
        if ctx.bias_dtype is not None:
            d_bias = torch.zeros(**ctx.bias_grad)
        grads = into_buffers_backward(ctx, _conv3x3_backward_into_op, (*ctx.conv_args, d_bias), dy)
        return *grads, None, None, None, None if d_bias is None else d_bias.to(ctx.bias_dtype), None, None


def _conv_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # None for an output without a gradient: zeros only where a kernel needs them
    x, weight, scale, shift, activation, padding, stride, bias = inputs[:8]  # (a trailing default may be left out)
    ctx.has_prologue, ctx.conv_args = scale is not None, (activation, padding, stride)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(output[0], x, weight, *((scale, shift) if scale is not None else ()))


def _conv_backward(ctx, dy, d_stats):
    y, x, weight, *affine = ctx.saved_tensors
    scale, shift = affine if ctx.has_prologue else (None, None)
    dy, d_sum, d_sumsq = fill_output_grads(dy, d_stats, y.shape, x)
    has_bias = ctx.bias_dtype is not None
    grads = _conv3x3_backward_op(dy, d_sum, d_sumsq, y, x, weight, scale, shift, *ctx.conv_args, has_bias)
    d_affine = grads[2].unbind() if ctx.has_prologue else (None, None)
    return *grads[:2], *d_affine, None, None, None, grads[-1].to(ctx.bias_dtype) if has_bias else None, None


_conv3x3_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def conv3x3_bn_stats(
    x: Tensor, weight: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, activation: str = "identity",
    padding: str = "torch", *, stride: int, bias: Tensor | None = None, statistics: bool = True,
    prologue_grad_buffer: Tensor | None = None, weight_grad_buffer: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """3×3 conv of ``act(scale·x + shift)`` (plus ``bias``) with BN statistics (see the module docstring);
    ``statistics=False`` (a conv whose BN uses running statistics, or one without BN) takes none: ``(y, None)``, and
    may take ``prologue_grad_buffer`` and ``weight_grad_buffer`` as ``conv1x1_bn_stats`` does."""
    check_conv3x3_args(x, weight, scale, shift, activation, padding, stride, bias)
    check_statistics_flag(statistics)
    if prologue_grad_buffer is not None or weight_grad_buffer is not None:
        check_buffers_without_statistics(statistics)
        check_grad_buffers(x, weight, scale, prologue_grad_buffer, weight_grad_buffer)
        y = _Conv3x3IntoBuffers.apply(x, weight, scale, shift, activation, padding, stride, bias, prologue_grad_buffer,
                                      weight_grad_buffer)  # fmt: skip
        return y, None
    y, stats = _conv3x3_op(x, weight, scale, shift, activation, padding, stride, bias, statistics)
    return y, stats if statistics else None
