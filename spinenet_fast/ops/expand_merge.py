"""``expand_merge``: a connection's expand 1×1 convs, their training-mode BNs and the merge as one op — the expand
outputs are never stored.

Equivalent to (per parent p; ``nn.BatchNorm2d`` in training mode, its running statistics updated)::

    a_p = act(scale_p·h_p + shift_p)            # the squeeze's BN + act (or a_p = h_p without a prologue)
    e_p = conv1x1(a_p, W_p)                      # at the parent's resolution
    out = act(Σ_p upsample(BN_p(e_p), ρ_p) + extra)

h_p: (N, C_h,p, H/ρ_p, W/ρ_p) in any memory format; W_p: (C, C_h,p, 1, 1); out: (N, C, H, W) channels_last. An
expand output e_p is C channels at its parent's resolution: storing it, reading it back in the merge and twice more
in the backward is what kept a connection at 2–3× its byte floor. Here:

- forward: one statistics-only GEMM per parent (Σe, Σe² of the fp32 accumulators; its last program finalizes the
  BN and updates the running statistics), then one GEMM over every parent's a (K = Σ C_h,p) that recomputes each
  e_p, applies its BN, gathers the upsampled parents' rows, adds ``extra`` and the activation;
- backward (BN's backward in closed form, no e or de stored): K1 recomputes z, stores dz = Σ grads·act'(z) once
  (also ``extra``'s gradient) and accumulates t = Σdz, k_p = Σ dz·ê_p, R_p = dzᵀa_p, Q_p = ê_pᵀa_p, s_p = Σa_p
  over the output's rows (an upsampled parent's rows gathered); then per parent a finalize: dγ_p = k_p, dβ_p = t,
  dW_p = (γ/σ)·(R_p − t s_pᵀ/M − (k_p/M)·Q_p) with M the output's rows, and the (C_h, C_h) matrix and row of
  da_p = Σ_ρ×ρ(dz)·diag(γ/σ)W_p + a_p·D_p + c_p, D_p = −W_pᵀ diag(γk/(σ²n)) W_p,
  c_p = (γ(kμ/σ − t)/(σn))ᵀ W_p (n: the BN's count, the parent's rows); then K2, that GEMM, with the squeeze's
  BN + act backward in its epilogue (d_scale, d_shift accumulated there).

The accumulators live in one zeroed fp32 workspace per call (:func:`workspace_size`, one fill per connection).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, op_spec
from .activation import ACTIVATIONS, activation_forward, activation_grad, stats_dtype
from .bn_finalize import check_bn_args, running_update_reference
from .checks import check_accumulator, describe
from .conv_common import CHANNELS_LAST, check_affine_prologue, prologue_backward, prologue_forward
from .merge import MAX_READERS, _block_sum, _upsample
from .op_spec import FUSED_FIRST, Backend
from .schema_types import FloatList, IntList, TensorList


class Workspace:
    """The slices of an ``expand_merge`` call's zeroed workspace (statistics dtype), in order: the shared
    [t; k_0; …] (1 + P, C); per parent its statistics [Σe; Σe²] (2, C), the finalize's counter (one element),
    [Σa; d_scale; d_shift] (3, C_h), R_p and Q_p (C, C_h) each."""

    def __init__(self, buffer: Tensor, channels: int, squeezed: list[int]) -> None:
        parents = len(squeezed)
        self.buffer, offset = buffer, (1 + parents) * channels
        self.sums = buffer[:offset].view(1 + parents, channels)
        self.stats, self.counters, self.vectors, self.r, self.q = [], [], [], [], []
        for c_h in squeezed:
            for target, shape in ((self.stats, (2, channels)), (self.counters, (1,)), (self.vectors, (3, c_h)),
                                  (self.r, (channels, c_h)), (self.q, (channels, c_h))):  # fmt: skip
                size = shape[0] * (shape[1] if len(shape) > 1 else 1)
                target.append(buffer[offset : offset + size].view(shape))
                offset += size
        self.counters = [c.view(torch.int32 if buffer.element_size() == 4 else torch.int64) for c in self.counters]


def workspace_size(channels: int, squeezed: list[int]) -> int:
    """Elements of the zeroed workspace of an ``expand_merge`` of ``channels`` output channels whose parents have
    ``squeezed`` channels (:class:`Workspace`)."""
    return (1 + len(squeezed)) * channels + sum(2 * channels + 1 + 3 * c + 2 * channels * c for c in squeezed)


def check_expand_merge_args(parents, scales, shifts, weights, ratios, extra, activation, bn_weights, bn_biases, eps,
                            running_means, running_vars, batches, momentums, workspace) -> None:  # fmt: skip
    """Raise ``TypeError``/``ValueError`` naming the argument unless these describe one ``expand_merge``."""
    if not isinstance(parents, (list, tuple)) or not parents or not all(isinstance(p, Tensor) for p in parents):
        raise TypeError(f"parents must be a non-empty list of tensors, got {describe(parents)}")
    count = len(parents)
    optional_lists = (("scales", scales), ("shifts", shifts), ("running_means", running_means),
                      ("running_vars", running_vars), ("batches", batches))  # fmt: skip
    for name, values in (("weights", weights), ("ratios", ratios), ("bn_weights", bn_weights),
                         ("bn_biases", bn_biases), ("eps", eps), ("momentums", momentums)):  # fmt: skip
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise ValueError(f"{name} must be a list with one entry per parent ({count}), got {values!r}")
    for name, values in optional_lists:
        if not isinstance(values, (list, tuple)) or len(values) not in (0, count):
            raise ValueError(f"{name} must be an empty list or one entry per parent ({count}), got {values!r}")
    if len(scales) != len(shifts) or len(running_means) != len(running_vars):
        raise ValueError("scales and shifts (running_means and running_vars) must be given together")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    first = parents[0]
    if first.dim() != 4 or not first.is_floating_point():
        raise TypeError(f"parents[0] must be a floating (N, C, H, W) tensor, got {describe(first)}")
    channels = weights[0].shape[0] if isinstance(weights[0], Tensor) else None
    target = None
    for i, (h, weight, ratio) in enumerate(zip(parents, weights, ratios)):
        if h.dim() != 4 or h.dtype != first.dtype or h.device != first.device:
            raise TypeError(f"parents[{i}] must be a 4-D {first.dtype} tensor on {first.device}, got {describe(h)}")
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"ratios[{i}] must be a positive int (the upsampling factor), got {ratio!r}")
        allowed = (first.dtype, torch.float32) if first.dtype in (torch.bfloat16, torch.float16) else (first.dtype,)
        if not (isinstance(weight, Tensor) and weight.shape == (channels, h.shape[1], 1, 1)
                and weight.dtype in allowed and weight.device == first.device):  # fmt: skip
            raise ValueError(f"weights[{i}] must be a ({channels}, {h.shape[1]}, 1, 1) tensor of {allowed} on "
                             f"{first.device}, got {describe(weight)}")  # fmt: skip
        if scales:
            check_affine_prologue(h, scales[i], shifts[i])
        shape = (h.shape[0], h.shape[2] * ratio, h.shape[3] * ratio)
        if target is not None and shape != target:
            raise ValueError(f"parents[{i}] upsampled ×{ratio} is (N, H, W) = {shape}, parents[0]'s is {target}")
        target = shape
        running = (running_means[i], running_vars[i]) if running_means else (None, None)
        check_bn_args(channels, first.device, h.shape[0] * h.shape[2] * h.shape[3], bn_weights[i], bn_biases[i],
                      eps[i], *running, batches[i] if batches else None, momentums[i], ratio,
                      channels_of=f"weights[{i}]")  # fmt: skip
    if extra is not None and not (isinstance(extra, Tensor) and extra.shape == (target[0], channels, *target[1:])
                                  and extra.dtype == first.dtype and extra.device == first.device):  # fmt: skip
        raise ValueError(f"extra must be None or a {first.dtype} {(target[0], channels, *target[1:])} tensor on "
                         f"{first.device}, got {describe(extra)}")  # fmt: skip
    size = workspace_size(channels, [h.shape[1] for h in parents])
    check_accumulator("workspace", workspace, (size,), stats_dtype(first), first.device)


def _bn_of(e: Tensor, weight, bias, eps):
    """(scale, shift, mean, var) of BN in training mode over e's (0, 2, 3)."""
    mean = e.mean((0, 2, 3))
    var = (e * e).mean((0, 2, 3)) - mean * mean
    scale = weight.to(e.dtype) * torch.rsqrt(var.clamp_min(0) + eps)
    return scale, bias.to(e.dtype) - mean * scale, mean, var.clamp_min(0)


