"""Any COCO-format detection dataset (image folder + instances JSON) as (image, target) pairs for detectors.

Targets: ``boxes`` (K, 4) float XYXY in image pixels, ``labels`` (K,) int64 contiguous in [0, num_classes) (plus
``label_offset``: 1 for detectors whose class 0 is the background, Mask R-CNN), ``image_id`` int, and with
``masks=True`` ``masks`` (K, H, W) uint8 from the ``segmentation`` polygons or RLE. Crowd annotations are dropped;
images without annotations give K = 0.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert


@dataclass(frozen=True)
class LabelMap:
    """COCO category id <-> contiguous label (the category's index in ascending id order)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> LabelMap:
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    @classmethod
    def from_dict(cls, data: dict) -> LabelMap:
        return cls(tuple(data["category_ids"]), tuple(data["names"]))

    def to_dict(self) -> dict:
        """Plain lists, safe for ``torch.load(weights_only=True)``."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_labels(self, category_ids: torch.Tensor) -> torch.Tensor:
        lookup = {cid: label for label, cid in enumerate(self.category_ids)}
        return torch.tensor([lookup[int(c)] for c in category_ids], dtype=torch.int64)

    def to_category_ids(self, labels: torch.Tensor) -> list[int]:
        return [self.category_ids[int(label)] for label in labels]


def read_instances(ann_file: str | Path) -> dict:
    """Load and minimally validate a COCO instances JSON; clear errors for a missing or malformed file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {ann_file} is not COCO instances format: a {type(data).__name__}, not an "
                         "object with lists images, annotations, categories")  # fmt: skip
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"annotation file {ann_file} is not COCO instances format: missing lists {missing}")
    if not data["categories"]:
        raise ValueError(f"annotation file {ann_file} has no categories")
    check_entries(data, ann_file)
    return data


def check_entries(data: dict, ann_file: Path) -> None:
    """Every category, image and annotation has the fields training reads, of the right kind, and every
    annotation names a known image and category: ``ValueError`` naming the file, the entry and the field."""

    def fail(kind: str, index: int, entry, problem: str):
        raise ValueError(f"annotation file {ann_file}: {kind}[{index}] {problem}, got {json.dumps(entry)[:200]}")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for i, category in enumerate(data["categories"]):
        if not (isinstance(category, dict) and is_int(category.get("id")) and isinstance(category.get("name"), str)):
            fail("categories", i, category, "must have an int 'id' and a str 'name'")
    for i, image in enumerate(data["images"]):
        if not (isinstance(image, dict) and is_int(image.get("id")) and isinstance(image.get("file_name"), str)):
            fail("images", i, image, "must have an int 'id' and a str 'file_name'")
    ids: dict[str, set[int]] = {"categories": set(), "images": set()}
    for kind, seen in ids.items():
        for i, entry in enumerate(data[kind]):
            if entry["id"] in seen:
                fail(kind, i, entry, f"repeats the 'id' {entry['id']} of an earlier entry: ids must be unique")
            seen.add(entry["id"])
    category_ids, image_ids = ids["categories"], ids["images"]
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            fail("annotations", i, ann, "must be an object")
        box = ann.get("bbox")
        numbers = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not (numbers and all(math.isfinite(v) for v in box) and box[2] >= 0 and box[3] >= 0):
            fail("annotations", i, ann, "must have a 'bbox' [x, y, width, height] of 4 finite numbers, width and "
                                        "height >= 0")  # fmt: skip
        category_id, image_id = ann.get("category_id"), ann.get("image_id")
        if not (is_int(category_id) and category_id in category_ids):
            fail("annotations", i, ann, f"has a 'category_id' not among the categories {sorted(category_ids)}")
        if not (is_int(image_id) and image_id in image_ids):
            fail("annotations", i, ann, "has an 'image_id' not among the images")


class CocoDetectionDataset(Dataset):
    """COCO-format dataset read from its instances JSON (no pycocotools: training needs none).

    Images are in ascending image-id order, as torchvision's ``CocoDetection`` orders them. ``transforms`` are
    torchvision transforms v2 applied to (PIL image, target with XYXY ``BoundingBoxes``).
    """

    def __init__(self, image_root: str | Path, ann_file: str | Path, transforms=None, *, masks: bool = False,
                 label_offset: int = 0) -> None:  # fmt: skip
        self.ann_file = Path(ann_file)
        self.instances = read_instances(ann_file)
        self.label_map = LabelMap.from_categories(self.instances["categories"])
        if not Path(image_root).is_dir():
            raise FileNotFoundError(f"image folder {image_root} does not exist")
        self.image_root = Path(image_root)
        self.images = sorted(self.instances["images"], key=lambda image: image["id"])
        self.annotations: dict[int, list[dict]] = defaultdict(list)
        for annotation in self.instances["annotations"]:
            self.annotations[annotation["image_id"]].append(annotation)
        self.transforms = transforms
        self.masks, self.label_offset = masks, label_offset

    @functools.cached_property
    def coco(self):
        """The pycocotools ``COCO`` object of the annotations (ground truth for evaluation; imported here only)."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.instances
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        path = self.image_root / info["file_name"]
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except (OSError, SyntaxError) as exc:  # PIL: missing, unidentified or truncated files
            raise OSError(f"image {path} (image id {info['id']}) cannot be read: {exc}") from exc
        annotations = [a for a in self.annotations[info["id"]] if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(
            box_convert(xywh, "xywh", "xyxy"), format="XYXY", canvas_size=(image.height, image.width)
        )
        category_ids = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        labels = self.label_map.to_labels(category_ids) + self.label_offset
        target = {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}
        if self.masks:
            masks = [annotation_mask(a, image.height, image.width, self.ann_file) for a in annotations]
            stacked = torch.stack(masks) if masks else torch.zeros(0, image.height, image.width, dtype=torch.uint8)
            target["masks"] = tv_tensors.Mask(stacked)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def annotation_mask(annotation: dict, height: int, width: int, ann_file: Path) -> torch.Tensor:
    """The (height, width) uint8 mask of a COCO annotation's ``segmentation``: polygons (a list of flat [x, y, ...]
    lists, merged), an uncompressed RLE (``counts`` a list) or a compressed one (``counts`` a string). The checks run
    before pycocotools (a core dependency that evaluation-only installs may lack) is imported."""
    segmentation = annotation.get("segmentation")
    problem = None
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if not segmentation or len(polygons) < len(segmentation) or any(len(p) < 6 or len(p) % 2 for p in polygons):
            problem = "polygons must be lists of at least 3 (x, y) points"
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (list, str)):
        if list(segmentation.get("size", [])) != [height, width]:
            problem = f"an RLE's size must be the image's [height, width] = [{height}, {width}]"
    else:
        problem = "a 'segmentation' (polygons or RLE) is needed for masks"
    if problem is not None:
        raise ValueError(f"annotation file {ann_file}: annotation {annotation.get('id')} of image "
                         f"{annotation.get('image_id')}: {problem}, got {json.dumps(segmentation)[:200]}")  # fmt: skip
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return torch.from_numpy(mask_utils.decode(rle))


def collate(batch):
    """List of (image, target) -> (list of images, list of targets with plain-tensor boxes and masks)."""
    images, targets = zip(*batch)
    plain = [{**t, "boxes": t["boxes"].as_subclass(torch.Tensor).float()} for t in targets]
    for target in plain:
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
    return list(images), plain
