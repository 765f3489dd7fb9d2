"""The fused RetinaNet loss launches a fixed, small number of kernels per step (counted on the CPU by the ledger's
dispatch mode, the extension standing in for the GPU kernels), where torchvision's per-image loss grows with the
batch."""

import torch
from torchvision.models.detection.image_list import ImageList

from benchmarks.ledger import LaunchCounter, Ledger
from spinenet_fast.detection import retinanet_spinenet
from spinenet_fast.ops import use_backend

from ..conftest import require_backend

SIZE = 128


def count_loss_step(fused: bool, batch: int) -> tuple[dict[str, int], Ledger]:
    """Launches per pass of the detector's ``compute_loss`` (matching and losses) and its backward."""
    detector = retinanet_spinenet("49S", 3, image_size=SIZE, fused=fused)
    features = [torch.zeros(batch, 1, SIZE >> level, SIZE >> level) for level in range(3, 8)]
    anchors = detector.anchor_generator(ImageList(torch.zeros(batch, 3, SIZE, SIZE), [(SIZE, SIZE)] * batch), features)
    rows = anchors[0].shape[0]
    outputs = {"cls_logits": torch.randn(batch, rows, 3, requires_grad=True),
               "bbox_regression": torch.randn(batch, rows, 4, requires_grad=True)}  # fmt: skip
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60], [60, 20, 120, 90]]), "labels": torch.tensor([1, 2])}]
    targets += [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * (batch - 1)
    ledger = Ledger()
    counter = LaunchCounter(ledger)
    with use_backend("cuda" if fused else None), counter:
        losses = detector.compute_loss(targets, outputs, anchors)
        counter.pass_ = "backward"
        sum(losses.values()).backward()
    return {p: ledger.launches(pass_=p) for p in ("forward", "backward")}, ledger


def test_fused_loss_launches_do_not_grow_with_the_batch_and_undercut_torchvision():
    require_backend("cuda")
    fused, ledger = count_loss_step(True, 2)
    assert count_loss_step(True, 5)[0] == fused
    eager = count_loss_step(False, 2)[0]
    assert count_loss_step(False, 5)[0]["forward"] > eager["forward"]  # torchvision's loop: launches per image
    # One loss kernel per pass; the rest is batched matching (IoU, thresholds, low-quality matches) and padding.
    assert ledger.ops(pass_="forward")["extension retinanet_loss"] == 1
    assert ledger.ops(pass_="backward")["extension retinanet_loss_backward"] == 1
    for absent in ("aten binary_cross_entropy_with_logits", "aten sigmoid", "aten index_put_", "aten huber_loss"):
        assert absent not in ledger.ops()
    for p in ("forward", "backward"):
        assert fused[p] <= 0.4 * eager[p], (p, fused, eager)