def _expand(a: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """e = conv1x1(a, W) in the maths dtype, W rounded to x's dtype as the kernels load it."""
    return F.conv2d(a, weight.to(x.dtype).to(a.dtype))


def _vec(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def expand_merge_reference(parents, scales, shifts, weights, ratios, extra, activation, bn_weights, bn_biases, eps,
                           running_means, running_vars, batches, momentums, workspace) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Plain PyTorch (fp32 maths, float64 stays): ``(out, [mean; var] (P, 2, C))``; the statistics added into the
    workspace, the running statistics and batch counters updated."""
    ws = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents])
    pre, bn = 0, []
    for i, (h, weight, ratio) in enumerate(zip(parents, weights, ratios)):
        a = prologue_forward(h, scales[i] if scales else None, shifts[i] if shifts else None, activation)
        e = _expand(a, weight, h)
        ws.stats[i].add_(torch.stack([e.sum((0, 2, 3)), (e * e).sum((0, 2, 3))]))
        scale, shift, mean, var = _bn_of(e, bn_weights[i], bn_biases[i], eps[i])
        if running_means:
            n = e.numel() // e.shape[1] * ratio**2
            running_update_reference(running_means[i], running_vars[i], mean, var, momentums[i], n / (n - 1))
        if batches:
            batches[i].add_(1)
        pre = pre + _upsample(e * _vec(scale) + _vec(shift), ratio)
        bn.append(torch.stack([mean, var]))
    if extra is not None:
        pre = pre + extra.to(pre.dtype)
    out = activation_forward(pre, activation).to(parents[0].dtype).contiguous(memory_format=CHANNELS_LAST)
    return out, torch.stack(bn)


def expand_merge_backward_reference(grads, parents, scales, shifts, weights, ratios, extra, activation, bn_weights,
                                    bn_biases, bn, eps, workspace) -> list[Tensor]:  # fmt: skip
    """``[*dh_p, *dW_p, *[dγ_p; dβ_p], (d_extra)]`` in plain PyTorch, by the closed form the kernels compute (module
    docstring); each prologue's [d_scale; d_shift] added into the workspace (rows 1, 2 of its vectors)."""
    x0 = parents[0]
    dtype = stats_dtype(x0)
    ws = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents])
    prologues = [(scales[i], shifts[i]) if scales else (None, None) for i in range(len(parents))]
    activations = [prologue_forward(h, *prologue, activation) for h, prologue in zip(parents, prologues)]
    pre, normalised = 0, []
    for i, (a, h, weight, ratio) in enumerate(zip(activations, parents, weights, ratios)):
        mean, var = bn[i].to(dtype)
        inv_std = torch.rsqrt(var + eps[i])
        e_hat = _upsample((_expand(a, weight, h) - _vec(mean)) * _vec(inv_std), ratio)
        gamma = bn_weights[i].to(dtype)
        pre = pre + e_hat * _vec(gamma) + _vec(bn_biases[i].to(dtype))
        normalised.append(e_hat)
    if extra is not None:
        pre = pre + extra.to(dtype)
    dz = sum(g.to(dtype) for g in grads) * activation_grad(pre, activation)
    dz = dz.to(x0.dtype).to(dtype)  # stored once in the storage dtype: K2 reads it back
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    t = dz.sum((0, 2, 3))
    d_parents, d_weights, d_bns = [], [], []
    for i, (a, h, weight, ratio, e_hat) in enumerate(zip(activations, parents, weights, ratios, normalised)):
        a_up = rows(_upsample(a, ratio))
        k = (dz * e_hat).sum((0, 2, 3))
        r, q, s = rows(dz).t() @ a_up, rows(e_hat).t() @ a_up, a_up.sum(0)
        mean, var = bn[i].to(dtype)
        inv_std = torch.rsqrt(var + eps[i])
        gamma, w2d = bn_weights[i].to(dtype), weight.to(x0.dtype).to(dtype).view(weight.shape[:2])
        rows_out, count = a_up.shape[0], h.shape[0] * h.shape[2] * h.shape[3]
        d_w = (gamma * inv_std)[:, None] * (r - t[:, None] * s[None, :] / rows_out - (k / rows_out)[:, None] * q)
        d_matrix = -w2d.t() @ (w2d * (gamma * k * inv_std**2 / count)[:, None])
        c = (gamma * inv_std * (k * mean * inv_std - t) / count) @ w2d
        dzp = rows(_block_sum(dz, ratio))
        d_a = dzp @ ((gamma * inv_std)[:, None] * w2d) + rows(a) @ d_matrix + c
        d_a = d_a.view(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
        dh, *d_affine = prologue_backward(d_a, h, *prologues[i], activation)
        if d_affine:
            ws.vectors[i][1:].add_(torch.stack(d_affine))
        d_parents.append(dh)
        d_weights.append(d_w.view(weight.shape).to(weight.dtype))
        d_bns.append(torch.stack([k, t]).to(bn_weights[i].dtype))
    d_extra = [dz.to(x0.dtype).contiguous(memory_format=CHANNELS_LAST)] if extra is not None else []
    return [*d_parents, *d_weights, *d_bns, *d_extra]


def _triton_reasons(parents, scales, shifts, weights, *args) -> list[str]:
    reasons = backends.triton_reasons(*parents, *weights)
    if parents[0].dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {parents[0].dtype} is not one of {backends.FLOAT_DTYPES}")
    if len(parents) > 2:
        reasons.append(f"{len(parents)} parents: the kernels take one or two")
    return reasons


def _triton_backward_reasons(grads, parents, scales, shifts, weights, *args) -> list[str]:
    return _triton_reasons(parents, scales, shifts, weights) + backends.triton_reasons(*grads)


def _fake_forward(parents, scales, shifts, weights, ratios, extra, *args) -> tuple[Tensor, Tensor]:
    h = parents[0]
    shape = (h.shape[0], weights[0].shape[0], h.shape[2] * ratios[0], h.shape[3] * ratios[0])
    out = torch.empty(shape, dtype=h.dtype, device=h.device, memory_format=CHANNELS_LAST)
    return out, h.new_empty((len(parents), 2, shape[1]), dtype=stats_dtype(h))


def _fake_backward(grads, parents, scales, shifts, weights, ratios, extra, *args) -> list[Tensor]:
    dh = [torch.empty_like(h, memory_format=CHANNELS_LAST) for h in parents]
    d_bn = [w.new_empty((2, w.shape[0]), dtype=b.dtype) for w, b in zip(weights, args[1])]
    return [*dh, *(torch.empty_like(w) for w in weights), *d_bn, *([torch.empty_like(grads[0])] if extra is not None
                                                                    else [])]  # fmt: skip


def _triton_forward(*args):
    from spinenet_fast.kernels.expand_merge import expand_merge_forward

    return expand_merge_forward(*args)


def _triton_backward(*args):
    from spinenet_fast.kernels.expand_merge import expand_merge_backward

    return expand_merge_backward(*args)


@op_spec.custom_op(
    "expand_merge_forward",
    fake=_fake_forward,
    implementations={
        "reference": Backend(expand_merge_reference),
        # ATen's GEMMs (cuBLAS on a GPU) around the elementwise steps, as fused_ops.md §3 allows.
        "cuda": Backend(expand_merge_reference, lambda parents, *_: backends.library_reasons(parents[0])),
        "triton": Backend(_triton_forward, _triton_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("running_means", "running_vars", "batches", "workspace"),
)
def _forward_op(
    parents: TensorList, scales: TensorList, shifts: TensorList, weights: TensorList, ratios: IntList,
    extra: Tensor | None, activation: str, bn_weights: TensorList, bn_biases: TensorList, eps: FloatList,
    running_means: TensorList, running_vars: TensorList, batches: TensorList, momentums: FloatList, workspace: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(out, [mean; var] (P, 2, C))``: the statistics added into ``workspace``, running statistics updated."""


@op_spec.custom_op(
    "expand_merge_backward",
    fake=_fake_backward,
    implementations={
        "reference": Backend(expand_merge_backward_reference),
        "cuda": Backend(expand_merge_backward_reference, lambda grads, *_: backends.library_reasons(grads[0])),
        "triton": Backend(_triton_backward, _triton_backward_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("workspace",),
)
def _backward_op(
    grads: TensorList, parents: TensorList, scales: TensorList, shifts: TensorList, weights: TensorList,
    ratios: IntList, extra: Tensor | None, activation: str, bn_weights: TensorList, bn_biases: TensorList,
    bn: Tensor, eps: FloatList, workspace: Tensor,
) -> TensorList:  # fmt: skip
    """``[*dh_p, *dW_p, *[dγ_p; dβ_p], (d_extra)]`` for the output gradient Σ ``grads`` (one per reader); each
    prologue's [d_scale; d_shift] added into the workspace (the forward's, used once)."""


class _ExpandMerge(torch.autograd.Function):
    """The op returned once per reader: its gradients are summed as K1 loads them. Differentiable inputs flattened
    (parents, scales, shifts, weights, γ, β, extra), as a Function tracks only tensor arguments."""

    @staticmethod
    def forward(ctx, config, buffers, *tensors):
        readers, ratios, activation, eps, momentums, num_parents, has_prologue, has_extra = config
        running_means, running_vars, batches, workspace = buffers
        parts, rest = [], list(tensors)
        for size in (num_parents, num_parents * has_prologue, num_parents * has_prologue, num_parents, num_parents,
                     num_parents):  # fmt: skip
            parts.append(rest[:size])
            rest = rest[size:]
        parents, scales, shifts, weights, bn_weights, bn_biases = parts
        extra = rest[0] if has_extra else None
        out, bn = _forward_op(parents, scales, shifts, weights, list(ratios), extra, activation, bn_weights,
                              bn_biases, list(eps), running_means, running_vars, batches, list(momentums),
                              workspace)  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, bn)
        ctx.config, ctx.parts, ctx.workspace = config, [len(p) for p in parts], workspace
        return (out, *(out.view_as(out) for _ in range(readers - 1)))

    @staticmethod
    def backward(ctx, *grads):
        readers, ratios, activation, eps, _, num_parents, has_prologue, has_extra = ctx.config
        *tensors, bn = ctx.saved_tensors
        defined = [g for g in grads if g is not None]
        if not defined:
            return (None, None, *(None,) * len(tensors))
        parts, rest = [], tensors
        for size in ctx.parts:
            parts.append(list(rest[:size]))
            rest = rest[size:]
        parents, scales, shifts, weights, bn_weights, bn_biases = parts
        extra = rest[0] if has_extra else None
        workspace, ctx.workspace = ctx.workspace, None
        if workspace is None:  # a second backward (retain_graph): a fresh workspace
            workspace = torch.zeros(workspace_size(weights[0].shape[0], [h.shape[1] for h in parents]),
                                    dtype=bn.dtype, device=bn.device)  # fmt: skip
        outputs = _backward_op(defined, parents, scales, shifts, weights, list(ratios), extra, activation, bn_weights,
                               bn_biases, bn, list(eps), workspace)  # fmt: skip
        k = num_parents
        d_parents, d_weights, d_bns = outputs[:k], outputs[k : 2 * k], outputs[2 * k : 3 * k]
        vectors = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents]).vectors
        d_scales = [v[1] for v in vectors] if has_prologue else []
        d_shifts = [v[2] for v in vectors] if has_prologue else []
        d_extra = [outputs[3 * k]] if has_extra else []
        return (None, None, *d_parents, *d_scales, *d_shifts, *d_weights, *(d[0] for d in d_bns),
                *(d[1] for d in d_bns), *d_extra)  # fmt: skip


def expand_merge(
    parents: list[Tensor],
    scales: list[Tensor] | None,
    shifts: list[Tensor] | None,
    weights: list[Tensor],
    ratios: list[int],
    extra: Tensor | None = None,
    activation: str = "swish",
    *,
    bn_weights: list[Tensor],
    bn_biases: list[Tensor],
    eps: list[float],
    running_means: list[Tensor] | None = None,
    running_vars: list[Tensor] | None = None,
    num_batches_tracked: list[Tensor] | None = None,
    momentums: list[float] | None = None,
    readers: int = 1,
    workspace: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The connection's output once per reader (1 to ``MAX_READERS``; see the module docstring); checks arguments
    first. ``scales``/``shifts``: the prologue of every parent (the squeezes' BN affines, fp32 (C_h,p,)), or None for
    none. ``running_means``/``running_vars`` (both or neither) and ``num_batches_tracked``: per parent, updated as
    ``nn.BatchNorm2d`` does with ``momentums`` (the running variance unbiased with the upsampled count).
    ``workspace``: a zeroed contiguous (:func:`workspace_size`,) tensor of the statistics' dtype (a slice of a buffer
    several ops share); None: allocated here."""
    if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers must be an int in [1, {MAX_READERS}], got {readers!r}")
    count = len(parents) if isinstance(parents, (list, tuple)) else 0
    scales, shifts = list(scales or []), list(shifts or [])
    running_means, running_vars = list(running_means or []), list(running_vars or [])
    batches = list(num_batches_tracked or [])
    momentums = [0.1] * count if momentums is None else list(momentums)
    args = (list(parents), scales, shifts, list(weights), list(ratios), extra, activation, list(bn_weights),
            list(bn_biases), list(eps), running_means, running_vars, batches, momentums)  # fmt: skip
    if workspace is None and count and isinstance(parents[0], Tensor) and isinstance(weights[0], Tensor):
        workspace = torch.zeros(workspace_size(weights[0].shape[0], [h.shape[1] for h in parents]),
                                dtype=stats_dtype(parents[0]), device=parents[0].device)  # fmt: skip
    check_expand_merge_args(*args, workspace)
    ratios, eps, momentums = [int(r) for r in ratios], [float(e) for e in eps], [float(m) for m in momentums]
    config = (readers, tuple(ratios), activation, tuple(eps), tuple(momentums), count, bool(scales),
              extra is not None)  # fmt: skip
    tensors = [*parents, *scales, *shifts, *weights, *bn_weights, *bn_biases, *([extra] if extra is not None else [])]
    return _ExpandMerge.apply(config, (running_means, running_vars, batches, workspace), *tensors)
