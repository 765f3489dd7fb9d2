"""``expand_merge``: a connection's expand 1×1 convs, their training-mode BNs and the merge as one op — the expand
outputs are never stored.

Equivalent to (per parent p; ``nn.BatchNorm2d`` in training mode, its running statistics updated)::

    a_p = act(scale_p·h_p + shift_p)            # the squeeze's BN + act (or a_p = h_p without a prologue)
    a_p = maxpool3x3s2^L_p(a_p)                  # a downsampling parent's L_p = pools[p] max-pools (0: none)
    e_p = conv1x1(a_p, W_p)                      # at the parent's resolution
    out = act(Σ_p upsample(BN_p(e_p), ρ_p) + extra)

h_p: (N, C_h,p, 2^L_p·H/ρ_p, 2^L_p·W/ρ_p) in any memory format (a pooled parent: the raw output of its stride-2
conv, ρ_p = 1, ``padding`` the pools'); W_p: (C, C_h,p, 1, 1); out: (N, C, H, W) channels_last. An
expand output e_p is C channels at its parent's resolution: storing it, reading it back in the merge and twice more
in the backward is what kept a connection at 2–3× its byte floor. Here:

- forward: one statistics-only GEMM per parent (Σe, Σe² of the fp32 accumulators; its last program finalizes the
  BN and updates the running statistics; a pooled parent's prologue max-pools as it loads, its first output-channel
  tile storing the pooled a_p (C_h,p channels at the target's resolution) and its route for the backward, as
  ``pooled_conv1x1_bn``'s), then one GEMM over every parent's a (K = Σ C_h,p) that recomputes each
  e_p, applies its BN, gathers the upsampled parents' rows, adds ``extra`` and the activation;
- backward: K1 recomputes z, stores dz = Σ grads·act'(z) once (also ``extra``'s gradient; not at all where every
  parent is upsampled and nothing else needs it) and each upsampled parent's block sums Σ_ρ×ρ dz at its resolution,
  and accumulates each parent's t_p = Σdz and k_p = Σ dz·ê_p (dβ_p and dγ_p) over the output's rows; then K2 — one
  launch for the parents at the output's level (same-level and pooled: dz read once), one per upsampled parent (its
  block sums) —, at the parent's resolution, runs both GEMMs of BN's backward
  de_p = (γ/σ)(Σ_ρ×ρ dz − t_p/n − ê_p·k_p/n) (n: the BN's count, the parent's pixels): da_p = de_p·W_p, with the
  squeeze's BN + act backward in the epilogue (d_scale, d_shift accumulated there), and dW_p += de_pᵀa_p; a pooled
  parent's da_p (at the target's resolution) then goes through the max-pools' one-pass backward
  (``bn_act_maxpool_backward``: gathered through the route, the BN + act backward applied). No e or de is ever
  stored, and e is not recomputed either: the statistics' terms of de are linear in the centred expand input
  (ê_p·σ = (a_p − ā_p)·W_pᵀ), so their share of da_p is b_p + (a_p − ā_p)·M_p and of dW_p one C × C_h,p GEMM with
  the centred Gram (a_p − ā_p)ᵀ(a_p − ā_p), b_p and M_p = W_pᵀ·diag((γ/σ²)·k_p/n)·W_p formed once by K1's last
  programs (``kernels/expand_merge.py``). Centred, these terms keep the precision of the element-wise form, which
  the reference (the oracle) computes.

The accumulators live in one zeroed fp32 workspace per call, the float64 statistics viewed in it
(:func:`workspace_size`, one fill per connection).
"""

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, op_spec
from .activation import ACTIVATIONS, activation_forward, activation_grad, stats_dtype
from .bn_act_maxpool import check_pool_input
from .bn_finalize import (
    bn_finalize_reference,
    check_bn_args,
    check_stats_alignment,
    running_update_reference,
    stats_slots,
    take_stats,
)
from .checks import check_accumulator, describe
from .conv_common import CHANNELS_LAST, channel_sums, check_affine_prologue, prologue_backward, prologue_forward
from .merge import MAX_READERS, _block_sum, _upsample
from .op_spec import FUSED_FIRST, Backend
from .schema_types import FloatList, IntList, TensorList


def parent_scope(index: int):
    """A profiler range around one parent's share of the op's work (``expand_merge.parent<i>``): the profiler's
    trace and ``benchmarks.ledger`` attribute what runs inside to that parent."""
    return torch.profiler.record_function(f"expand_merge.parent{index}")


