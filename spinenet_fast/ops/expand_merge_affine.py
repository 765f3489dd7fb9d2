"""``expand_merge_affine``: a connection's expand 1×1 convs, their BNs as given affine maps (BNs that normalise with
their running statistics: eval mode, frozen norms) and the merge as one op — inference only, the expand outputs
never stored.

Equivalent to (per parent p)::

    a_p = act(scale_p·h_p + shift_p)             # the previous BN + act (or a_p = h_p without a prologue)
    e_p = conv1x1(a_p, W_p)                      # at the parent's resolution
    out = act(Σ_p upsample(bn_scale_p·e_p + bn_shift_p, ρ_p) + extra)

h_p: (N, C_h,p, H/ρ_p, W/ρ_p) in any memory format (a downsampling parent comes max-pooled, its BN + act applied:
no prologue); W_p: (C, C_h,p, 1, 1); bn_scale_p, bn_shift_p: (C,) in the maths dtype (fp32; float64 for float64);
out: (N, C, H, W) channels_last. Where ``expand_merge`` needs its statistics pass first, here the affine maps are
known before the op runs: one GEMM over every parent's a (K = Σ C_h,p) recomputes each e_p, applies its map,
gathers the upsampled parents' rows, adds ``extra`` and the activation, and stores out — one launch on Triton, where
a 1×1 conv without statistics and a ``merge`` write each e_p at its parent's resolution and read it back.

No backward: with gradients on and an input that requires them, the call raises (the fused model takes this op only
for forwards without gradients, its other ops otherwise).
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .activation import stats_dtype
from .checks import describe
from .conv_common import CHANNELS_LAST, prologue_forward
from .expand_merge import (
    _expand,
    _vec,
    check_connection_args,
    check_per_parent,
    merged_reference,
    prologue_lists,
    prologue_of,
)
from .op_spec import FUSED_FIRST, Backend
from .schema_types import IntList, TensorList


def check_expand_merge_affine_args(parents, scales, shifts, weights, ratios, extra, activation, bn_scales,
                                   bn_shifts) -> None:  # fmt: skip
    """Raise ``TypeError``/``ValueError`` naming the argument unless these describe one ``expand_merge_affine``."""
    no_pools = [0] * len(parents) if isinstance(parents, (list, tuple)) else []  # a pooled parent comes pooled
    channels, _ = check_connection_args(parents, scales, shifts, weights, ratios, extra, activation, no_pools, "torch")
    check_per_parent(len(parents), (("bn_scales", bn_scales), ("bn_shifts", bn_shifts)))
    first = parents[0]
    expected = f"{str(stats_dtype(first))[6:]} ({channels},) tensor on {first.device}"
    for name, vectors in (("bn_scales", bn_scales), ("bn_shifts", bn_shifts)):
        for i, v in enumerate(vectors):
            if not (isinstance(v, Tensor) and v.shape == (channels,) and v.dtype == stats_dtype(first)
                    and v.device == first.device):  # fmt: skip
                raise ValueError(f"{name}[{i}] must be a {expected} (the expand BN's map), got {describe(v)}")


def expand_merge_affine_reference(parents, scales, shifts, weights, ratios, extra, activation, bn_scales, bn_shifts
                                  ) -> Tensor:  # fmt: skip
    """Plain PyTorch (the maths dtype; float64 stays): out, channels_last in the parents' dtype."""
    terms = []
    for i, (h, weight) in enumerate(zip(parents, weights)):
        e = _expand(prologue_forward(h, *prologue_of(scales, shifts, i), activation), weight, h)
        terms.append(e * _vec(bn_scales[i].to(e.dtype)) + _vec(bn_shifts[i].to(e.dtype)))
    return merged_reference(terms, ratios, extra, activation, parents[0].dtype)


def _fake(parents, scales, shifts, weights, ratios, *args) -> Tensor:
    h = parents[0]
    shape = (h.shape[0], weights[0].shape[0], h.shape[2] * ratios[0], h.shape[3] * ratios[0])
    return torch.empty(shape, dtype=h.dtype, device=h.device, memory_format=CHANNELS_LAST)


def _triton_reasons(parents, scales, shifts, weights, *args) -> list[str]:
    reasons = backends.triton_reasons(*parents, *weights)
    if parents[0].dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtype {parents[0].dtype} is not one of {backends.FLOAT_DTYPES}")
    return reasons


def _contiguous_vectors(parents, scales, shifts, weights, ratios, extra, activation, bn_scales, bn_shifts) -> tuple:
    """The op's arguments with its (C,) vectors contiguous (the kernel addresses them densely)."""
    vectors = [[v.contiguous() for v in group] for group in (scales, shifts, bn_scales, bn_shifts)]
    return parents, vectors[0], vectors[1], weights, ratios, extra, activation, vectors[2], vectors[3]


@op_spec.custom_op(
    "expand_merge_affine",
    fake=_fake,
    implementations={
        "reference": Backend(expand_merge_affine_reference),
        # ATen's GEMMs (cuBLAS on a GPU) around the elementwise steps, as fused_ops.md §3 allows.
        "cuda": Backend(expand_merge_affine_reference, lambda parents, *args: backends.library_reasons(parents[0])),
        "triton": Backend(op_spec.kernel("expand_merge", "expand_merge_affine_forward"), _triton_reasons),
    },
    auto_order=FUSED_FIRST,
    prepare=_contiguous_vectors,
)
def _expand_merge_affine_op(
    parents: TensorList, scales: TensorList, shifts: TensorList, weights: TensorList, ratios: IntList,
    extra: Tensor | None, activation: str, bn_scales: TensorList, bn_shifts: TensorList,
) -> Tensor:  # fmt: skip
    """out = act(Σ_p upsample(bn_scale_p·conv1x1(act(scale_p·h_p + shift_p), W_p) + bn_shift_p, ρ_p) + extra)."""


def expand_merge_affine(
    parents: list[Tensor],
    scales: list[Tensor | None] | None,
    shifts: list[Tensor | None] | None,
    weights: list[Tensor],
    ratios: list[int],
    extra: Tensor | None = None,
    activation: str = "swish",
    *,
    bn_scales: list[Tensor],
    bn_shifts: list[Tensor],
) -> Tensor:
    """The connection's output (see the module docstring); checks its arguments first. ``scales``/``shifts``: each
    parent's prologue (fp32 (C_h,p,)), None in a parent's place for none, or None for no parent. ``bn_scales``,
    ``bn_shifts``: each expand BN's affine map, (C,) in the maths dtype."""
    scales, shifts = prologue_lists(scales), prologue_lists(shifts)
    args = (list(parents) if isinstance(parents, (list, tuple)) else parents, scales, shifts, list(weights),
            list(ratios), extra, activation, list(bn_scales), list(bn_shifts))  # fmt: skip
    check_expand_merge_affine_args(*args)
    if torch.is_grad_enabled():
        lists = (("parents", args[0]), ("scales", scales), ("shifts", shifts), ("weights", args[3]),
                 ("bn_scales", args[7]), ("bn_shifts", args[8]))  # fmt: skip
        named = [(f"{name}[{i}]", t) for name, tensors in lists for i, t in enumerate(tensors)]
        for name, t in [*named, ("extra", extra)]:
            if t is not None and t.requires_grad:
                raise ValueError(f"expand_merge_affine has no backward (inference only): {name} requires grad; call "
                                 "it under torch.no_grad() or with tensors that do not")  # fmt: skip
    return _expand_merge_affine_op(*args[:4], [int(r) for r in args[4]], *args[5:])
