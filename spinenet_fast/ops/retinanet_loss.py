"""``retinanet_loss``: RetinaNet's focal and box losses over every anchor of a batch, forward and backward fused.

With m = matched[n, a] (a ground-truth index, −1 background, −2 ignored), the op returns ``sums`` (3,)::

    [Σ_{n,a: m ≠ −2} Σ_k sigmoid_focal_loss(cls_logits[n, a, k], k == gt_labels[n, m], alpha, gamma),
     Σ_{n,a: m ≥ 0} mean_c huber(box_regression[n, a, c] − encode(gt_boxes[n, m], anchors[n, a])[c], delta),
     #{n, a: m ≥ 0}]

(torchvision's ``sigmoid_focal_loss`` and ``BoxCoder(weights=(1, 1, 1, 1))``; the caller divides by its
normaliser). cls_logits (N, A, K) and box_regression (N, A, 4): any float dtype and strides; matched (N, A) and
gt_labels (N, G) int64; gt_boxes (N, G, 4) and anchors (N, A, 4) float. ``sums`` is fp32 (float64 for float64
logits). No one-hot target, no gathered box target and no fp32 copy of the logits is ever written: the kernels read
each logit once per pass and encode the box targets on the fly; the backward recomputes from the logits.
"""

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import sigmoid_focal_loss

from . import backends, op_spec
from .activation import stats_dtype
from .checks import describe
from .op_spec import Backend

_BOX_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def check_retinanet_loss_args(cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta):
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs describe one batch's loss."""
    if not isinstance(cls_logits, Tensor) or cls_logits.dim() != 3 or not cls_logits.is_floating_point():
        raise TypeError(f"cls_logits must be a floating-point (N, A, K) tensor, got {describe(cls_logits)}")
    if cls_logits.shape[2] == 0:
        raise ValueError(f"cls_logits must have at least one class, got shape {tuple(cls_logits.shape)}")
    n, a, _ = cls_logits.shape
    g = gt_labels.shape[1] if isinstance(gt_labels, Tensor) and gt_labels.dim() == 2 else None
    expected = (
        ("box_regression", box_regression, (n, a, 4), "floating"),
        ("matched", matched, (n, a), torch.int64),
        ("gt_labels", gt_labels, (n, g), torch.int64),
        ("gt_boxes", gt_boxes, (n, g, 4), "floating"),
        ("anchors", anchors, (n, a, 4), "floating"),
    )
    for name, value, shape, dtype in expected:
        fits = isinstance(value, Tensor) and tuple(value.shape) == shape and value.device == cls_logits.device
        if not (fits and (value.is_floating_point() if dtype == "floating" else value.dtype == dtype)):
            wanted = "floating-point" if dtype == "floating" else str(dtype)[6:]
            raise TypeError(f"{name} must be a {wanted} tensor of shape {shape} on {cls_logits.device}, got "
                            f"{describe(value)}")  # fmt: skip
    for name, value, low, high in (("alpha", alpha, 0, 1), ("gamma", gamma, 0, float("inf")),
                                   ("delta", delta, 0, float("inf"))):  # fmt: skip
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and low <= value <= high and (name != "delta" or value > 0)):
            raise ValueError(f"{name} must be a number in [{low}, {high}]{' above 0' if name == 'delta' else ''}, "
                             f"got {value!r}")  # fmt: skip