class Workspace:
    """The slices of an ``expand_merge`` call's zeroed workspace (the maths dtype), in order: [k_p; t_p] (P, 2, C);
    then per parent (with ``statistics``: its float64 statistics [Σe; Σe²] (2, C) (``take_stats``) and the
    finalize's counter (one element)), the prologue's [d_scale; d_shift] (2, C_h) and dW (C, C_h). With
    ``statistics`` then, per parent, the Triton backward's BN mean terms ``mean_terms`` [Σa (C_h); b (C_h);
    M (C_h, C_h); G (C_h, C_h)] (``kernels/expand_merge.py``) and ``tile_counters`` (C_h), and the merge's
    ``column_counters`` (C). Without ``statistics``: ``expand_merge_affine``'s (its maps are given)."""

    def __init__(self, buffer: Tensor, channels: int, squeezed: list[int], statistics: bool = True) -> None:
        parents = len(squeezed)
        offset = 2 * parents * channels
        self.sums = buffer[:offset].view(parents, 2, channels)
        self.stats, self.counters, self.affine_grads, self.weight_grads = [], [], [], []
        self.mean_terms, self.tile_counters = [], []
        for c_h in squeezed:
            if statistics:
                stats, offset = take_stats(buffer, offset, channels)
                self.stats.append(stats)
                self.counters.append(buffer[offset : offset + 1])
                offset += 1
            self.affine_grads.append(buffer[offset : offset + 2 * c_h].view(2, c_h))
            offset += 2 * c_h
            self.weight_grads.append(buffer[offset : offset + channels * c_h].view(channels, c_h))
            offset += channels * c_h
        as_int = torch.int32 if buffer.element_size() == 4 else torch.int64
        for c_h in squeezed if statistics else []:
            self.mean_terms.append(buffer[offset : offset + mean_terms_size(c_h)])
            offset += mean_terms_size(c_h)
            self.tile_counters.append(buffer[offset : offset + c_h].view(as_int))
            offset += c_h
        self.column_counters = buffer[offset : offset + channels].view(as_int) if statistics else None
        self.counters = [c.view(as_int) for c in self.counters]


def mean_terms_size(squeezed: int) -> int:
    """Elements of one parent's BN mean terms [Σa; b; M; G] (:class:`Workspace`)."""
    return 2 * squeezed + 2 * squeezed * squeezed


def workspace_size(channels: int, squeezed: list[int], dtype: torch.dtype, statistics: bool = True) -> int:
    """Elements of the zeroed ``dtype`` workspace of an ``expand_merge`` (without ``statistics``: an
    ``expand_merge_affine``) of ``channels`` output channels whose parents have ``squeezed`` channels
    (:class:`Workspace`)."""
    size = sum(2 * channels + 2 * c + channels * c for c in squeezed)
    if statistics:
        size += sum(stats_slots(channels, dtype) + 1 + mean_terms_size(c) + c for c in squeezed) + channels
    return size


class ExpandNorm(NamedTuple):
    """One parent's expand norm as the backward takes it: z's term scale·e + shift ((C,) each, the maths dtype);
    a BN with batch statistics (``expand_merge``) also its [mean; var] (2, C) ``stats``, ``eps`` and γ (``gain``); a
    given affine map (``expand_merge_affine``) no ``stats``, its ``gain`` the scale."""

    scale: Tensor
    shift: Tensor
    gain: Tensor
    stats: Tensor | None = None
    eps: float = 0.0


def batch_norms(bn: Tensor, bn_weights: list[Tensor], eps: list[float]) -> list[ExpandNorm]:
    """Each parent's BN from the forward's (P, 4, C) [scale; shift; mean; var] (views), γ and eps."""
    return [ExpandNorm(b[0], b[1], weight, b[2:], e) for b, weight, e in zip(bn, bn_weights, eps)]


def affine_norms(scales: list[Tensor], shifts: list[Tensor]) -> list[ExpandNorm]:
    """Each parent's given affine map (scale, shift)."""
    return [ExpandNorm(scale, shift, scale) for scale, shift in zip(scales, shifts)]


def check_expand_merge_args(parents, scales, shifts, weights, ratios, extra, activation, bn_weights, bn_biases, eps,
                            running_means, running_vars, batches, momentums, pools, padding,
                            workspace) -> None:  # fmt: skip
    """Raise ``TypeError``/``ValueError`` naming the argument unless these describe one ``expand_merge``."""
    count = check_parent_count(parents)
    per_parent = (("bn_weights", bn_weights), ("bn_biases", bn_biases), ("eps", eps), ("momentums", momentums))
    check_per_parent(count, per_parent, (("running_means", running_means), ("running_vars", running_vars),
                                         ("batches", batches)))  # fmt: skip
    if len(running_means) != len(running_vars):
        raise ValueError("running_means and running_vars must be given together")
    channels, sizes = check_connection_args(parents, scales, shifts, weights, ratios, extra, activation, pools, padding)
    first = parents[0]
    for i, (h, ratio, size) in enumerate(zip(parents, ratios, sizes)):
        running = (running_means[i], running_vars[i]) if len(running_means) > 0 else (None, None)
        check_bn_args(channels, first.device, h.shape[0] * size[0] * size[1], bn_weights[i], bn_biases[i],
                      eps[i], *running, batches[i] if len(batches) > 0 else None, momentums[i], ratio,
                      channels_of=f"weights[{i}]", count_of=partial("N·H·W of parents[{0}]'s expand output, for "
                      "parents[{0}] of shape {1}".format, i, tuple(h.shape)))  # fmt: skip
    size = workspace_size(channels, [h.shape[1] for h in parents], stats_dtype(first))
    check_accumulator("workspace", workspace, (size,), stats_dtype(first), first.device)
    check_stats_alignment("workspace", workspace)


