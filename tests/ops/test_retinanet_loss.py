"""``retinanet_loss`` (Triton under the CPU interpreter, the extension's CPU kernels) against its reference, and the
reference against torchvision's per-image computation."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import sigmoid_focal_loss

from spinenet_fast.ops import use_backend
from spinenet_fast.ops.retinanet_loss import (
    _retinanet_loss_backward_op,
    _retinanet_loss_op,
    retinanet_loss,
    retinanet_loss_backward_reference,
    retinanet_loss_reference,
)

from ..conftest import require_backend
from .tolerance import assert_close_by_dtype, assert_low_precision_rule

ALPHA, GAMMA, DELTA = 0.25, 1.5, 0.1


def random_boxes(shape, generator, dtype=torch.float32):
    xy = torch.rand(*shape, 2, generator=generator) * 50
    wh = torch.rand(*shape, 2, generator=generator) * 30 + 2
    return torch.cat([xy, xy + wh], -1).to(dtype)


def make_batch(counts=(3, 0, 2), anchors=37, classes=5, dtype=torch.float32, layout="contiguous", seed=0):
    """Logits, regression, matched (every outcome: matched, background, ignored), padded targets, anchors."""
    generator = torch.Generator().manual_seed(seed)
    n, g = len(counts), max(counts)
    if layout == "strided":  # every other class of a wider tensor, every other anchor row of the regression
        logits = (3 * torch.randn(n, anchors, 2 * classes, generator=generator))[..., ::2]
        regression = (0.3 * torch.randn(n, 2 * anchors, 4, generator=generator))[:, ::2]
    else:
        logits = 3 * torch.randn(n, anchors, classes, generator=generator)
        regression = 0.3 * torch.randn(n, anchors, 4, generator=generator)
    matched = torch.stack(
        [
            torch.randint(-2, max(c, 0), (anchors,), generator=generator)
            if c
            else torch.randint(-2, 0, (anchors,), generator=generator)
            for c in counts
        ]
    )
    labels = torch.randint(0, classes, (n, g), generator=generator)
    boxes = random_boxes((n, g), generator)
    anchor_boxes = random_boxes((n, anchors), generator)
    return [logits.to(dtype), regression.to(dtype), matched, labels, boxes, anchor_boxes]


def torchvision_per_image(logits, regression, matched, labels, boxes, anchors):
    """The loss sums as torchvision's RetinaNet head computes them, image by image (one-hot targets, ignored rows
    dropped, matched rows' boxes encoded), in the inputs' dtype."""
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    focal, box = 0.0, 0.0
    for i in range(logits.shape[0]):
        fg, valid = matched[i] >= 0, matched[i] != -2
        targets = torch.zeros_like(logits[i])
        targets[fg, labels[i][matched[i][fg]]] = 1.0
        focal = focal + sigmoid_focal_loss(logits[i][valid], targets[valid], ALPHA, GAMMA, reduction="sum")
        encoded = coder.encode_single(boxes[i][matched[i][fg]], anchors[i][fg])
        box = (
            box
            + F.huber_loss(regression[i][fg], encoded.to(regression.dtype), delta=DELTA, reduction="none")
            .mean(-1)
            .sum()
        )
    return torch.stack([focal, box])


def run(backend, batch, grad):
    leaves = [t.detach().requires_grad_() for t in batch[:2]]
    with use_backend(backend):  # the backward chooses its backend when it runs: inside the block
        sums = retinanet_loss(*leaves, *batch[2:], ALPHA, GAMMA, DELTA)
        grads = torch.autograd.grad(sums[:2], leaves, grad)
    return sums, grads


@pytest.mark.parametrize("counts", [(3, 0, 2), (1,), (0, 0)])
def test_reference_equals_torchvision_per_image(counts):
    batch = make_batch(counts, dtype=torch.float64)
    logits, regression = (t.requires_grad_() for t in batch[:2])
    sums = retinanet_loss_reference(*batch, ALPHA, GAMMA, DELTA)
    expected = torchvision_per_image(*batch)
    torch.testing.assert_close(sums[:2], expected)
    assert sums[2].item() == (batch[2] >= 0).sum().item()
    # The backward formulas equal autograd through torchvision's composition.
    grad = torch.tensor([0.7, -1.3], dtype=torch.float64)
    want = torch.autograd.grad(expected, (logits, regression), grad)
    got = retinanet_loss_backward_reference(torch.cat([grad, grad.new_zeros(1)]), *batch, ALPHA, GAMMA, DELTA)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("counts", "anchors", "classes", "layout"),
    [
        ((3, 0, 2), 37, 5, "contiguous"),
        ((1,), 5, 1, "contiguous"),
        ((2, 4), 33, 130, "contiguous"),
        ((0, 0), 9, 3, "contiguous"),
        ((2, 1), 21, 7, "strided"),
    ],
)
def test_fused_equals_reference_fp32(fused_backend, counts, anchors, classes, layout):
    batch = make_batch(counts, anchors, classes, layout=layout)
    grad = torch.tensor([0.7, -1.3])
    sums, grads = run(fused_backend, batch, grad)
    want_sums, want_grads = run("reference", batch, grad)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ignored = batch[2] == -2
    assert (grads[0][ignored] == 0).all() and (grads[1][batch[2] < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_by_the_tolerance_rule(fused_backend, dtype):
    batch32 = make_batch((3, 1), 41, 6)
    batch = [t.to(dtype) if t.is_floating_point() and i < 2 else t for i, t in enumerate(batch32)]
    grad = torch.tensor([0.7, -1.3])
    sums, grads = run(fused_backend, batch, grad)
    want_sums, want_grads = run("reference", batch32, grad)
    eager = [t.detach().requires_grad_() for t in batch[:2]]
    eager_sums = torchvision_per_image(*eager, *batch[2:])  # torchvision in the same dtype
    eager_grads = torch.autograd.grad(eager_sums, eager, grad.to(dtype))
    assert sums.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_low_precision_rule(sums[:2], want_sums[:2], eager_sums)  # fp32 sums of low-precision inputs
    for a, b, c in zip(grads, want_grads, eager_grads):
        assert_close_by_dtype(a, b, c)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_gradcheck_float64(backend):
    require_backend(backend)
    batch = make_batch((2, 0), 7, 3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in batch[:2]]
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, r: retinanet_loss(x, r, *batch[2:])[:2], leaves)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_opcheck(backend):
    require_backend(backend)
    batch = make_batch((2, 1), 6, 3)
    scalars = (ALPHA, GAMMA, DELTA)
    with use_backend(backend):
        torch.library.opcheck(_retinanet_loss_op, (*batch, *scalars))
        torch.library.opcheck(_retinanet_loss_backward_op, (torch.tensor([1.0, 2.0, 0.0]), *batch, *scalars))


def test_bad_arguments():
    batch = make_batch((2, 1), 6, 3)
    with pytest.raises(TypeError, match=r"cls_logits must be a floating-point \(N, A, K\) tensor, got torch.int64"):
        retinanet_loss(batch[2][..., None], *batch[1:])
    with pytest.raises(TypeError, match=r"box_regression must be a floating-point tensor of shape \(2, 6, 4\)"):
        retinanet_loss(batch[0], batch[1][:, :5], *batch[2:])
    with pytest.raises(TypeError, match=r"matched must be a int64 tensor of shape \(2, 6\) on cpu, got torch.int32"):
        retinanet_loss(*batch[:2], batch[2].int(), *batch[3:])
    with pytest.raises(TypeError, match=r"gt_boxes must be a floating-point tensor of shape \(2, 2, 4\)"):
        retinanet_loss(*batch[:4], batch[4][:, :1], batch[5])
    with pytest.raises(
        TypeError, match=r"anchors must be a floating-point tensor of shape \(2, 6, 4\) on cpu, got NoneType"
    ):
        retinanet_loss(*batch[:5], None)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        retinanet_loss(*batch, alpha=1.5)
    with pytest.raises(ValueError, match=r"delta must be a number in \[0, inf\] above 0, got 0"):
        retinanet_loss(*batch, delta=0)
    with pytest.raises(ValueError, match=r"cls_logits must have at least one class, got shape \(2, 6, 0\)"):
        retinanet_loss(batch[0][..., :0], *batch[1:])
    for bad in (2, -3):  # an index past the padded ground truth (G = 2), a code that is not −1 or −2
        matched = batch[2].clone()
        matched[1, 3] = bad
        with pytest.raises(ValueError, match=rf"matched must hold -2, -1 or ground-truth indices below 2, got values "
                                             rf"in \[{min(bad, -2)}, {max(bad, 1)}\]"):  # fmt: skip
            retinanet_loss(*batch[:2], matched, *batch[3:])
