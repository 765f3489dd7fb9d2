"""``expand_merge_affine``: a connection's expand 1×1 convs, their BNs as given affine maps (BNs that normalise with
their running statistics: eval mode, frozen norms) and the merge as one op, forward and backward — the expand outputs
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

Backward (``expand_merge``'s two kernels without the statistics' terms): K1 recomputes z, stores dz = Σ grads·act'(z)
(``extra``'s gradient; not at all where every parent is upsampled and nothing else needs it) and each upsampled
parent's block sums Σ_ρ×ρ dz, and accumulates d_bn_shift_p = Σdz and d_bn_scale_p = Σ dz·e_p; then K2 — one launch
for the parents at the output's level, one per upsampled parent — forms de_p = bn_scale_p·Σ_ρ×ρ dz without
recomputing e_p, runs da_p = de_p·W_p with the prologue's BN + act backward in its epilogue (d_scale_p, d_shift_p)
and dW_p += de_pᵀa_p. The accumulators live in one zeroed workspace (:func:`workspace_size` without statistics).
"""

import torch
from torch import Tensor

from . import backends, op_spec
from .activation import stats_dtype
from .checks import check_accumulator, describe
from .conv_common import CHANNELS_LAST, prologue_forward
from .expand_merge import (
    Workspace,
    _expand,
    _fake_backward,
    _padded,
    _vec,
    affine_norms,
    check_connection_args,
    check_per_parent,
    connection_backward_reference,
    input_gradients,
    input_sizes,
    merged_reference,
    prologue_lists,
    prologue_of,
    split_inputs,
    workspace_size,
)
from .merge import MAX_READERS, _nhwc_grads
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


def _triton_backward_reasons(grads, parents, scales, shifts, weights, *args) -> list[str]:
    return _triton_reasons(parents, scales, shifts, weights) + backends.triton_reasons(*grads)


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


def expand_merge_affine_backward_reference(grads, parents, scales, shifts, weights, ratios, extra, activation,
                                           bn_scales, bn_shifts, workspace) -> list[Tensor]:  # fmt: skip
    """``[*dh_p, *dW_p, *[d_bn_scale_p; d_bn_shift_p], (d_extra)]`` in plain PyTorch, as the kernels compute them
    (``expand_merge.connection_backward_reference``); each prologue's [d_scale; d_shift] added into the workspace, and
    dW_p too where the weight has the workspace's dtype (an empty stand-in returned)."""
    ws = Workspace(workspace, weights[0].shape[0], [h.shape[1] for h in parents], statistics=False)
    prologues = [prologue_of(scales, shifts, i) for i in range(len(parents))]
    d_parents, d_weights, d_bns, d_extra = connection_backward_reference(
        grads, parents, prologues, weights, ratios, extra, activation, affine_norms(bn_scales, bn_shifts), ws
    )  # fmt: skip
    return [*d_parents, *d_weights, *d_bns, *d_extra]


def _padded_backward(backward):
    """``backward``'s gradient list as the op's fixed seven slots (``expand_merge._padded``)."""
    return lambda *args: _padded(backward(*args), len(args[1]))


def _prepare_backward(grads, *args) -> tuple:
    """The backward's arguments as the kernels read them: the readers' gradients of one layout (``merge``'s), the
    (C,) vectors contiguous."""
    return _nhwc_grads(grads)[0], *_contiguous_vectors(*args[:-1]), args[-1]


@op_spec.custom_op(
    "expand_merge_affine_backward",
    fake=_fake_backward,
    implementations={
        "reference": Backend(_padded_backward(expand_merge_affine_backward_reference)),
        "cuda": Backend(
            _padded_backward(expand_merge_affine_backward_reference),
            lambda grads, parents, *args: backends.library_reasons(parents[0]),
        ),
        "triton": Backend(
            _padded_backward(op_spec.kernel("expand_merge", "expand_merge_affine_backward")), _triton_backward_reasons
        ),
    },
    auto_order=FUSED_FIRST,
    mutates_args=("workspace",),
    prepare=_prepare_backward,
)
def _backward_op(
    grads: TensorList, parents: TensorList, scales: TensorList, shifts: TensorList, weights: TensorList,
    ratios: IntList, extra: Tensor | None, activation: str, bn_scales: TensorList, bn_shifts: TensorList,
    workspace: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dh_0, dh_1, dW_0, dW_1, [d_bn_scale_0; d_bn_shift_0], [d_bn_scale_1; d_bn_shift_1], d_extra)`` (empty where
    absent) for the output gradient Σ ``grads`` (one per reader); each prologue's [d_scale; d_shift] added into the
    workspace, and each dW_p of a weight of the workspace's dtype (an empty stand-in returned)."""


