"""Datasets: a COCO-format reader and its transforms; ``data.synthetic`` generates a synthetic COCO-format set."""

from .coco import CocoDetectionDataset, LabelMap, collate, read_instances
from .transforms import eval_transforms, train_transforms

__all__ = [
    "CocoDetectionDataset",
    "LabelMap",
    "collate",
    "eval_transforms",
    "read_instances",
    "train_transforms",
]