def _matched_targets(matched: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(fg (N, A) bool, labels (N, A) with −1 where not matched, boxes (N, A, 4) of the matched ground truth)."""
    fg = matched >= 0
    if gt_labels.shape[1] == 0:
        return fg, torch.full_like(matched, -1), gt_boxes.new_zeros((*matched.shape, 4))
    index = matched.clamp(min=0)
    labels = torch.where(fg, gt_labels.gather(1, index), -1)
    return fg, labels, gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))


def _box_deltas(box_regression, fg, boxes, anchors, dtype) -> Tensor:
    """box_regression − encode(boxes, anchors) in ``dtype``, (N, A, 4), 0 where ``fg`` is False."""
    targets = _BOX_CODER.encode_single(boxes.reshape(-1, 4).to(dtype), anchors.reshape(-1, 4).to(dtype))
    deltas = box_regression.to(dtype) - targets.view(box_regression.shape)
    return torch.where(fg[..., None], deltas, 0.0)


def retinanet_loss_reference(cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta):
    """Plain-PyTorch ``sums`` (torchvision's ``sigmoid_focal_loss`` and ``BoxCoder``): the CPU path and the oracle."""
    dtype = stats_dtype(cls_logits)
    fg, labels, boxes = _matched_targets(matched, gt_labels, gt_boxes)
    classes = torch.arange(cls_logits.shape[2], device=cls_logits.device)
    one_hot = (labels[..., None] == classes).to(dtype)
    focal = sigmoid_focal_loss(cls_logits.to(dtype), one_hot, alpha=alpha, gamma=gamma, reduction="none")
    focal = torch.where((matched >= -1)[..., None], focal, 0.0).sum()
    deltas = _box_deltas(box_regression, fg, boxes, anchors, dtype)
    box = torch.nn.functional.huber_loss(deltas, torch.zeros_like(deltas), delta=delta, reduction="sum") / 4
    return torch.stack([focal, box, fg.sum().to(dtype)])


def retinanet_loss_backward_reference(grad, cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha,
                                      gamma, delta) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d_cls_logits, d_box_regression) of :func:`retinanet_loss_reference` for ``grad`` (3,), in plain PyTorch:
    with z = ±x (+ for the target class) and p_t = sigmoid(z), d focal / dz = α_t (1 − p_t)^γ (γ p_t log p_t −
    (1 − p_t)); d huber / d delta = clamp(delta, −δ, δ)."""
    dtype = stats_dtype(cls_logits)
    fg, labels, boxes = _matched_targets(matched, gt_labels, gt_boxes)
    positive = labels[..., None] == torch.arange(cls_logits.shape[2], device=cls_logits.device)
    x = cls_logits.to(dtype)
    z = torch.where(positive, x, -x)
    log_p, log_q = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    alpha_t = torch.where(positive, alpha, 1 - alpha)
    dz = alpha_t * torch.exp(gamma * log_q) * (gamma * log_p.exp() * log_p - log_q.exp())
    d_logits = torch.where(positive, dz, -dz) * (matched >= -1)[..., None] * grad[0].to(dtype)
    deltas = _box_deltas(box_regression, fg, boxes, anchors, dtype)
    d_box = deltas.clamp(-delta, delta) * (grad[1].to(dtype) / 4)
    return d_logits.to(cls_logits.dtype), d_box.to(box_regression.dtype)


def _triton_reasons(cls_logits, box_regression, *args) -> list[str]:
    reasons = backends.triton_reasons(cls_logits, box_regression)
    if cls_logits.dtype not in backends.FLOAT_DTYPES or box_regression.dtype not in backends.FLOAT_DTYPES:
        reasons.append(f"dtypes {cls_logits.dtype}, {box_regression.dtype} are not in {backends.FLOAT_DTYPES}")
    return reasons


def _extension_reasons(cls_logits, box_regression, *args) -> list[str]:
    reasons = backends.extension_reasons(cls_logits, box_regression)
    if cls_logits.dtype != box_regression.dtype:
        reasons.append(f"the extension needs one dtype for both, got {cls_logits.dtype} and {box_regression.dtype}")
    return reasons


def _contiguous_targets(*args) -> tuple:
    """The small per-anchor and per-box inputs contiguous and in the maths dtype (the kernels index them flat)."""
    cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, *scalars = args[-9:]
    dtype = stats_dtype(cls_logits)
    small = (
        matched.contiguous(),
        gt_labels.contiguous(),
        gt_boxes.to(dtype).contiguous(),
        anchors.to(dtype).contiguous(),
    )
    return (*args[:-9], cls_logits, box_regression, *small, *scalars)


def _fake_sums(cls_logits, *args) -> Tensor:
    return cls_logits.new_empty((3,), dtype=stats_dtype(cls_logits))


def _fake_backward(grad, cls_logits, box_regression, *args) -> tuple[Tensor, Tensor]:
    return torch.empty_like(cls_logits, memory_format=torch.contiguous_format), torch.empty_like(
        box_regression, memory_format=torch.contiguous_format
    )


@op_spec.custom_op(
    "retinanet_loss",
    fake=_fake_sums,
    implementations={
        "reference": Backend(retinanet_loss_reference),
        "triton": Backend(op_spec.kernel("retinanet_loss", "retinanet_loss_forward"), _triton_reasons),
        "cuda": Backend(op_spec.extension("ext_retinanet_loss"), _extension_reasons),
    },
    auto_order=op_spec.FUSED_FIRST,  # Triton's tiles span the classes: 2 launches forward, the extension's 3
    prepare=_contiguous_targets,
)
def _retinanet_loss_op(
    cls_logits: Tensor, box_regression: Tensor, matched: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
    anchors: Tensor, alpha: float, gamma: float, delta: float,
) -> Tensor:  # fmt: skip
    """``sums`` (3,): see the module docstring."""


@op_spec.custom_op(
    "retinanet_loss_backward",
    fake=_fake_backward,
    implementations={
        "reference": Backend(retinanet_loss_backward_reference),
        "triton": Backend(
            op_spec.kernel("retinanet_loss", "retinanet_loss_backward"), lambda grad, *args: _triton_reasons(*args)
        ),
        "cuda": Backend(
            op_spec.extension("ext_retinanet_loss_backward"), lambda grad, *args: _extension_reasons(*args)
        ),
    },
    auto_order=op_spec.FUSED_FIRST,
    prepare=_contiguous_targets,
)
def _retinanet_loss_backward_op(
    grad: Tensor, cls_logits: Tensor, box_regression: Tensor, matched: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
    anchors: Tensor, alpha: float, gamma: float, delta: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d_cls_logits (N, A, K), d_box_regression (N, A, 4)), contiguous, for ``grad`` (3,) of the sums."""


def _setup_context(ctx, inputs, output):
    *tensors, ctx.alpha, ctx.gamma, ctx.delta = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad):
    d_logits, d_box = _retinanet_loss_backward_op(grad, *ctx.saved_tensors, ctx.alpha, ctx.gamma, ctx.delta)
    return d_logits, d_box, None, None, None, None, None, None, None


_retinanet_loss_op.register_autograd(_backward, setup_context=_setup_context)


def retinanet_loss(
    cls_logits: Tensor,
    box_regression: Tensor,
    matched: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    anchors: Tensor,
    alpha: float = 0.25,
    gamma: float = 1.5,
    delta: float = 0.1,
    *,
    check_indices: bool = True,
) -> Tensor:
    """Fused RetinaNet loss sums (see the module docstring); checks its arguments before any kernel runs, with
    ``check_indices`` also that every ``matched`` entry is −2, −1 or a ground-truth index below G (one device sync:
    callers that built ``matched`` themselves skip it)."""
    check_retinanet_loss_args(cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta)
    if check_indices and matched.numel():
        low, high = (v.item() for v in torch.aminmax(matched))
        if low < -2 or high >= gt_labels.shape[1]:
            raise ValueError(f"matched must hold -2, -1 or ground-truth indices below {gt_labels.shape[1]}, got values "
                             f"in [{low}, {high}]")  # fmt: skip
    return _retinanet_loss_op(
        cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, float(alpha), float(gamma), float(delta)
    )
