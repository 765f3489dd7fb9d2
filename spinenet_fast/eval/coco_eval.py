"""COCO box and mask evaluation with pycocotools: predictions -> results JSON rows -> the 12 named ``COCOeval``
stats per kind (``AP`` …, and ``segm_AP`` … for detectors that predict masks).

pycocotools is imported by :func:`coco_stats` alone, so that training, the GPU tests and the benchmarks run
where it is not installed.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..data.coco import LabelMap

if TYPE_CHECKING:
    from pycocotools.coco import COCO

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
SEGM_PREFIX = "segm_"
MASK_THRESHOLD = 0.5  # torchvision's (and Model Garden's) binarisation of the predicted mask probabilities


@torch.no_grad()
def predict(model, data_loader, device: torch.device, label_map: LabelMap, *, label_offset: int = 0,
            progress: bool = True) -> list[dict]:  # fmt: skip
    """Run the detector in eval mode; COCO results rows ``{image_id, category_id, bbox: xywh, score}``, plus
    ``segmentation`` (a compressed RLE of the mask thresholded at 0.5) for detectors that predict ``masks``.

    Boxes and masks come back in original-image coordinates (the detector's transform undoes its own resize).
    ``label_offset``: subtracted from the predicted labels before mapping them to category ids (1 for Mask R-CNN).
    """
    model.eval()
    results = []
    for images, targets in tqdm(data_loader, desc="eval", disable=not progress, leave=False):
        detections = model([image.to(device, non_blocking=True) for image in images])
        for target, det in zip(targets, detections):
            boxes = det["boxes"].float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            category_ids = label_map.to_category_ids(det["labels"].cpu() - label_offset)
            rows = [
                {"image_id": int(target["image_id"]), "category_id": category_id, "bbox": box, "score": score}
                for box, score, category_id in zip(xywh, det["scores"].float().cpu().tolist(), category_ids)
            ]
            if "masks" in det:
                for row, rle in zip(rows, encode_masks(det["masks"])):
                    row["segmentation"] = rle
            results += rows
    return results


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """(K, 1, H, W) mask probabilities -> K compressed RLEs (``counts`` as str, JSON-ready) of ``> 0.5``."""
    from pycocotools import mask as mask_utils

    binary = (masks[:, 0] > MASK_THRESHOLD).cpu().numpy().astype("uint8")
    rles = mask_utils.encode(binary.transpose(1, 2, 0).copy(order="F")) if len(binary) else []
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def coco_stats(coco_gt: COCO, results: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """``COCOeval`` (``iou_type`` ``"bbox"`` or ``"segm"``) of ``results`` against ``coco_gt``; all zeros when there is
    no detection at all."""
    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    from pycocotools.cocoeval import COCOeval

    # Copies: loadRes adds fields (id, area, a segmentation made from the bbox) to the rows it is given; for masks,
    # rows without their bbox (loadRes would take the bbox's segmentation).
    skip = "bbox" if iou_type == "segm" else None
    results = [{k: v for k, v in row.items() if k != skip} for row in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def all_stats(coco_gt: COCO, results: list[dict]) -> dict[str, float]:
    """The box stats, and the mask stats (``segm_`` names) when the results have segmentations."""
    stats = coco_stats(coco_gt, results)
    if any("segmentation" in row for row in results):
        stats.update({SEGM_PREFIX + k: v for k, v in coco_stats(coco_gt, results, "segm").items()})
    return stats


def format_stats(stats: dict[str, float]) -> str:
    """The stats as two aligned lines (AP row, AR row) per kind (box, then mask: ``segm_AP`` …); pycocotools' -1
    ("no ground truth of that size") as n/a."""
    lines = []
    for prefix in ("", SEGM_PREFIX):
        names = [prefix + name for name in STAT_NAMES if prefix + name in stats]
        cells = [f"{name} {'n/a' if stats[name] == -1 else f'{stats[name]:.3f}'}" for name in names]
        lines += ["  ".join(cells[:6]), "  ".join(cells[6:])]
    if any(value == -1 for value in stats.values()):
        lines.append("n/a: the split has no ground-truth objects of that size (pycocotools reports -1)")
    return "\n".join(line for line in lines if line)
