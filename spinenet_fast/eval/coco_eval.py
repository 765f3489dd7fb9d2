"""COCO box evaluation with pycocotools: predictions -> results JSON rows -> the 12 named ``COCOeval`` stats.

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


@torch.no_grad()
def predict(model, data_loader, device: torch.device, label_map: LabelMap, *, progress: bool = True) -> list[dict]:
    """Run the detector in eval mode; COCO results rows ``{image_id, category_id, bbox: xywh, score}``.

    Boxes come back in original-image coordinates (the detector's transform undoes its own resize).
    """
    model.eval()
    results = []
    for images, targets in tqdm(data_loader, desc="eval", disable=not progress, leave=False):
        detections = model([image.to(device, non_blocking=True) for image in images])
        for target, det in zip(targets, detections):
            boxes = det["boxes"].float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            category_ids = label_map.to_category_ids(det["labels"].cpu())
            for box, score, category_id in zip(xywh, det["scores"].float().cpu().tolist(), category_ids):
                results.append(
                    {"image_id": int(target["image_id"]), "category_id": category_id, "bbox": box, "score": score}
                )
    return results


def coco_stats(coco_gt: COCO, results: list[dict]) -> dict[str, float]:
    """``COCOeval`` (bbox) of ``results`` against ``coco_gt``; all zeros when there is no detection at all."""
    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def format_stats(stats: dict[str, float]) -> str:
    """The stats as two aligned lines (AP row, AR row); pycocotools' -1 ("no ground truth of that size") as n/a."""
    cells = [f"{name} {'n/a' if stats[name] == -1 else f'{stats[name]:.3f}'}" for name in STAT_NAMES if name in stats]
    lines = ["  ".join(cells[:6]), "  ".join(cells[6:])]
    if any(stats.get(name) == -1 for name in STAT_NAMES):
        lines.append("n/a: the split has no ground-truth objects of that size (pycocotools reports -1)")
    return "\n".join(line for line in lines if line)
