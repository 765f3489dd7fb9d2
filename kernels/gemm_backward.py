"""What the convolutions' backward GEMMs share (``conv1x1_backward``, ``conv3x3_backward``).

Jitted pieces: the dgrad's dot of the folded output gradient (rounded once to the storage dtype), the
forward's operand a = act(scale·x + shift) recomputed, the wgrad's dot with it, and the dgrad's epilogue — the
prologue's backward d_pre = d_a·act'(scale·x + shift) with d_scale = Σ_p d_pre·x, d_shift = Σ_p d_pre added
atomically and dx = d_pre·scale. The launchers' buffers (:class:`BackwardBuffers`) and the wgrad's split of the
pixels (:func:`wgrad_split`).
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activation import activation_grad, apply_activation

MODELLED_SMS = 132  # an H100's or H200's SMs: the wgrad split where the kernels run on no GPU (interpreter, ledger)


@triton.jit
def grad_dot(acc, g, b, storage: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + g·b`` with fp32 ``g`` (the output gradient after BN's backward cancelled its statistics' part) rounded
    once to the ``storage`` dtype, as eager's BN backward rounds the gradient it hands its conv's dgrad."""
    return operand_dot(acc, g.to(storage), b.to(storage), FP32_DOT)


@triton.jit
def store_input_grad(acc, dx_ptr, dx_rows, sdx_c, x_ptr, x_rows, sx_c, scale_ptr, shift_ptr, dscale_ptr,
                     dshift_ptr, k, mask, C_IN, HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr):  # fmt: skip
    """Store dx for the (pixels × input channels ``k``) tile ``acc`` = d_a, through the prologue's backward where there
    is one (its d_scale, d_shift added to the zeroed fp32 buffers)."""
    if HAS_PROLOGUE:
        x = tl.load(x_ptr + x_rows[:, None] + k[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + k, mask=k < C_IN, other=0.0)[None, :]
        shift = tl.load(shift_ptr + k, mask=k < C_IN, other=0.0)[None, :]
        d_pre = tl.where(mask, acc * activation_grad(x * scale + shift, ACT), 0.0)
        tl.atomic_add(dscale_ptr + k, tl.sum(d_pre * x, axis=0), mask=k < C_IN)
        tl.atomic_add(dshift_ptr + k, tl.sum(d_pre, axis=0), mask=k < C_IN)
        acc = d_pre * scale
    tl.store(dx_ptr + dx_rows[:, None] + k[None, :] * sdx_c, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def wgrad_dot(acc, g, x_ptr, x_rows, k, sx_c, a_mask, scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE: tl.constexpr,
              ACT: tl.constexpr, FP32_DOT: tl.constexpr):  # fmt: skip
    """``acc + g·a`` for the wgrad, a = :func:`prologue_tile`, both operands rounded to x's dtype as the forward's
    were."""
    a = prologue_tile(x_ptr, x_rows, k, sx_c, a_mask, scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE, ACT)
    return operand_dot(acc, g.to(a.dtype), a, FP32_DOT)


@triton.jit
def prologue_tile(x_ptr, x_rows, k, sx_c, a_mask, scale_ptr, shift_ptr, C_IN, HAS_PROLOGUE: tl.constexpr,
                  ACT: tl.constexpr):  # fmt: skip
    """The forward GEMM's (pixels × input channels ``k``) operand a = act(scale·x + shift) recomputed from x at
    ``x_rows`` (x itself without a prologue; 0 outside ``a_mask``: padding after the prologue, as the forward pads its
    activated input), in x's dtype."""
    a = tl.load(x_ptr + x_rows[:, None] + k[None, :] * sx_c, mask=a_mask, other=0.0)
    if HAS_PROLOGUE:
        scale = tl.load(scale_ptr + k, mask=k < C_IN, other=0.0)
        shift = tl.load(shift_ptr + k, mask=k < C_IN, other=0.0)
        activated = apply_activation(a.to(tl.float32) * scale[None, :] + shift[None, :], ACT)
        a = tl.where(a_mask, activated, 0.0).to(a.dtype)
    return a


@triton.jit
def operand_dot(acc, a, b, FP32_DOT: tl.constexpr):
    """``acc + a·b`` of two operands in the storage dtype: tensor cores, or IEEE fp32 with ``FP32_DOT``."""
    if FP32_DOT:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a, b)


@dataclass
class BackwardBuffers:
    """The tensors a conv op's backward launch takes besides dy, x and W (unused pointers stand in for absent ones,
    never dereferenced): see :func:`backward_buffers`."""

    y: torch.Tensor  # the conv's output, or dy standing in where the statistics have no gradient (y not read)
    dx: torch.Tensor
    d_weight: torch.Tensor  # fp32, laid out as the weight, zeroed
    d_sum: torch.Tensor | None  # None: the statistics have no gradient
    d_sumsq: torch.Tensor | None
    d_scale: torch.Tensor
    d_shift: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    d_bn: torch.Tensor  # [dγ; dβ] (2, C_out) written by the dgrad, or a stand-in
    bn_args: tuple  # (γ, mean, var, count, eps), or stand-ins
    has_bn: bool
    d_affine: torch.Tensor | None
    returns_d_affine: bool
    returns_d_weight: bool

    def grads(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """``[dx, dW in W's dtype (an empty stand-in where the caller's buffer holds it), (d_affine), ([dγ; dβ])]``, as
        the launchers return them."""
        grads = [self.dx, self.d_weight.to(weight.dtype) if self.returns_d_weight else self.d_weight.new_empty(0)]
        grads += [self.d_affine] if self.returns_d_affine else []
        return grads + ([self.d_bn] if self.has_bn else [])


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """The wgrad's program count to aim for: about two waves of the device's SMs (``MODELLED_SMS`` off a GPU)."""
    if device.type != "cuda":
        return 2 * MODELLED_SMS
    return 2 * _multiprocessors(torch.cuda.current_device() if device.index is None else device.index)


def wgrad_split(pixels: int, tiles: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """``(chunks, pixels per chunk)``: the wgrad's reduction over ``pixels`` split so that its ``tiles`` weight tiles
    make about :func:`target_programs` programs on ``device``; chunks are whole ``block_k`` steps."""
    chunks = max(1, min(triton.cdiv(pixels, block_k), target_programs(device) // tiles))
    per_program = triton.cdiv(triton.cdiv(pixels, chunks), block_k) * block_k
    return triton.cdiv(pixels, per_program), per_program


def backward_buffers(dy, y, d_sum, d_sumsq, x, weight, scale, shift, bn, d_affine, d_weight,
                     input_grad: bool = True) -> BackwardBuffers:  # fmt: skip
    """Allocate and prepare the buffers of a conv op's backward (no launch but the fills of d_affine and dW where the
    caller gives none). ``bn`` = (γ, mean, var, count, eps): y's statistics were finalised into that BN and
    ``d_sum``/``d_sumsq`` are the gradients of its scale and shift (both None: the statistics have no gradient, and
    the kernels read neither them nor y, and dy stands in for y); ``d_affine``: a zeroed fp32 (2, C_in) buffer for
    the prologue's gradients (then not returned), or None; ``d_weight``: a zeroed fp32 buffer of the weight's shape,
    dense, or None (then dense with the weight's layout); ``input_grad`` False: dx is an empty (0, 0, 0, 0) stand-in
    (no dgrad programs)."""
    c_in = x.shape[1]
    has_prologue = scale is not None
    # (C,) vectors are addressed densely: an expanded gradient (stride 0) or a strided slice is compacted first.
    if d_sum is not None:
        d_sum, d_sumsq = d_sum.contiguous(), d_sumsq.contiguous()
    returns_d_weight = d_weight is None
    if returns_d_weight:
        dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
        d_weight = torch.zeros_like(weight, dtype=torch.float32, memory_format=torch.preserve_format if dense
                                    else torch.contiguous_format)  # fmt: skip
    dx = torch.empty_like(x, memory_format=torch.channels_last) if input_grad else x.new_empty((0, 0, 0, 0))
    returns_d_affine = has_prologue and d_affine is None
    if has_prologue:
        d_affine = torch.zeros((2, c_in), dtype=torch.float32, device=x.device) if d_affine is None else d_affine
        d_scale, d_shift = d_affine
        scale, shift = scale.contiguous(), shift.contiguous()
    else:  # unused pointers
        d_scale = d_shift = scale = shift = d_weight
    if bn is not None:
        gamma, mean, var, count, eps = bn
        gamma, mean, var = gamma.contiguous(), mean.contiguous(), var.contiguous()
        d_bn = torch.empty((2, weight.shape[0]), dtype=gamma.dtype, device=x.device)  # [dγ; dβ], by the dgrad
        bn_args = (gamma, mean, var, float(count), float(eps))
    else:  # unused pointers
        stand_in = d_weight if d_sum is None else d_sum
        d_bn, bn_args = stand_in.new_empty((2, 1)), (stand_in, stand_in, stand_in, 1.0, 1.0)
    y = dy if d_sum is None else y
    return BackwardBuffers(y, dx, d_weight, d_sum, d_sumsq, d_scale, d_shift, scale, shift, d_bn, bn_args,
                           bn is not None, d_affine, returns_d_affine, returns_d_weight)  # fmt: skip
