"""Our detector driven the way torchvision's detection references drive a model (``references/detection``: their
``train.py`` builds it with ``torchvision.models.get_model``, reads COCO with ``CocoDetection`` wrapped for transforms
v2, and runs ``engine.train_one_epoch`` / ``engine.evaluate`` with their ``CocoEvaluator``). The loop below is written
against that documented contract, not copied: a list of float images in [0, 1] and target dicts in, a dict of
losses out in training; a list of ``{boxes, labels, scores}`` dicts in original-image coordinates in evaluation."""

import math

import torch
import torchvision
from torchvision import datasets
from torchvision.transforms import v2

import spinenet_fast  # noqa: F401  (registers retinanet_spinenet* with torchvision's get_model)

from ..conftest import require_optional

COCOeval = require_optional("pycocotools.cocoeval").COCOeval


def reference_dataset(root, split, train):
    """As the references' ``--use-v2`` path builds it: masks from the ``segmentation`` polygons included, training
    images without annotations dropped (their ``_coco_remove_images_without_annotations``)."""
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)] + ([v2.SanitizeBoundingBoxes()] if train else [])
    annotations = root / "annotations" / f"instances_{split}.json"
    dataset = datasets.CocoDetection(root / split, annotations, transforms=v2.Compose(steps))
    wrapped = datasets.wrap_dataset_for_transforms_v2(dataset, target_keys={"boxes", "labels", "image_id", "masks"})
    if not train:
        return wrapped
    keep = [i for i, image_id in enumerate(dataset.ids) if dataset.coco.getAnnIds(imgIds=image_id)]
    return torch.utils.data.Subset(wrapped, keep)


def collate(batch):
    return tuple(zip(*batch))


def train_one_epoch(model, optimizer, loader):
    """The references' loop: sum the loss dict, stop on a non-finite loss, step."""
    model.train()
    losses = []
    for images, targets in loader:
        loss_dict = model(list(images), [dict(t) for t in targets])
        loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            raise AssertionError(f"loss is {loss.item()}, stopping training: {loss_dict}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append({k: v.item() for k, v in loss_dict.items()})
    return losses


@torch.no_grad()
def evaluate(model, loader, coco_gt):
    """The references' ``evaluate`` + ``CocoEvaluator`` (bbox): outputs keyed by image id, xyxy -> xywh rows."""
    model.eval()
    outputs, rows = [], []
    for images, targets in loader:
        for target, output in zip(targets, model(list(images))):
            outputs.append((target, output))
            xywh = torchvision.ops.box_convert(output["boxes"], "xyxy", "xywh").tolist()
            for box, score, label in zip(xywh, output["scores"].tolist(), output["labels"].tolist()):
                rows.append({"image_id": target["image_id"], "category_id": label, "bbox": box, "score": score})
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(rows), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return outputs, evaluator.stats


def test_reference_train_one_epoch_and_evaluate_contract(tiny_data):
    train_set = reference_dataset(tiny_data, "train2017", train=True)
    val_set = reference_dataset(tiny_data, "val2017", train=False)
    image, target = train_set[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert target["masks"].shape == (len(target["boxes"]), *image.shape[1:]) and target["masks"].any()

    torch.manual_seed(0)
    # The references build models as ``get_model(name, weights=..., weights_backbone=..., num_classes=...,
    # trainable_backbone_layers=...)``; labels are COCO category ids (1..3 here), hence num_classes = 4.
    model = torchvision.models.get_model("retinanet_spinenet49s", weights=None, weights_backbone=None,
                                         num_classes=4, trainable_backbone_layers=None, image_size=128)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=4e-5)
    # drop_last as theirs (a BatchSampler with drop_last=True): training BN needs two values per channel at P7.
    loader = torch.utils.data.DataLoader(train_set, batch_size=2, shuffle=True, drop_last=True, collate_fn=collate)
    losses = train_one_epoch(model, optimizer, loader)
    assert len(losses) == len(train_set) // 2 and all(
        set(row) == {"classification", "bbox_regression"} for row in losses
    )

    val_loader = torch.utils.data.DataLoader(val_set, batch_size=2, collate_fn=collate)
    outputs, stats = evaluate(model, val_loader, val_set.coco)
    assert len(outputs) == len(val_set) and len(stats) == 12
    for target, output in outputs:
        assert set(output) == {"boxes", "scores", "labels"} and output["labels"].dtype == torch.int64
        assert output["boxes"].shape == (len(output["scores"]), 4)
        image_info = val_set.coco.imgs[target["image_id"]]
        height, width = image_info["height"], image_info["width"]
        if len(output["boxes"]):  # original-image coordinates
            assert output["boxes"][:, 2].max() <= width + 1e-3 and output["boxes"][:, 3].max() <= height + 1e-3
            assert output["labels"].min() >= 0 and output["labels"].max() < 4
