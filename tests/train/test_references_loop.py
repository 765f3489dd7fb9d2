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

import spinenet_fast  # noqa: F401  (registers retinanet_spinenet* and maskrcnn_spinenet* with torchvision's get_model)

from ..conftest import require_optional

COCO = require_optional("pycocotools.coco").COCO
COCOeval = require_optional("pycocotools.cocoeval").COCOeval
mask_utils = require_optional("pycocotools.mask")


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
    """The references' loop for the first epoch: a linear warm-up from 0.001 × lr over the epoch, sum the loss
    dict, stop on a non-finite loss, step."""
    model.train()
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / 1000, total_iters=min(1000, len(loader) - 1)
    )
    losses = []
    for images, targets in loader:
        loss_dict = model(list(images), [dict(t) for t in targets])
        loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            raise AssertionError(f"loss is {loss.item()}, stopping training: {loss_dict}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
        losses.append({k: v.item() for k, v in loss_dict.items()})
    return losses


@torch.no_grad()
def precise_bn(model, loader):
    """Recompute every BN's running statistics as the mean over ``loader``'s training batches (detectron2's
    PreciseBN): the references evaluate after thousands of steps, these tests after four, when the official BN
    momentum (0.01) has left the running statistics at their initial 0 / 1 and eval-mode features unnormalised."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    for images, targets in loader:
        model(list(images), [dict(t) for t in targets])


@torch.no_grad()
def evaluate(model, loader, coco_gt, iou_types=("bbox",)):
    """The references' ``evaluate`` + ``CocoEvaluator``: outputs keyed by image id, xyxy -> xywh rows (bbox); masks
    thresholded at 0.5 and RLE-encoded in Fortran order (segm). Returns the outputs and the stats per IoU type."""
    model.eval()
    outputs, rows = [], {iou_type: [] for iou_type in iou_types}
    for images, targets in loader:
        for target, output in zip(targets, model(list(images))):
            outputs.append((target, output))
            xywh = torchvision.ops.box_convert(output["boxes"], "xyxy", "xywh").tolist()
            for i, (box, score, label) in enumerate(zip(xywh, output["scores"].tolist(), output["labels"].tolist())):
                row = {"image_id": target["image_id"], "category_id": label, "score": score}
                rows["bbox"].append({**row, "bbox": box})
                if "segm" in iou_types:
                    binary = (output["masks"][i, 0] > 0.5).numpy().astype("uint8")
                    rle = mask_utils.encode(binary[:, :, None].copy(order="F"))[0]
                    rows["segm"].append({**row, "segmentation": {**rle, "counts": rle["counts"].decode()}})
    stats = {}
    for iou_type in iou_types:
        coco_dt = coco_gt.loadRes(rows[iou_type]) if rows[iou_type] else COCO()  # theirs: no detection, no loadRes
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats[iou_type] = evaluator.stats
    return outputs, stats


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
    assert len(outputs) == len(val_set) and len(stats["bbox"]) == 12
    for target, output in outputs:
        assert set(output) == {"boxes", "scores", "labels"} and output["labels"].dtype == torch.int64
        assert output["boxes"].shape == (len(output["scores"]), 4)
        image_info = val_set.coco.imgs[target["image_id"]]
        height, width = image_info["height"], image_info["width"]
        if len(output["boxes"]):  # original-image coordinates
            assert output["boxes"][:, 2].max() <= width + 1e-3 and output["boxes"][:, 3].max() <= height + 1e-3
            assert output["labels"].min() >= 0 and output["labels"].max() < 4


def test_reference_loop_trains_and_evaluates_mask_rcnn(tiny_data):
    """The same contract for ``maskrcnn_spinenet49s``: the references' targets carry the polygons' masks, the model
    returns (K, 1, H, W) mask probabilities in original-image coordinates, and their evaluator scores bbox and segm."""
    train_set = reference_dataset(tiny_data, "train2017", train=True)
    val_set = reference_dataset(tiny_data, "val2017", train=False)
    torch.manual_seed(0)
    model = torchvision.models.get_model("maskrcnn_spinenet49s", weights=None, weights_backbone=None,
                                         num_classes=4, trainable_backbone_layers=None, image_size=128)  # fmt: skip
    assert isinstance(model, torchvision.models.detection.MaskRCNN)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=4e-5)
    loader = torch.utils.data.DataLoader(train_set, batch_size=2, shuffle=True, drop_last=True, collate_fn=collate)
    losses = train_one_epoch(model, optimizer, loader)
    names = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert len(losses) == len(train_set) // 2 and all(set(row) == names for row in losses)

    precise_bn(model, loader)
    model.roi_heads.score_thresh = 0.0  # one epoch on 8 images: keep every detection, so that masks are scored
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=2, collate_fn=collate)
    outputs, stats = evaluate(model, val_loader, val_set.coco, iou_types=("bbox", "segm"))
    assert len(outputs) == len(val_set) and len(stats["bbox"]) == len(stats["segm"]) == 12
    assert sum(len(output["boxes"]) for _, output in outputs) > 0
    for target, output in outputs:
        image_info = val_set.coco.imgs[target["image_id"]]
        assert set(output) == {"boxes", "scores", "labels", "masks"}
        assert output["masks"].shape == (len(output["boxes"]), 1, image_info["height"], image_info["width"])
        assert output["masks"].numel() == 0 or (output["masks"].min() >= 0 and output["masks"].max() <= 1)
