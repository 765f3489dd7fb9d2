"""``python -m spinenet_fast.eval``: COCO box AP (and mask AP, for Mask R-CNN) of a training checkpoint on a
COCO-format split.

Writes ``coco_results.json`` (xywh boxes, original category ids, original-image coordinates; RLE segmentations for
Mask R-CNN) and ``coco_stats.json`` (the 12 named ``COCOeval`` stats, and ``segm_AP`` … for masks; -1 where the split
has no object of that size) to ``--output-dir`` and prints the stats.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import CocoDetectionDataset, LabelMap, collate, eval_transforms
from ..detection.presets import detector_from_args, label_offset
from ..train.checkpoint import load_checkpoint
from ..train.engine import evaluate
from .coco_eval import format_stats


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data-path", type=Path, required=True, help="dataset root (COCO 2017 layout)")
    p.add_argument("--split", default="val2017")
    p.add_argument("--output-dir", type=Path, default=Path("runs/eval"))
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    checkpoint = load_checkpoint(args.checkpoint)
    dataset = CocoDetectionDataset(
        args.data_path / args.split, args.data_path / "annotations" / f"instances_{args.split}.json", eval_transforms(),
        label_offset=label_offset(checkpoint["args"]),
    )  # fmt: skip
    label_map = LabelMap.from_dict(checkpoint["label_map"])
    if label_map != dataset.label_map:
        raise ValueError(f"checkpoint {args.checkpoint} was trained on other categories than {args.split}")
    device = torch.device(args.device)
    model = detector_from_args(checkpoint["args"], len(label_map)).to(device)
    model.load_state_dict(checkpoint["model"])
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    stats = evaluate(model, loader, device, label_map, args.output_dir)
    print(format_stats(stats))
    print(f"written to {(args.output_dir / 'coco_stats.json').resolve()}")
    return stats


if __name__ == "__main__":
    main()
