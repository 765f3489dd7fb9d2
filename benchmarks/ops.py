"""Suite ``ops``: every fused op on the shapes of SpineNet-49's L5 → L3 and L3 → L5 connections (640 px, batch 8),
and the RetinaNet loss over every anchor of that batch (76 725 anchors per image, 91 classes). The training-mode
conv + BN ops return ``(y, out_scale, out_shift)``, their eager twins the same from the batch statistics (so the
gradients cover the BN's statistics); ``expand_merge`` is the L5 → L3 connection's expand side (an upsampled and a
same-level parent) after the squeezes; ``conv1x1_bn_pair`` the first block's first conv and projection shortcut on the
stem's output (L2).

Providers: ``eager`` (the same maths as plain PyTorch in the storage dtype: materialised activation, upsampled
copies; for the loss, the head's eager loss: torchvision's ops image by image), ``compile`` (``torch.compile`` of
that function) and every backend of the op (``reference``, ``triton``, ``cuda``), forced with ``use_backend``.
Modes ``fwd``, ``bwd``, ``fwd+bwd``; bf16 and fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spinenet_fast.detection import SpineNetRetinaNetHead
from spinenet_fast.ops import (
    backends,
    bn_act_maxpool,
    bn_finalize,
    conv1x1_bn,
    conv1x1_bn_pair,
    conv1x1_bn_stats,
    conv3x3_bn,
    conv3x3_bn_stats,
    expand_merge,
    merge,
    pooled_conv1x1_bn,
    use_backend,
)

from ._harness import Row, Settings, autograd_modes, measure

BACKENDS = ("reference", "triton", "cuda")


@dataclass(frozen=True)
class OpCase:
    """One op on one shape: inputs, the op call and the eager equivalent (both return the tensor to backprop).
    ``registered``: the custom op whose backends the call is forced to (an op with a forward and a backward op
    registered apart: its forward's), where not ``name``."""

    name: str
    shape: str
    make_input: Callable[[], tuple]
    fused: Callable[..., object]
    eager: Callable[..., object]
    bytes_per_set: int
    registered: str | None = None

    def backends(self) -> tuple[str, ...]:
        """The backends the call can be forced to."""
        return backends.implemented(self.registered or self.name)


def _bn_apply(y, scale, shift):
    return y * scale.to(y.dtype).view(1, -1, 1, 1) + shift.to(y.dtype).view(1, -1, 1, 1)


def _affine_act(x, scale, shift):
    return F.silu(_bn_apply(x, scale, shift))


def _stats(y):
    y32 = y.float()
    return y, torch.stack([y32.sum((0, 2, 3)), (y32 * y32).sum((0, 2, 3))])


EPS = 1e-3


def _batch_bn(y, gamma, beta):
    """``(y, scale, shift)``: a training-mode BN of NCHW ``y`` as the affine of its batch statistics (fp32)."""
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    scale = gamma * torch.rsqrt(var + EPS)
    return y, scale, beta - mean * scale


def cases(s: Settings, dtype: torch.dtype) -> list[OpCase]:
    """The cases at full size, or tiny ones under ``--smoke``."""
    n, hi, lo = (1, 16, 4) if s.smoke else (8, 80, 20)  # L3 and L5 sides at 640 px
    c_mid, c_target = (8, 16) if s.smoke else (128, 512)  # squeezed and target widths
    c_in, l2 = (8, 8) if s.smoke else (64, 160)  # the first block's input: the stem's output at L2
    side3x3 = 8 if s.smoke else hi  # the 3×3 convs' input side (the Triton interpreter's slowest kernels)
    device = s.device

    def tensor(*shape, grad=True, nhwc=True):
        t = torch.randn(*shape, device=device, dtype=dtype if len(shape) == 4 else torch.float32)
        if len(shape) == 4 and nhwc:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    item = torch.finfo(dtype).bits // 8

    def conv1x1_inputs():
        return tensor(n, c_mid, lo, lo), tensor(c_target, c_mid, 1, 1), tensor(c_mid), tensor(c_mid)

    def conv3x3_inputs():
        c = c_mid // 2
        return tensor(n, c, side3x3, side3x3), tensor(c, c, 3, 3), tensor(c), tensor(c)

    def pool_inputs():
        return tensor(n, c_mid // 2, hi // 2, hi // 2), tensor(c_mid // 2), tensor(c_mid // 2)

    def merge_inputs():
        return (tensor(n, c_target, lo, lo), tensor(n, c_target, hi, hi), tensor(c_target), tensor(c_target),
                tensor(c_target), tensor(c_target))  # fmt: skip

    def conv_bn_inputs(make):
        """A conv's inputs (``make``) and its BN's γ, β."""
        x, w, a, b = make()
        return x, w, a, b, tensor(w.shape[0]), tensor(w.shape[0])

    def pooled_inputs():
        y, a, b = pool_inputs()
        return y, tensor(c_target, c_mid // 2, 1, 1), a, b, tensor(c_target), tensor(c_target)

    def expand_merge_inputs():
        """The squeezed L5 and L3 parents (raw, with their squeezes' BN affines), the expand weights, their BNs."""
        return (tensor(n, c_mid, lo, lo), tensor(n, c_mid, hi, hi), tensor(c_mid), tensor(c_mid), tensor(c_mid),
                tensor(c_mid), tensor(c_target, c_mid, 1, 1), tensor(c_target, c_mid, 1, 1), tensor(c_target),
                tensor(c_target), tensor(c_target), tensor(c_target))  # fmt: skip

    def expand_merge_fused(low, high, s0, s1, b0, b1, w0, w1, g0, g1, beta0, beta1):
        return expand_merge([low, high], [s0, s1], [b0, b1], [w0, w1], [4, 1], None, "swish", bn_weights=[g0, g1],
                            bn_biases=[beta0, beta1], eps=[EPS, EPS])  # fmt: skip

    def expand_merge_eager(low, high, s0, s1, b0, b1, w0, w1, g0, g1, beta0, beta1):
        z0 = _bn_apply(*_batch_bn(F.conv2d(_affine_act(low, s0, b0), w0), g0, beta0))
        z1 = _bn_apply(*_batch_bn(F.conv2d(_affine_act(high, s1, b1), w1), g1, beta1))
        return F.silu(F.interpolate(z0, scale_factor=4) + z1)

    def pair_inputs():
        """SpineNet-49's first block's input (the stem's output, L2) with its first conv's and projection shortcut's
        weights and BN affines."""
        return (tensor(n, c_in, l2, l2), tensor(c_in, c_in, 1, 1), tensor(4 * c_in, c_in, 1, 1), tensor(c_in),
                tensor(c_in), tensor(4 * c_in), tensor(4 * c_in))  # fmt: skip

    def pair_fused(x, w_a, w_b, g_a, beta_a, g_b, beta_b):
        return conv1x1_bn_pair(x, w_a, w_b, bn_a=dict(bn_weight=g_a, bn_bias=beta_a, eps=EPS),
                               bn_b=dict(bn_weight=g_b, bn_bias=beta_b, eps=EPS))  # fmt: skip

    def pair_eager(x, w_a, w_b, g_a, beta_a, g_b, beta_b):
        return (*_batch_bn(F.conv2d(x, w_a), g_a, beta_a), *_batch_bn(F.conv2d(x, w_b), g_b, beta_b))

    def finalize_inputs():
        y = torch.randn(n * lo * lo, c_target, device=device)
        return torch.stack([y.sum(0), (y * y).sum(0)]).requires_grad_(), tensor(c_target), tensor(c_target)

    def merge_eager(low, high, s0, s1, b0, b1):
        return F.silu(F.interpolate(_bn_apply(low, s0, b0), scale_factor=4) + _bn_apply(high, s1, b1))

    def finalize_eager(stats, weight, bias):
        mean = stats[0] / (n * lo * lo)
        scale = weight * torch.rsqrt((stats[1] / (n * lo * lo) - mean * mean).clamp_min(0) + EPS)
        return scale, bias - mean * scale

    def pool_eager(y, scale, shift):
        return F.max_pool2d(_affine_act(y, scale, shift), 3, 2, 1)

    anchors, classes, boxes = (64, 5, 3) if s.smoke else (76725, 91, 8)  # every anchor of a 640 px image, COCO

    def loss_inputs():
        logits = torch.randn(n, anchors, classes, device=device, dtype=dtype).requires_grad_()
        regression = (0.1 * torch.randn(n, anchors, 4, device=device, dtype=dtype)).requires_grad_()
        draw = torch.rand(n, anchors, device=device)  # ~1 % matched, ~4 % ignored, the rest background
        index = torch.randint(0, boxes, (n, anchors), device=device)
        matched = torch.where(draw < 0.01, index, torch.where(draw < 0.05, -2, -1))
        corners = torch.rand(n, boxes + anchors, 2, device=device) * 600
        corners = torch.cat([corners, corners + 40], -1)
        labels = torch.randint(0, classes, (n, boxes), device=device)
        return logits, regression, matched, labels, corners[:, :boxes], corners[:, boxes:]

    heads = {fused: SpineNetRetinaNetHead(8, 9, classes, num_convs=1, fused=fused) for fused in (False, True)}

    def head_loss(fused, logits, regression, matched, labels, gt_boxes, anchor_boxes):
        """The head's two losses: eager (torchvision's ops, image by image) or through the fused op."""
        outputs = {"cls_logits": logits, "bbox_regression": regression}
        if fused:
            losses = heads[True].loss_from_matches(outputs, anchor_boxes, matched, gt_boxes, labels)
        else:
            targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, labels)]
            losses = heads[False].compute_loss(targets, outputs, list(anchor_boxes), list(matched))
        return torch.stack([losses["classification"], losses["bbox_regression"]])

    return [
        OpCase("conv1x1_bn_stats", f"x {n}x{c_mid}x{lo}x{lo} -> {c_target}, prologue", conv1x1_inputs,
               lambda x, w, a, b: conv1x1_bn_stats(x, w, a, b, "swish"),
               lambda x, w, a, b: _stats(F.conv2d(_affine_act(x, a, b), w)), n * (c_mid + c_target) * lo * lo * item),
        OpCase("conv3x3_bn_stats", f"x {n}x{c_mid // 2}x{side3x3}x{side3x3}, prologue", conv3x3_inputs,
               lambda x, w, a, b: conv3x3_bn_stats(x, w, a, b, "swish", stride=2),
               lambda x, w, a, b: _stats(F.conv2d(_affine_act(x, a, b), w, stride=2, padding=1)),
               n * c_mid * side3x3 * side3x3 * item),
        OpCase("conv3x3_bn_stats", f"x {n}x{c_mid // 2}x{side3x3}x{side3x3}, stride 1, prologue", conv3x3_inputs,
               lambda x, w, a, b: conv3x3_bn_stats(x, w, a, b, "swish", stride=1),
               lambda x, w, a, b: _stats(F.conv2d(_affine_act(x, a, b), w, padding=1)),
               n * c_mid * side3x3 * side3x3 * item),  # a block's 3×3: the GEMM against cuDNN decides `auto`'s order
        OpCase("conv1x1_bn", f"x {n}x{c_mid}x{lo}x{lo} -> {c_target}, prologue, BN",
               functools.partial(conv_bn_inputs, conv1x1_inputs),
               lambda x, w, a, b, g, beta: conv1x1_bn(x, w, a, b, "swish", bn_weight=g, bn_bias=beta, eps=EPS),
               lambda x, w, a, b, g, beta: _batch_bn(F.conv2d(_affine_act(x, a, b), w), g, beta),
               n * (c_mid + c_target) * lo * lo * item, "conv1x1_bn_forward"),
        OpCase("conv1x1_bn_pair", f"x {n}x{c_in}x{l2}x{l2} -> {c_in} + {4 * c_in}, BN", pair_inputs, pair_fused,
               pair_eager, n * 6 * c_in * l2 * l2 * item, "conv1x1_bn_pair_backward"),
        OpCase("conv3x3_bn", f"x {n}x{c_mid // 2}x{side3x3}x{side3x3}, prologue, BN",
               functools.partial(conv_bn_inputs, conv3x3_inputs),
               lambda x, w, a, b, g, beta: conv3x3_bn(x, w, a, b, "swish", stride=2, bn_weight=g, bn_bias=beta,
                                                      eps=EPS),
               lambda x, w, a, b, g, beta: _batch_bn(F.conv2d(_affine_act(x, a, b), w, stride=2, padding=1), g, beta),
               n * c_mid * side3x3 * side3x3 * item, "conv3x3_bn_forward"),
        OpCase("pooled_conv1x1_bn", f"y {n}x{c_mid // 2}x{hi // 2}x{hi // 2}, 1 pool -> {c_target}, BN", pooled_inputs,
               lambda y, w, a, b, g, beta: pooled_conv1x1_bn(y, w, a, b, "swish", 1, bn_weight=g, bn_bias=beta,
                                                             eps=EPS),
               lambda y, w, a, b, g, beta: _batch_bn(F.conv2d(pool_eager(y, a, b), w), g, beta),
               n * (c_mid * hi * hi // 8 + c_target * hi * hi // 16) * item, "pooled_conv1x1_bn_forward"),
        OpCase("expand_merge", f"{n}x{c_mid} -> {c_target}: {lo}x{lo} x4 + {hi}x{hi}, BN", expand_merge_inputs,
               expand_merge_fused, expand_merge_eager, n * (c_mid * (lo * lo + hi * hi) + c_target * hi * hi) * item,
               "expand_merge_forward"),
        OpCase("bn_act_maxpool", f"y {n}x{c_mid // 2}x{hi // 2}x{hi // 2}, 1 pool", pool_inputs,
               lambda y, a, b: bn_act_maxpool(y, a, b, "swish", 1), pool_eager, n * c_mid * hi * hi // 4 * item),
        OpCase("merge", f"{n}x{c_target}: {lo}x{lo} x4 + {hi}x{hi}", merge_inputs,
               lambda low, high, s0, s1, b0, b1: merge([low, high], [s0, s1], [b0, b1], [4, 1], None, "swish"),
               merge_eager, 2 * n * c_target * hi * hi * item),
        OpCase("bn_finalize", f"C {c_target}", finalize_inputs,
               lambda stats, w, b: bn_finalize(stats, n * lo * lo, w, b, eps=EPS),
               finalize_eager, 4 * c_target * 4),
        OpCase("retinanet_loss", f"{n}x{anchors} anchors x {classes} classes", loss_inputs,
               functools.partial(head_loss, True), functools.partial(head_loss, False),
               n * anchors * ((classes + 4) * item + 8 + 16)),
    ]  # fmt: skip


def run(s: Settings, env: dict) -> Iterator[Row]:
    """Rows for every op × provider × mode × dtype (--smoke: bf16 only)."""
    for dtype in (torch.bfloat16,) if s.smoke else (torch.bfloat16, torch.float32):
        for case in cases(s, dtype):
            providers: list[tuple[str, Callable, str | None]] = [("eager", case.eager, None)]
            compiled = torch.compile(case.eager, backend="aot_eager" if s.smoke else "inductor")
            providers.append(("compile", compiled, None))
            providers += [(b, case.fused, b) for b in BACKENDS if b in case.backends()]
            for provider, fn, backend in providers:
                with use_backend(backend):
                    modes = autograd_modes(fn, case.make_input, case.bytes_per_set, s)
                    for mode, timed in modes.items():
                        yield measure(s, env, timed, bench=f"op {case.name}", provider=provider, mode=mode,
                                      dtype=dtype, shape=case.shape)  # fmt: skip