def check_parent_count(parents) -> int:
    """The number of ``parents`` (one or two tensors: a connection's), or a ``TypeError``/``ValueError``."""
    if not isinstance(parents, (list, tuple)) or len(parents) == 0 or not all(isinstance(p, Tensor) for p in parents):
        raise TypeError(f"parents must be a non-empty list of tensors, got {describe(parents)}")
    if len(parents) > 2:
        raise ValueError(f"parents must hold one or two tensors (a connection's), got {len(parents)}")
    return len(parents)


def check_per_parent(count: int, required, optional=()) -> None:
    """Each ``(name, values)`` of ``required`` a list of ``count`` entries; of ``optional``, of none or ``count``."""
    for name, values in required:
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise ValueError(f"{name} must be a list with one entry per parent ({count}), got {values!r}")
    for name, values in optional:
        if not isinstance(values, (list, tuple)) or len(values) not in (0, count):
            raise ValueError(f"{name} must be an empty list or one entry per parent ({count}), got {values!r}")


def check_connection_args(parents, scales, shifts, weights, ratios, extra, activation, pools, padding
                          ) -> tuple[int, list[tuple[int, int]]]:  # fmt: skip
    """The checks an ``expand_merge`` shares with ``expand_merge_affine``: the parents (counted), their prologues,
    weights, ratios, max-pools and the extra input. Returns the output channels and each parent's expand input
    size (H, W) after its max-pools."""
    count = check_parent_count(parents)
    check_per_parent(count, (("weights", weights), ("ratios", ratios), ("pools", pools)),
                     (("scales", scales), ("shifts", shifts)))  # fmt: skip
    if len(scales) != len(shifts):
        raise ValueError("scales and shifts must be given together")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    first = parents[0]
    if first.dim() != 4 or not first.is_floating_point():
        raise TypeError(f"parents[0] must be a floating (N, C, H, W) tensor, got {describe(first)}")
    channels = weights[0].shape[0] if isinstance(weights[0], Tensor) else None
    target, sizes = None, []
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
        num_pools = pools[i]
        if isinstance(num_pools, bool) or not isinstance(num_pools, int) or num_pools < 0:
            raise ValueError(f"pools[{i}] must be an int ≥ 0 (the parent's max-pools), got {num_pools!r}")
        if len(scales) > 0 and not (isinstance(scales[i], Tensor) and isinstance(shifts[i], Tensor)):
            raise TypeError(f"scales[{i}] and shifts[{i}] must be tensors (None in the call: no prologue), got "
                            f"{describe(scales[i])} and {describe(shifts[i])}")  # fmt: skip
        scale, shift = prologue_of(scales, shifts, i)
        if len(scales) > 0 and (scales[i].numel() == 0) != (shifts[i].numel() == 0):
            raise ValueError(f"scales[{i}] and shifts[{i}] must both be given or both be absent, got "
                             f"{describe(scales[i])} and {describe(shifts[i])}")  # fmt: skip
        if num_pools:
            if scale is None or ratio != 1:
                raise ValueError(f"parents[{i}] has pools[{i}] = {num_pools} max-pools: it needs a prologue "
                                 f"(scales, shifts) and ratios[{i}] = 1, got scales={describe(scales)}, "
                                 f"ratio {ratio}")  # fmt: skip
            check_pool_input(f"parents[{i}]", h, scale, shift, activation, num_pools, padding)
        elif scale is not None:
            check_affine_prologue(h, scale, shift)
        size = (h.shape[2] >> num_pools, h.shape[3] >> num_pools)
        shape = (h.shape[0], size[0] * ratio, size[1] * ratio)
        if target is not None and shape != target:
            raise ValueError(f"parents[{i}] upsampled ×{ratio} is (N, H, W) = {shape}, parents[0]'s is {target}")
        target = shape
        sizes.append(size)
    if extra is not None and not (isinstance(extra, Tensor) and extra.shape == (target[0], channels, *target[1:])
                                  and extra.dtype == first.dtype and extra.device == first.device):  # fmt: skip
        raise ValueError(f"extra must be None or a {first.dtype} {(target[0], channels, *target[1:])} tensor on "
                         f"{first.device}, got {describe(extra)}")  # fmt: skip
    return channels, sizes