class _ExpandMergeAffine(torch.autograd.Function):
    """The op returned once per reader: its gradients are summed as K1 loads them. Differentiable inputs flattened
    (parents, scales, shifts, weights, bn_scales, bn_shifts, extra), as a Function tracks only tensor arguments."""

    @staticmethod
    def forward(ctx, config, workspace, *tensors):
        readers, ratios, activation, num_parents, has_prologue, _ = config
        sizes = input_sizes(num_parents, has_prologue)
        (parents, scales, shifts, weights, bn_scales, bn_shifts), extra = split_inputs(tensors, sizes)
        out = _expand_merge_affine_op(parents, scales, shifts, weights, list(ratios), extra, activation, bn_scales,
                                      bn_shifts)  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        ctx.config, ctx.sizes, ctx.workspace = config, sizes, workspace
        return (out, *(out.view_as(out) for _ in range(readers - 1)))

    @staticmethod
    def backward(ctx, *grads):
        _, ratios, activation, _, _, has_extra = ctx.config
        tensors = ctx.saved_tensors
        defined = [g for g in grads if g is not None]
        if not defined:
            return (None, None, *(None,) * len(tensors))
        (parents, scales, shifts, weights, bn_scales, bn_shifts), extra = split_inputs(tensors, ctx.sizes)
        squeezed, dtype = [h.shape[1] for h in parents], bn_scales[0].dtype
        workspace, ctx.workspace = ctx.workspace, None  # used once: a later backward (retain_graph) takes a fresh one
        if workspace is None:
            workspace = torch.zeros(workspace_size(weights[0].shape[0], squeezed, dtype, statistics=False),
                                    dtype=dtype, device=parents[0].device)  # fmt: skip
        outputs = _backward_op(defined, parents, scales, shifts, weights, list(ratios), extra, activation, bn_scales,
                               bn_shifts, workspace)  # fmt: skip
        ws = Workspace(workspace, weights[0].shape[0], squeezed, statistics=False)
        return (None, None, *input_gradients(outputs, ws, weights, scales, has_extra))


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
    workspace: Tensor | None = None,
) -> Tensor:
    """The connection's output (see the module docstring); checks its arguments first. ``scales``/``shifts``: each
    parent's prologue (fp32 (C_h,p,)), None in a parent's place for none, or None for no parent. ``bn_scales``,
    ``bn_shifts``: each expand BN's affine map, (C,) in the maths dtype. ``workspace``: where a backward may run, a
    zeroed contiguous (``workspace_size(C, [C_h,p], dtype, statistics=False)``,) tensor of the maps' dtype that the
    (first) backward accumulates into (a slice of a buffer several ops share); None: the backward allocates it."""
    return expand_merge_affine_for_readers(
        parents, scales, shifts, weights, ratios, extra, activation, bn_scales=bn_scales, bn_shifts=bn_shifts,
        workspace=workspace,
    )[0]  # fmt: skip


def expand_merge_affine_for_readers(
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
    readers: int = 1,
    workspace: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """:func:`expand_merge_affine`'s output once per reader (1 to ``MAX_READERS``): with gradients, views of one
    output whose gradients the backward sums as it loads them."""
    if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers must be an int in [1, {MAX_READERS}], got {readers!r}")
    scales, shifts = prologue_lists(scales), prologue_lists(shifts)
    args = (list(parents) if isinstance(parents, (list, tuple)) else parents, scales, shifts, list(weights),
            list(ratios), extra, activation, list(bn_scales), list(bn_shifts))  # fmt: skip
    check_expand_merge_affine_args(*args)
    if workspace is not None:
        first, channels = args[0][0], args[3][0].shape[0]
        size = workspace_size(channels, [h.shape[1] for h in args[0]], stats_dtype(first), statistics=False)
        check_accumulator("workspace", workspace, (size,), stats_dtype(first), first.device)
    tensors = [*args[0], *scales, *shifts, *args[3], *args[7], *args[8], *([extra] if extra is not None else [])]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return (_expand_merge_affine_op(*args[:4], [int(r) for r in args[4]], *args[5:]),) * readers
    config = (readers, tuple(int(r) for r in args[4]), activation, len(args[0]), len(scales) > 0, extra is not None)
    return _ExpandMergeAffine.apply(config, workspace, *tensors)
