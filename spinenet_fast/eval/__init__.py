"""COCO evaluation of detectors (``python -m spinenet_fast.eval``)."""

from .coco_eval import STAT_NAMES, all_stats, coco_stats, predict

__all__ = ["STAT_NAMES", "all_stats", "coco_stats", "predict"]
