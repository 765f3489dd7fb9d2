"""A deterministic synthetic shapes dataset in COCO format, generated locally.

``python -m spinenet_fast.data.synthetic ROOT`` writes it.

Layout (the COCO 2017 one): ``ROOT/{train2017,val2017}/*.png`` and ``ROOT/annotations/instances_{split}.json``.
Shapes (circle, square, triangle) of varied sizes and colours, some overlapping, on textured backgrounds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ELLIPSE_POINTS = 32
CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"})


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Muted colour gradient + noise + a few faint lines: (size, size) RGB, darker and greyer than the shapes."""
    corners = rng.uniform(30, 150, size=(2, 2, 3))
    t = np.linspace(0, 1, size)[:, None, None]
    u = np.linspace(0, 1, size)[None, :, None]
    top = corners[0, 0] * (1 - u) + corners[0, 1] * u
    bottom = corners[1, 0] * (1 - u) + corners[1, 1] * u
    pixels = top * (1 - t) + bottom * t + rng.normal(0, 8, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(60, 180, 3)), width=1)
    return image


def _shape_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated, bright colour (HSV S, V >= 0.6), so shapes stand out from the muted background."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1), rng.uniform(0.75, 1)
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), int(saturation * 255), int(value * 255))).convert("RGB")
    return rgb.getpixel((0, 0))


def _outline(category: int, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The shape's polygon in pixel coordinates: the ellipse of a circle sampled at 32 points, a square's corners, a
    triangle's apex and base corners."""
    x1, y1, x2, y2 = box
    if category == 1:
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        angles = (2 * math.pi * k / ELLIPSE_POINTS for k in range(ELLIPSE_POINTS))
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]
    if category == 2:
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    return [((x1 + x2) / 2, y1), (x2, y2), (x1, y2)]


def _draw_shape(draw: ImageDraw.ImageDraw, category: int, box: tuple[float, float, float, float], colour) -> None:
    if category == 1:
        draw.ellipse(box, fill=colour)
    elif category == 2:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(_outline(category, box), fill=colour)


def _polygon_area(points: list[tuple[float, float]]) -> float:
    """The shoelace formula."""
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def make_split(root: Path, split: str, num_images: int, image_size: int, seed: int) -> Path:
    """Write ``num_images`` images and their instances JSON; returns the JSON path."""
    rng = np.random.default_rng(seed)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image = _background(rng, image_size)
        draw = ImageDraw.Draw(image)
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(rng.integers(0, 5)):  # some images have no objects at all
            side = float(rng.uniform(0.15, 0.5) * image_size)
            aspect = float(rng.uniform(0.75, 1.33))
            w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
            x1 = float(rng.uniform(0, image_size - w))
            y1 = float(rng.uniform(0, image_size - h))
            box = (round(x1), round(y1), round(x1 + w), round(y1 + h))
            if any(_iou(box, other) > 0.3 for other in boxes):
                continue
            category = int(rng.integers(1, len(CATEGORIES) + 1))
            _draw_shape(draw, category, box, _shape_colour(rng))
            boxes.append(box)
            w, h = box[2] - box[0], box[3] - box[1]
            outline = _outline(category, box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [box[0], box[1], w, h],
                    "segmentation": [[round(c, 2) for point in outline for c in point]],  # COCO polygon
                    "area": round(_polygon_area(outline), 2),  # COCO's area is the mask's
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:06d}.png"
        image.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    ann_file = ann_dir / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(CATEGORIES)}))
    return ann_file


def make_synthetic_coco(
    root: str | Path, *, num_train: int = 600, num_val: int = 100, image_size: int = 128, seed: int = 0
) -> Path:
    """Generate the train2017 and val2017 splits under ``root`` (deterministic in ``seed``); returns ``root``."""
    for name, value, least in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 32)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    root = Path(root)
    make_split(root, "train2017", num_train, image_size, seed)
    make_split(root, "val2017", num_val, image_size, seed + 1)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_synthetic_coco(
        args.root, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed
    )
    print(f"synthetic COCO dataset written to {args.root}")


if __name__ == "__main__":
    main()