def _expand(a: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """e = conv1x1(a, W) in the maths dtype, W rounded to x's dtype as the kernels load it."""
    return F.conv2d(a, weight.to(x.dtype).to(a.dtype))


def _vec(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def prologue_of(scales: list[Tensor], shifts: list[Tensor], i: int) -> tuple[Tensor | None, Tensor | None]:
    """Parent i's prologue ``(scale, shift)``, or ``(None, None)`` where it has none: no scales at all, or empty
    stand-ins in its place (a connection whose other parent has one)."""
    if len(scales) == 0 or scales[i].numel() == 0:
        return None, None
    return scales[i], shifts[i]


def expand_inputs(parents, scales, shifts, pools, pooled) -> tuple[list[Tensor], list[tuple]]:
    """Each parent's expand input and its prologue ``(scale, shift)`` (``(None, None)``: none): a pooled parent's
    stored max-pools (its BN + act inside them), any other the parent with its scale and shift."""
    inputs, prologues = [], []
    for i, h in enumerate(parents):
        inputs.append(pooled[i] if pools[i] else h)
        prologues.append((None, None) if pools[i] else prologue_of(scales, shifts, i))
    return inputs, prologues


def pair(tensors: list[Tensor], like: Tensor) -> list[Tensor]:
    """A per-parent list as the ops' fixed two slots, fresh empty stand-ins after the parents (a custom op's outputs
    may not alias each other)."""
    return [*tensors, *[like.new_empty(0) for _ in range(2 - len(tensors))]]


def expand_merge_reference(
    parents,
    scales,
    shifts,
    weights,
    ratios,
    extra,
    activation,
    bn_weights,
    bn_biases,
    eps,
    running_means,
    running_vars,
    batches,
    momentums,
    pools,
    padding,
    workspace,
    *,
    pool_backend: str = "reference",
) -> tuple[Tensor, ...]:
    """Plain PyTorch (fp32 maths, float64 stays): ``(out, bn, pooled_0, pooled_1, route_0, route_1)``, bn = each
    parent's BN [scale; shift; mean; var] (P, 4, C), a pooled parent's max-pools (its dtype) and their route (int32),
    empty where a parent has none, pooled by ``pool_backend``'s ``bn_act_maxpool``; the statistics added into the
    workspace, the running statistics and batch counters updated."""
    ws = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents])
    pool = backends.implementation("bn_act_maxpool", pool_backend)
    empty = lambda: (parents[0].new_empty(0), parents[0].new_empty(0, dtype=torch.int32))  # noqa: E731
    pooled, routes = zip(*[pool(h, scales[i], shifts[i], activation, pools[i], padding, True) if pools[i] else empty()
                           for i, h in enumerate(parents)])  # fmt: skip
    inputs, prologues = expand_inputs(parents, scales, shifts, pools, pooled)
    terms, bn = [], []
    for i, (h, prologue, weight, ratio) in enumerate(zip(inputs, prologues, weights, ratios)):
        with parent_scope(i):
            a = prologue_forward(h, *prologue, activation)
            e = _expand(a, weight, h)
            sums = channel_sums(e, ws.stats[i].dtype)
            ws.stats[i].add_(sums)
            scale, shift, mean, var = bn_finalize_reference(sums, e.numel() // e.shape[1], bn_weights[i],
                                                            bn_biases[i], eps[i])  # fmt: skip
            if running_means:
                n = e.numel() // e.shape[1] * ratio**2
                running_update_reference(running_means[i], running_vars[i], mean, var, momentums[i], n / (n - 1))
            if batches:
                batches[i].add_(1)
        terms.append(e * _vec(scale) + _vec(shift))
        bn.append(torch.stack([scale, shift, mean, var]))
    out = merged_reference(terms, ratios, extra, activation, parents[0].dtype)
    return out, torch.stack(bn), *pair(list(pooled), out), *pair(list(routes), routes[0])


def merged_reference(terms: list[Tensor], ratios: list[int], extra: Tensor | None, activation: str,
                     dtype: torch.dtype) -> Tensor:  # fmt: skip
    """act(Σ_p upsample(terms[p], ratios[p]) (+ extra)) in the terms' (maths) dtype, returned in ``dtype``,
    channels_last: the merge both ``expand_merge`` references end with."""
    pre = 0
    for term, ratio in zip(terms, ratios):
        pre = pre + _upsample(term, ratio)
    if extra is not None:
        pre = pre + extra.to(pre.dtype)
    return activation_forward(pre, activation).to(dtype).contiguous(memory_format=CHANNELS_LAST)


