"""COCO evaluation: a perfect detector scores AP 1.0, no detections score 0, results JSON rows are COCO's."""

import pytest
import torch

from spinenet_fast.data import LabelMap
from spinenet_fast.eval import STAT_NAMES, all_stats, coco_stats, predict
from spinenet_fast.eval.coco_eval import encode_masks, format_stats

from ..conftest import require_optional

COCO = require_optional("pycocotools.coco").COCO


@pytest.fixture()
def coco_gt():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 9, "bbox": [50, 40, 40, 30], "area": 1200, "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
    }
    coco.createIndex()
    return coco


def test_perfect_detections_score_one(coco_gt):
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in coco_gt.dataset["annotations"]
    ]
    stats = coco_stats(coco_gt, results)
    assert list(stats) == list(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_wrong_class_scores_zero_and_empty_is_zeros(coco_gt):
    results = [{"image_id": 1, "category_id": 9, "bbox": [10, 10, 30, 20], "score": 0.9}]
    assert coco_stats(coco_gt, results)["AP50"] == pytest.approx(0.0)
    assert coco_stats(coco_gt, []) == dict.fromkeys(STAT_NAMES, 0.0)


class FixedDetector(torch.nn.Module):
    """Returns one XYXY box with label 1 per image, whatever the input."""

    def forward(self, images):
        return [
            {"boxes": torch.tensor([[50.0, 40, 90, 70]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}
            for _ in images
        ]


def test_predict_writes_xywh_and_original_category_ids(coco_gt):
    loader = [([torch.zeros(3, 80, 100)], [{"image_id": 2}])]
    results = predict(FixedDetector(), loader, torch.device("cpu"), LabelMap((5, 9), ("a", "b")), progress=False)
    assert results == [{"image_id": 2, "category_id": 9, "bbox": [50.0, 40.0, 40.0, 30.0], "score": pytest.approx(0.8)}]
    assert coco_stats(coco_gt, results)["AP50"] == pytest.approx(0.5)  # one of two classes found perfectly


class FixedMaskDetector(torch.nn.Module):
    """Mask R-CNN-like: label 2 (class 1 after the background) with the ground-truth box of image 2 and a mask
    probability map covering it (0.9 inside, 0.2 outside)."""

    def forward(self, images):
        masks = torch.full((1, 1, 80, 100), 0.2)
        masks[..., 40:70, 50:90] = 0.9
        box = torch.tensor([[50.0, 40, 90, 70]])
        return [{"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.tensor([2]), "masks": masks}
                for _ in images]  # fmt: skip


def test_predicted_masks_are_rles_and_score_segm_ap(coco_gt):
    """Masks -> RLE rows (thresholded at 0.5, JSON-ready) -> ``segm_`` stats; the label offset maps label 2 to the
    label map's second category."""
    for annotation in coco_gt.dataset["annotations"]:  # the boxes as polygons
        x, y, w, h = annotation["bbox"]
        annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    coco_gt.createIndex()
    loader = [([torch.zeros(3, 80, 100)], [{"image_id": 2}])]
    results = predict(FixedMaskDetector(), loader, torch.device("cpu"), LabelMap((5, 9), ("a", "b")), label_offset=1,
                      progress=False)  # fmt: skip
    assert (
        len(results) == 1 and results[0]["category_id"] == 9 and isinstance(results[0]["segmentation"]["counts"], str)
    )
    stats = all_stats(coco_gt, results)
    assert list(stats) == list(STAT_NAMES) + [f"segm_{name}" for name in STAT_NAMES]
    assert stats["segm_AP50"] == pytest.approx(0.5) and stats["AP50"] == pytest.approx(0.5)
    assert all_stats(coco_gt, [{k: v for k, v in results[0].items() if k != "segmentation"}]).keys() == set(STAT_NAMES)
    shifted = dict(results[0], segmentation=encode_masks(FixedMaskDetector()([None])[0]["masks"].roll(20, -1))[0])
    assert all_stats(coco_gt, [shifted])["segm_AP50"] == pytest.approx(0.0)  # the box is right, the mask is not
    assert encode_masks(torch.zeros(0, 1, 80, 100)) == []


def test_format_stats_reads_minus_one_as_not_applicable():
    stats = dict.fromkeys(STAT_NAMES, 0.5) | {"APl": -1.0, "ARl": -1.0}
    lines = format_stats(stats).splitlines()
    assert lines[0] == "AP 0.500  AP50 0.500  AP75 0.500  APs 0.500  APm 0.500  APl n/a"
    assert lines[1] == "AR1 0.500  AR10 0.500  AR100 0.500  ARs 0.500  ARm 0.500  ARl n/a"
    assert "no ground-truth objects of that size" in lines[2]
    assert len(format_stats(dict.fromkeys(STAT_NAMES, 0.0)).splitlines()) == 2
    segm = format_stats(dict.fromkeys(STAT_NAMES, 0.0) | {f"segm_{name}": 0.25 for name in STAT_NAMES}).splitlines()
    assert len(segm) == 4 and segm[2].startswith("segm_AP 0.250  segm_AP50 0.250")
