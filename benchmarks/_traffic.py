"""The ledger's memory-traffic and FLOP model of one launch, and the byte floor of a cross-scale connection.

Bytes: every tensor a launch takes or returns is read or written once, whole (views by their own elements, broadcast
dimensions once; a launch running two GEMMs side by side counts the operands both read twice, ``READ_BY_BOTH``).
That is the traffic of a kernel whose tiles stay on chip or in L2 — a floor per launch, not a measurement: re-reads
of operand tiles that miss L2 are not modelled. Triton kernels: their tensor arguments; ATen ops: arguments and
results, one kernel each (``aten_kernels``), except ``convolution_backward``, which runs its input gradient (dgrad),
weight gradient (wgrad) and bias gradient as separate kernels on a GPU (cuDNN's, or cuBLAS's GEMMs), each reading
the output gradient; the extension: its op's arguments and results (buffers inside it are not seen). FLOPs: the
multiply-adds of convolutions and matrix products (2 per MAC), from PyTorch's own formulas for ATen ops and from the
problem sizes of our GEMM kernels; elementwise work is not counted."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast, stride-0, dimension counted once)."""
    elements = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elements * t.element_size()


def tensors_bytes(*trees) -> int:
    """Total :func:`tensor_bytes` of the tensors in nested arguments (each tensor object once)."""
    seen, total = set(), 0
    for leaf in tree_leaves(list(trees)):
        if isinstance(leaf, torch.Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            total += tensor_bytes(leaf)
    return total


def aten_flops(func, args, kwargs, out) -> int:
    """PyTorch's FLOP formula for ``func`` (convolutions, matrix products and their backwards), else 0."""
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def aten_kernels(op: str, func, args, kwargs, out) -> list[tuple[str, int, int]]:
    """The GPU kernels of one ATen op as ``(name, bytes, flops)``: the op itself, or ``convolution_backward``'s
    dgrad (grad_output, weight -> grad_input), wgrad (grad_output, input -> grad_weight) and bias gradient
    (grad_output -> grad_bias), those its ``output_mask`` asks for."""
    flops = aten_flops(func, args, kwargs, out)
    if op != "convolution_backward":
        return [(op, tensors_bytes(args, kwargs) + tensors_bytes(out), flops)]
    grad_output, input_, weight = args[:3]
    mask = kwargs.get("output_mask", args[10] if len(args) > 10 else None)
    grad_input, grad_weight, grad_bias = out
    gemm_flops = flops // max(1, int(mask[0]) + int(mask[1]))  # dgrad and wgrad: the forward's MACs each
    kernels = [
        ("convolution_backward dgrad", tensors_bytes(grad_output, weight, grad_input), gemm_flops),
        ("convolution_backward wgrad", tensors_bytes(grad_output, input_, grad_weight), gemm_flops),
        ("convolution_backward bias", tensors_bytes(grad_output, grad_bias), 0),
    ]
    return [kernel for kernel, wanted in zip(kernels, mask) if wanted]


def _parent_widths(a: dict) -> list[int]:
    """The squeezed widths of the parents an ``expand_merge`` launch covers (its merge, K1, one K2)."""
    return [a["K0"], a["K1"]][: a["NUM_PARENTS"]]


def _k2_atomics(a: dict, k: int) -> int:
    """fp32 elements one parent of squeezed width k adds in an ``_expand_k2_kernel`` launch."""
    tiles = -(-a["P"] // a["BLOCK_M"])
    return a["C"] * k * tiles + ((k * k * tiles + a["C"] * k) if a["BATCH_STATS"] else 0)


def _gemm(m: int, n: int, k: int, passes: int = 1) -> int:
    return 2 * m * n * k * passes


def _backward_gemms(taps: int):
    """FLOPs of a conv's backward launch: its dgrad (none where the launch has no dgrad tiles, an input without a
    gradient) and its wgrad, each recomputing the forward's GEMM where the launch recomputes y (``RECOMPUTE_Y``)."""
    return lambda a: (
        (_gemm(a["P"], a["C_IN"], taps * a["C_OUT"]) if a.get("DGRAD_TILES", 1) else 0)
        + _gemm(taps * a["C_OUT"], a["C_IN"], a["P"])
        + (2 * _gemm(a["P"], a["C_OUT"], a["C_IN"]) if a.get("RECOMPUTE_Y") else 0)
    )


# Our GEMM kernels' FLOPs from their named launch arguments.
TRITON_FLOPS = {
    "_conv1x1_fwd_kernel": lambda a: _gemm(a["P"], a["N_OUT"], a["K"]),
    "_conv3x3_fwd_kernel": lambda a: _gemm(a["P"], a["N_OUT"], a["KSIZE"] ** 2 * a["C_IN"]),  # 3×3, or the stem's 7×7
    "_conv1x1_backward_kernel": _backward_gemms(1),
    "_conv3x3_backward_kernel": lambda a: _backward_gemms(a["KSIZE"] ** 2)(a),
    # two 1×1 convs of one x: both dgrads into one accumulator, both wgrads
    "_conv1x1_pair_backward_kernel": lambda a: sum(_backward_gemms(1)(a | {"C_OUT": a[c]}) for c in ("C_A", "C_B")),
    # the head's tower and predictor convs, every level in one launch (N·S pixels)
    "_conv3x3_levels_fwd_kernel": lambda a: _gemm(a["N"] * a["S"], a["N_OUT"], 9 * a["C_IN"]),
    "_conv3x3_levels_backward_kernel": lambda a: _backward_gemms(9)(a | {"P": a["N"] * a["S"]}),
    # expand_merge: the expand GEMMs recomputed — the statistics pass, the merge and K1 over every parent (K1 with
    # batch statistics also M = Wᵀ·diag(q)·W per parent) — and K2: per parent it covers, s·W and sᵀa, and with batch
    # statistics the mean terms (a − ā)·M and the Gram (a − ā)ᵀ(a − ā), then W·G once
    "_expand_stats_kernel": lambda a: _gemm(a["P"], a["C"], a["K"]),
    "_expand_merge_fwd_kernel": lambda a: _gemm(a["P"], a["C"], sum(_parent_widths(a))),
    "_expand_merge_k1_kernel": lambda a: (
        _gemm(a["P"], a["C"], sum(_parent_widths(a)))
        + (sum(_gemm(a["C"], k, k) for k in _parent_widths(a)) if a["BATCH_STATS"] else 0)
    ),
    "_expand_k2_kernel": lambda a: sum(
        _gemm(a["P"], a["C"], k, 2) + (_gemm(a["P"], k, k, 2) + _gemm(a["C"], k, k) if a["BATCH_STATS"] else 0)
        for k in _parent_widths(a)
    ),
}
# Atomic adds into L2 (bytes of fp32 elements added; not HBM traffic, not in the byte model) of our kernels' tile
# reductions, per launch: each program adds its whole tile. The per-channel sums (statistics, d_scale, d_shift, d_bias:
# one row per program) are left out, being a tile's row.
TRITON_ATOMICS = {
    # the wgrads, split over WGRAD_CHUNKS pixel chunks: each chunk adds a whole dW
    "_conv1x1_backward_kernel": lambda a: 4 * a["C_OUT"] * a["C_IN"] * a["WGRAD_CHUNKS"],
    "_conv3x3_backward_kernel": lambda a: 4 * a["KSIZE"] ** 2 * a["C_OUT"] * a["C_IN"] * a["WGRAD_CHUNKS"],
    "_conv1x1_pair_backward_kernel": lambda a: 4 * a["C_IN"] * (a["C_A"] * a["CHUNKS_A"] + a["C_B"] * a["CHUNKS_B"]),
    "_depthwise3x3_backward_kernel": lambda a: 4 * 9 * a["C"] * -(-a["P"] // a["PIXELS_PER_PROGRAM"]),
    "_conv3x3_levels_backward_kernel": lambda a: 4 * a["BLOCK_M"] * a["BLOCK_N"] * a["G_END"],  # a tile per program
    # expand_merge's K1 (batch statistics): each column of tiles' last program adds each parent's M
    "_expand_merge_k1_kernel": lambda a: (
        4 * sum(k * k for k in _parent_widths(a)) * -(-a["C"] // a["BLOCK_N"]) if a["BATCH_STATS"] else 0
    ),
    # its K2: each parent's dW once per tile of parent pixels; with batch statistics its Gram too, and dW once more
    "_expand_k2_kernel": lambda a: 4 * sum(_k2_atomics(a, k) for k in _parent_widths(a)),
}
# Launches running two GEMMs side by side (a conv's dgrad and wgrad programs): the operands both read are counted
# twice — dy always, y where they read it (not where they recompute it, ``RECOMPUTE_Y``: its argument is then a
# stand-in, dy), x where the dgrad reads it too (its prologue's backward, or the recomputation of y). The pair's
# launch likewise: each conv's dy, and y where it is read; x where the dgrad recomputes y (the wgrads of both convs
# read it as one wgrad's output-channel tiles do: once).
READ_BY_BOTH = {
    "_conv1x1_backward_kernel": ("dy_ptr", "y_ptr"),
    "_conv3x3_backward_kernel": ("dy_ptr", "y_ptr"),
    "_conv1x1_pair_backward_kernel": ("dy_a_ptr", "y_a_ptr", "dy_b_ptr", "y_b_ptr"),
}


def triton_traffic(kernel, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """``(bytes, flops, atomic bytes)`` of one intercepted Triton launch."""
    named = dict(zip(kernel.arg_names, args)) | kwargs
    name = kernel.fn.__name__
    nbytes = tensors_bytes(args)
    if "NUM_GRADS" in named:  # the readers' gradients after the first are addressed by offsets, not arguments
        nbytes += (named["NUM_GRADS"] - 1) * tensor_bytes(named["grad_ptr"])
    if name in READ_BY_BOTH and named.get("DGRAD_TILES", 1):  # (a launch without dgrad tiles: the wgrad's alone)
        x_by_both = named.get("HAS_PROLOGUE", False) or named.get("RECOMPUTE_Y", False)
        operands = [named[arg] for arg in READ_BY_BOTH[name]]  # y: dy as a stand-in where recomputed (counted once)
        nbytes += tensors_bytes(*operands, named["x_ptr"] if x_by_both else None)
    flops, atomics = TRITON_FLOPS.get(name), TRITON_ATOMICS.get(name)
    return nbytes, flops(named) if flops is not None else 0, atomics(named) if atomics is not None else 0


def connection_floor(inputs: Iterable[torch.Tensor], output: torch.Tensor, parameters: Iterable[torch.Tensor],
                     extras: Iterable[torch.Tensor]) -> dict[str, int]:  # fmt: skip
    """fused_ops.md §7's byte floor of one block's cross-scale connection (its merge and all its parents).

    Forward: read each parent feature map, extra input and weight once, write the block input once. Backward: read
    the block input's gradient, the saved parent feature maps and the weights, write the parents' and the extras'
    gradients and the weight gradients, once each."""
    parents = sum(tensor_bytes(t) for t in inputs)
    extra = sum(tensor_bytes(t) for t in extras)
    weights = sum(tensor_bytes(p) for p in parameters)
    out = tensor_bytes(output)
    return {
        "forward": parents + extra + weights + out,
        "backward": out + parents + weights + parents + extra + weights,
    }


@dataclass(frozen=True)
class ParentMaps:
    """Bytes of one parent's maps in a cross-scale connection (storage dtype): its feature map ``x``; ``chain``, the
    raw outputs of the conv + BN layers before its expand conv, in order (SpineNet's squeeze y1 and stride-2 conv y2,
    SpineNet-Mobile's depthwise stride-2 convs; none for a Mobile parent that enters the expand raw); the max-pools'
    ``pooled`` (0 where the parent has none); and the expand's output ``e`` (at its input's resolution, before any
    upsampling)."""

    x: int
    chain: tuple[int, ...]
    pooled: int
    e: int


def barrier_bound(floor: dict[str, int], parents: Iterable[ParentMaps], output: int) -> dict[str, int]:
    """A lower bound on a connection's traffic that respects training-mode BN (``floor``: ``connection_floor``'s;
    ``output``: the block input's bytes). Each BN needs all of its input's statistics before its consumer may read a
    normalised value, so each BN's map is stored (written and read once) or recomputed (its producer's input read
    again), whichever moves less: forward, each map of the chain (or its producer's input again), the expand's e
    (or its input again; a pooled parent's: the last map of the chain again, or the pooled map stored). Backward,
    each saved map is read once (or recomputed from its producer's input) and the gradient at every BN is a barrier
    too: stored once at each map of the chain, and at e (or e's input, its share projected through the expand's
    weights; or the block input's gradient read again). Everything else — weights once, no fills, no second reads —
    as the floor. No kernel design moves less under those rules; one above ``limit × floor`` makes that budget
    unreachable."""
    forward = backward = 0
    for p in parents:
        sources = (p.x, *p.chain)  # each map's producer's input
        last = sources[-1]
        expand_input = p.pooled or last
        recompute_e = [last, 2 * p.pooled] if p.pooled else [expand_input]
        maps = list(zip(p.chain, sources))
        forward += sum(min(2 * y, source) for y, source in maps) + min(2 * p.e, *recompute_e)
        saved = sum(min(y, source) for y, source in maps) + (min(p.pooled, last) if p.pooled else 0)
        backward += saved + 2 * sum(p.chain) + min(2 * p.e, 2 * expand_input, output)
    return {"forward": floor["forward"] + forward, "backward": floor["backward"] + backward}