def expand_merge_backward_reference(grads, parents, scales, shifts, weights, ratios, extra, activation, bn_weights,
                                    bn_biases, bn, eps, pools, padding, pooled, routes, workspace, *,
                                    pool_backend: str = "reference") -> list[Tensor]:  # fmt: skip
    """``[*dh_p, *dW_p, *[dγ_p; dβ_p], (d_extra)]`` in plain PyTorch, BN's backward element by element (the kernels
    regroup its statistics' terms: module docstring; :func:`connection_backward_reference`); each prologue's
    [d_scale; d_shift] added into the workspace, and dW_p too where the weight has the workspace's dtype (an empty
    stand-in returned). ``pooled``, ``routes``: the forward's; the max-pools' backward is ``pool_backend``'s
    ``bn_act_maxpool_backward``."""
    ws = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents])
    inputs, prologues = expand_inputs(parents, scales, shifts, pools, pooled)
    d_parents, d_weights, d_bns, d_extra = connection_backward_reference(
        grads, inputs, prologues, weights, ratios, extra, activation, batch_norms(bn, bn_weights, eps), ws
    )  # fmt: skip
    for i, num_pools in enumerate(pools):
        if num_pools:
            with parent_scope(i):
                pool_backward = backends.implementation("bn_act_maxpool_backward", pool_backend)
                d_parents[i], d_affine = pool_backward(d_parents[i], parents[i], routes[i], scales[i], shifts[i],
                                                       activation, num_pools, padding)  # fmt: skip
                ws.affine_grads[i].add_(d_affine)
    return [*d_parents, *d_weights, *d_bns, *d_extra]


def connection_backward_reference(grads, inputs, prologues, weights, ratios, extra, activation,
                                  norms: list[ExpandNorm], ws: Workspace) -> tuple:  # fmt: skip
    """The backward of act(Σ_p upsample(norm_p(conv1x1(act(scale_p·h_p + shift_p), W_p)), ρ_p) + extra) in plain
    PyTorch (the maths dtype; BN's backward element by element, e recomputed — the Triton kernels' statistics terms
    are this algebra regrouped), from each parent's expand input and prologue and its
    ``ExpandNorm`` (a BN with batch statistics, or a given affine map): ``(dh_p, dW_p, [k_p; t_p], [d_extra])``
    (k = Σ dz·ê, t = Σ dz: dγ, dβ of a BN, d_scale, d_shift of a map) — the prologues' [d_scale; d_shift] added into
    ``ws``, and dW_p too where the weight has the workspace's dtype (an empty stand-in returned)."""
    x0 = inputs[0]
    dtype = stats_dtype(x0)
    activations = [prologue_forward(h, *prologue, activation) for h, prologue in zip(inputs, prologues)]
    pre, normalised = 0, []
    for a, h, weight, ratio, norm in zip(activations, inputs, weights, ratios, norms):
        e = _expand(a, weight, h)  # the parent's resolution
        pre = pre + _upsample(e * _vec(norm.scale.to(dtype)) + _vec(norm.shift.to(dtype)), ratio)
        if norm.stats is not None:
            mean, var = norm.stats.to(dtype)
            e = (e - _vec(mean)) * _vec(torch.rsqrt(var + norm.eps))
        normalised.append(e)
    if extra is not None:
        pre = pre + extra.to(dtype)
    dz = sum(g.to(dtype) for g in grads) * activation_grad(pre, activation)
    dz = dz.to(x0.dtype).to(dtype)  # stored once in the storage dtype: K2 reads it back
    t = dz.sum((0, 2, 3))
    d_parents, d_weights, d_bns = [], [], []
    for i, (a, h, weight, ratio, e_hat) in enumerate(zip(activations, inputs, weights, ratios, normalised)):
        dh, d_w, d_bn = _parent_backward(i, dz, t, a, h, weight, ratio, e_hat, prologues[i], activation, norms[i], ws)
        d_parents.append(dh)
        if weight.dtype == ws.sums.dtype:  # left in the workspace, as the kernels leave it
            ws.weight_grads[i].add_(d_w)
            d_weights.append(d_w.new_empty(0))
        else:
            d_weights.append(d_w.reshape(weight.shape).to(weight.dtype))
        d_bns.append(d_bn)
    d_extra = [dz.to(x0.dtype).contiguous(memory_format=CHANNELS_LAST)] if extra is not None else []
    return d_parents, d_weights, d_bns, d_extra


def _parent_backward(i, dz, t, a, h, weight, ratio, e_hat, prologue, activation, norm: ExpandNorm, ws):
    """One parent's ``(dh, dW (C, C_h), [k; t])`` (K2's work, inside its profiler range); the prologue's gradients
    added into the workspace."""
    with parent_scope(i):
        dtype = dz.dtype
        dz_parent = _block_sum(dz, ratio)
        k = (dz_parent * e_hat).sum((0, 2, 3))
        if ratio > 1:  # K1 stores the block sums in the storage dtype (as eager's upsampling backward rounds them)
            dz_parent = dz_parent.to(h.dtype).to(dtype)
        if norm.stats is not None:  # BN's backward; the cancellation where eager's has it
            count = h.shape[0] * h.shape[2] * h.shape[3]
            gain = norm.gain.to(dtype) * torch.rsqrt(norm.stats[1].to(dtype) + norm.eps)
            d_e = _vec(gain) * (dz_parent - _vec(t / count) - e_hat * _vec(k / count))
        else:
            d_e = _vec(norm.gain.to(dtype)) * dz_parent
        w2d = weight.to(h.dtype).to(dtype).view(weight.shape[:2])
        dh, *d_affine = prologue_backward(F.conv2d(d_e, w2d.t()[:, :, None, None]), h, *prologue, activation)
        if d_affine:
            ws.affine_grads[i].add_(torch.stack(d_affine))
        return dh, torch.einsum("nohw,nkhw->ok", d_e, a), torch.stack([k, t]).to(norm.gain.dtype)


