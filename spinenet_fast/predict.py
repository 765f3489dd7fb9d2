"""``python -m spinenet_fast.predict --checkpoint C IMAGE... --out DIR``: run a trained detector on images and look
at what it finds.

Writes ``DIR/<image stem>.png`` (the image with its detections drawn by ``torchvision.utils.draw_bounding_boxes``,
labelled with the checkpoint's class names and scores) and ``DIR/predictions.json`` (COCO results format, one entry
per detection: ``image_id`` (1-based position in the argument list), ``file_name``, ``category_id``, ``bbox`` [x, y,
w, h] in image pixels, ``score``), and prints each image's latency (the detector's forward, preprocessing included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from .data import LabelMap
from .detection.presets import detector_from_args, label_offset
from .train.checkpoint import load_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a spinenet_fast training checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="draw and report detections scoring at least this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB; a clear error naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as file:
            return pil_to_tensor(file.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise OSError(f"image {path} cannot be read: {exc}") from exc


def draw(image: torch.Tensor, detections: dict, label_map: LabelMap) -> torch.Tensor:
    """The uint8 image with each detection's box and "name score" drawn."""
    names = [f"{label_map.names[int(label)]} {score:.2f}" for label, score in zip(detections["labels"],
                                                                                  detections["scores"])]  # fmt: skip
    if not names:
        return image
    return draw_bounding_boxes(image, detections["boxes"], labels=names, colors="yellow", width=2)


def load_detector(path: Path, device: torch.device, score_thresh: float) -> tuple[torch.nn.Module, LabelMap]:
    """The checkpoint's detector in eval mode on ``device``, reporting detections scoring at least ``score_thresh``,
    and its label map."""
    checkpoint = load_checkpoint(path)
    label_map = LabelMap.from_dict(checkpoint["label_map"])
    model = detector_from_args(checkpoint["args"], len(label_map))
    model.load_state_dict(checkpoint["model"])
    # The detector's own candidate filter (RetinaNet's, or Mask R-CNN's RoI heads'): this threshold decides.
    getattr(model, "roi_heads", model).score_thresh = score_thresh
    model.label_offset = label_offset(checkpoint["args"])  # detect() maps labels back to the label map's
    return model.to(device).eval(), label_map


def detect(model: torch.nn.Module, image: torch.Tensor, device: torch.device) -> tuple[dict, float]:
    """``(detections on the CPU, latency in ms)`` for one (3, H, W) uint8 image; labels index the label map."""
    start = time.perf_counter()
    with torch.no_grad():
        (detections,) = model([image.to(device).float() / 255])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    detections = {key: value.cpu() for key, value in detections.items()}
    detections["labels"] = detections["labels"] - getattr(model, "label_offset", 0)
    return detections, 1000 * (time.perf_counter() - start)


def save_grid(model, label_map: LabelMap, images: list[torch.Tensor], ground_truth: list[torch.Tensor],
              path: Path, device: torch.device) -> None:  # fmt: skip
    """One PNG of the images (uint8 (3, H, W), same size), ground-truth boxes (XYXY) in green under the detections."""
    drawn = []
    for image, boxes in zip(images, ground_truth):
        if len(boxes):
            image = draw_bounding_boxes(image, boxes, colors="lime", width=1)
        drawn.append(draw(image, detect(model, image, device)[0], label_map))
    grid = make_grid(drawn, nrow=min(4, len(drawn)), padding=4, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main(argv: list[str] | None = None) -> list[dict]:
    """Predict, draw and write; returns the COCO-format results."""
    args = get_args_parser().parse_args(argv)
    if not 0 <= args.score_thresh <= 1:
        raise ValueError(f"--score-thresh must be a number in [0, 1], got {args.score_thresh}")
    device = torch.device(args.device)
    model, label_map = load_detector(args.checkpoint, device, args.score_thresh)
    images = [read_image(path) for path in args.images]  # every file checked before any work
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for image_id, (path, image) in enumerate(zip(args.images, images), start=1):
        detections, latency_ms = detect(model, image, device)
        Image.fromarray(draw(image, detections, label_map).permute(1, 2, 0).numpy()).save(args.out / f"{path.stem}.png")
        for box, label, score in zip(detections["boxes"].tolist(), detections["labels"], detections["scores"]):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "file_name": path.name,
                            "category_id": label_map.category_ids[int(label)], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score)})  # fmt: skip
        print(f"{path}: {len(detections['scores'])} detections, {latency_ms:.1f} ms", flush=True)
    (args.out / "predictions.json").write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