def _triton_reasons(parents, scales, shifts, weights, *args) -> list[str]:
    reasons = backends.triton_reasons(*parents, *weights)
    if parents[0].dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {parents[0].dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


def _triton_backward_reasons(grads, parents, scales, shifts, weights, *args) -> list[str]:
    return _triton_reasons(parents, scales, shifts, weights) + backends.triton_reasons(*grads)


def _fake_forward(parents, scales, shifts, weights, ratios, extra, *args) -> tuple[Tensor, ...]:
    pools = args[-3]
    h = parents[0]
    height, width = (h.shape[2] >> pools[0]) * ratios[0], (h.shape[3] >> pools[0]) * ratios[0]
    shape = (h.shape[0], weights[0].shape[0], height, width)
    out = torch.empty(shape, dtype=h.dtype, device=h.device, memory_format=CHANNELS_LAST)
    pooled, routes = [], []
    for h, num_pools in zip(parents, pools):
        size = (h.shape[0], h.shape[1], h.shape[2] >> num_pools, h.shape[3] >> num_pools) if num_pools else (0,)
        layout = CHANNELS_LAST if num_pools else torch.contiguous_format
        pooled.append(torch.empty(size, dtype=h.dtype, device=h.device, memory_format=layout))
        routes.append(torch.empty(size, dtype=torch.int32, device=h.device, memory_format=layout))
    bn = h.new_empty((len(parents), 4, shape[1]), dtype=stats_dtype(h))
    return out, bn, *pair(pooled, out), *pair(routes, routes[0])


def _fake_backward(grads, parents, scales, shifts, weights, ratios, extra, *args) -> tuple[Tensor, ...]:
    dh = [torch.empty_like(h, memory_format=CHANNELS_LAST) for h in parents]
    d_bn = [w.new_empty((2, w.shape[0]), dtype=b.dtype) for w, b in zip(weights, args[1])]
    workspace = args[-1]
    d_weights = [w.new_empty(0) if w.dtype == workspace.dtype else torch.empty_like(w) for w in weights]
    d_extra = [torch.empty_like(grads[0], memory_format=CHANNELS_LAST)] if extra is not None else []
    return _padded([*dh, *d_weights, *d_bn, *d_extra], len(parents))


def _padded(outputs: list[Tensor], num_parents: int) -> tuple[Tensor, ...]:
    """A backward's ``[*dh_p, *dW_p, *d_bn_p, (d_extra)]`` as the op's fixed (dh_0, dh_1, dW_0, dW_1, d_bn_0, d_bn_1,
    d_extra), empty stand-ins where a second parent or the extra input is absent."""
    empty = outputs[0].new_empty  # a fresh stand-in per slot: a custom op's outputs may not alias each other
    groups = [outputs[k * num_parents : (k + 1) * num_parents] for k in range(3)]
    padded = [t for group in groups for t in (*group, *[empty(0) for _ in range(2 - num_parents)])]
    return (*padded, outputs[3 * num_parents] if len(outputs) > 3 * num_parents else empty(0))


def _aten_reasons(parents, scales, shifts, activation, pools, padding) -> list[str]:
    """The ``cuda`` backend: ATen's GEMMs, and the extension's max-pools for a pooled parent."""
    reasons = backends.library_reasons(parents[0])
    for i, h in enumerate(parents):
        if pools[i]:
            reasons += backends.reasons_by_backend("bn_act_maxpool", h, scales[i], shifts[i], activation, pools[i],
                                                   padding, True)["cuda"]  # fmt: skip
    return reasons


def _aten_forward_reasons(parents, scales, shifts, weights, ratios, extra, activation, *args) -> list[str]:
    return _aten_reasons(parents, scales, shifts, activation, *args[-3:-1])  # (..., pools, padding, workspace)


def _aten_backward_reasons(grads, parents, scales, shifts, weights, ratios, extra, activation, *args) -> list[str]:
    return _aten_reasons(parents, scales, shifts, activation, *args[-5:-3])  # (..., pools, padding, pooled, ...)


def _forward_on(backend: str):
    return lambda *args: expand_merge_reference(*args, pool_backend=backend)


def _backward_on(backend: str):
    return lambda *args: _padded(expand_merge_backward_reference(*args, pool_backend=backend), len(args[1]))


def _triton_forward(*args):
    from spinenet_fast.kernels.expand_merge import expand_merge_forward

    return expand_merge_forward(*args)


def _triton_backward(*args):
    from spinenet_fast.kernels.expand_merge import expand_merge_backward

    return _padded(expand_merge_backward(*args), len(args[1]))


@op_spec.custom_op(
    "expand_merge_forward",
    fake=_fake_forward,
    implementations={
        "reference": Backend(expand_merge_reference),
        # ATen's GEMMs (cuBLAS on a GPU) around the elementwise steps, as fused_ops.md §3 allows; the extension's
        # one-pass max-pools.
        "cuda": Backend(_forward_on("cuda"), _aten_forward_reasons),
        "triton": Backend(_triton_forward, _triton_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("running_means", "running_vars", "batches", "workspace"),
)
def _forward_op(
    parents: TensorList, scales: TensorList, shifts: TensorList, weights: TensorList, ratios: IntList,
    extra: Tensor | None, activation: str, bn_weights: TensorList, bn_biases: TensorList, eps: FloatList,
    running_means: TensorList, running_vars: TensorList, batches: TensorList, momentums: FloatList, pools: IntList,
    padding: str, workspace: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(out, [scale; shift; mean; var] (P, 4, C), pooled_0, pooled_1, route_0, route_1)`` (a pooled parent's
    max-pools and route, the backward's; empty for the others): the statistics added into ``workspace``, the running
    statistics updated."""


@op_spec.custom_op(
    "expand_merge_backward",
    fake=_fake_backward,
    implementations={
        "reference": Backend(_backward_on("reference")),
        "cuda": Backend(_backward_on("cuda"), _aten_backward_reasons),
        "triton": Backend(_triton_backward, _triton_backward_reasons),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("workspace",),
)
def _backward_op(
    grads: TensorList, parents: TensorList, scales: TensorList, shifts: TensorList, weights: TensorList,
    ratios: IntList, extra: Tensor | None, activation: str, bn_weights: TensorList, bn_biases: TensorList,
    bn: Tensor, eps: FloatList, pools: IntList, padding: str, pooled: TensorList, routes: TensorList,
    workspace: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dh_0, dh_1, dW_0, dW_1, [dγ_0; dβ_0], [dγ_1; dβ_1], d_extra)`` (empty where absent: ``_padded``) for the
    output gradient Σ ``grads`` (one per reader); each
    prologue's [d_scale; d_shift] added into the workspace (the forward's, used once), and each dW_p of a weight of
    the workspace's dtype (an empty stand-in returned)."""


def input_sizes(num_parents: int, has_prologue: bool) -> list[int]:
    """The lengths of a connection Function's flattened differentiable inputs, in order: parents, scales, shifts,
    weights, and the norms' two vectors (γ, β; a map's scale, shift); the extra input follows where given."""
    prologues = num_parents * has_prologue
    return [num_parents, prologues, prologues, num_parents, num_parents, num_parents]


def split_inputs(tensors, sizes: list[int]) -> tuple[list[list[Tensor]], Tensor | None]:
    """Flattened inputs cut into lists of ``sizes`` (:func:`input_sizes`), and the extra input (None without)."""
    parts, rest = [], list(tensors)
    for size in sizes:
        parts.append(rest[:size])
        rest = rest[size:]
    return parts, (rest[0] if rest else None)


def input_gradients(outputs, ws: Workspace, weights: list[Tensor], scales: list[Tensor], has_extra: bool) -> tuple:
    """A connection Function's input gradients in its flattened order from its backward op's padded outputs
    (``_padded``) and workspace ``ws``: dh_p; the prologues' d_scale_p, d_shift_p (the workspace's; None for a parent
    without one); dW_p (the workspace's where the op left it there); each norm's first and second vector's (k_p, t_p);
    the extra input's."""
    k = len(weights)
    d_parents, d_weights, d_norms = outputs[0:k], outputs[2 : 2 + k], outputs[4 : 4 + k]
    d_weights = [g.view(w.shape) if d.numel() == 0 else d for g, w, d in zip(ws.weight_grads, weights, d_weights)]
    present = [scale.numel() > 0 for scale in scales]  # a parent without a prologue: empty stand-ins
    d_scales = [g[0] if p else None for g, p in zip(ws.affine_grads, present)]
    d_shifts = [g[1] if p else None for g, p in zip(ws.affine_grads, present)]
    d_extra = [outputs[6]] if has_extra else []
    return (*d_parents, *d_scales, *d_shifts, *d_weights, *(d[0] for d in d_norms), *(d[1] for d in d_norms),
            *d_extra)  # fmt: skip


class _ExpandMerge(torch.autograd.Function):
    """The op returned once per reader: its gradients are summed as K1 loads them. Differentiable inputs flattened
    (parents, scales, shifts, weights, γ, β, extra), as a Function tracks only tensor arguments."""

    @staticmethod
    def forward(ctx, config, buffers, *tensors):
        readers, ratios, activation, eps, momentums, num_parents, has_prologue, _, pools, padding = config
        running_means, running_vars, batches, workspace = buffers
        sizes = input_sizes(num_parents, has_prologue)
        (parents, scales, shifts, weights, bn_weights, bn_biases), extra = split_inputs(tensors, sizes)
        out, bn, *pooled = _forward_op(parents, scales, shifts, weights, list(ratios), extra, activation, bn_weights,
                                       bn_biases, list(eps), running_means, running_vars, batches, list(momentums),
                                       list(pools), padding, workspace)  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, bn, *pooled)
        ctx.config, ctx.sizes, ctx.workspace = config, sizes, workspace
        return (out, *(out.view_as(out) for _ in range(readers - 1)))

    @staticmethod
    def backward(ctx, *grads):
        _, ratios, activation, eps, _, num_parents, _, has_extra, pools, padding = ctx.config
        *tensors, bn, pooled_0, pooled_1, route_0, route_1 = ctx.saved_tensors
        defined = [g for g in grads if g is not None]
        if not defined:
            return (None, None, *(None,) * len(tensors))
        (parents, scales, shifts, weights, bn_weights, bn_biases), extra = split_inputs(tensors, ctx.sizes)
        squeezed = [h.shape[1] for h in parents]
        workspace, ctx.workspace = ctx.workspace, None
        if workspace is None:  # a second backward (retain_graph): fresh accumulators
            workspace = torch.zeros(workspace_size(weights[0].shape[0], squeezed, bn.dtype), dtype=bn.dtype,
                                    device=bn.device)  # fmt: skip
        outputs = _backward_op(defined, parents, scales, shifts, weights, list(ratios), extra, activation, bn_weights,
                               bn_biases, bn, list(eps), list(pools), padding, [pooled_0, pooled_1][:num_parents],
                               [route_0, route_1][:num_parents], workspace)  # fmt: skip
        ws = Workspace(workspace, weights[0].shape[0], squeezed)
        return (None, None, *input_gradients(outputs, ws, weights, scales, has_extra))


def prologue_lists(vectors: list[Tensor | None] | None) -> list:
    """The op's per-parent ``scales`` (or ``shifts``) list: [] where no parent has a prologue, else one entry per
    parent, an empty stand-in in place of a None (that parent has none: ``prologue_of``)."""
    vectors = [] if vectors is None else list(vectors)
    tensors = [v for v in vectors if isinstance(v, Tensor)]  # (no next(..., default): torch.compile < 2.7 lacks it)
    if len(tensors) == 0:
        return vectors if len([v for v in vectors if v is not None]) > 0 else []  # (bad entries: for the checks)
    return [tensors[0].new_empty(0) if v is None else v for v in vectors]


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
    pools: list[int] | None = None,
    padding: str = "torch",
    readers: int = 1,
    workspace: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The connection's output once per reader (1 to ``MAX_READERS``; see the module docstring); checks arguments
    first. ``scales``/``shifts``: each parent's prologue (the squeezes' BN affines, fp32 (C_h,p,)), None in a
    parent's place for none (SpineNet-Mobile's same-level and upsampled parents), or None for no parent.
    ``running_means``/``running_vars`` (both or neither) and ``num_batches_tracked``: per parent, updated as
    ``nn.BatchNorm2d`` does with ``momentums`` (the running variance unbiased with the upsampled count).
    ``pools``: per parent its 3×3/s2 max-pools after the prologue (None: none), padded as ``padding`` says
    (``"torch"`` or ``"tf_same"``).
    ``workspace``: a zeroed contiguous (:func:`workspace_size`,) tensor of the statistics' dtype (a slice of a buffer
    several ops share); None: allocated here."""
    if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers must be an int in [1, {MAX_READERS}], got {readers!r}")
    count = len(parents) if isinstance(parents, (list, tuple)) else 0
    # (explicit None tests, not truthiness: torch.compile < 2.7 cannot take bool() of a list)
    scales, shifts = prologue_lists(scales), prologue_lists(shifts)
    running_means = [] if running_means is None else list(running_means)
    running_vars = [] if running_vars is None else list(running_vars)
    batches = [] if num_batches_tracked is None else list(num_batches_tracked)
    momentums = [0.1] * count if momentums is None else list(momentums)
    pools = [0] * count if pools is None else list(pools)
    args = (list(parents), scales, shifts, list(weights), list(ratios), extra, activation, list(bn_weights),
            list(bn_biases), list(eps), running_means, running_vars, batches, momentums, pools, padding)  # fmt: skip
    if workspace is None and count and isinstance(parents[0], Tensor) and isinstance(weights[0], Tensor):
        dtype = stats_dtype(parents[0])
        workspace = torch.zeros(workspace_size(weights[0].shape[0], [h.shape[1] for h in parents], dtype), dtype=dtype,
                                device=parents[0].device)  # fmt: skip
    check_expand_merge_args(*args, workspace)
    ratios, eps, momentums = [int(r) for r in ratios], [float(e) for e in eps], [float(m) for m in momentums]
    config = (readers, tuple(ratios), activation, tuple(eps), tuple(momentums), count, len(scales) > 0,
              extra is not None, tuple(pools), padding)  # fmt: skip
    tensors = [*parents, *scales, *shifts, *weights, *bn_weights, *bn_biases, *([extra] if extra is not None else [])]
    return _ExpandMerge.apply(config, (running_means, running_vars, batches, workspace), *tensors)
