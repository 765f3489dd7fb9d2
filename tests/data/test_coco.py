"""The COCO-format reader: label map, crowd boxes, empty images, bad files; the synthetic generator."""

import json

import pytest
import torch
from PIL import Image

from spinenet_fast.data import CocoDetectionDataset, LabelMap, collate, train_transforms
from spinenet_fast.data.synthetic import make_synthetic_coco

from ..conftest import require_optional


@pytest.fixture()
def tiny_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2):
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(images / f"{i}.png")
    ann = {
        "images": [
            {"id": 1, "file_name": "1.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "2.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(ann))
    return images, ann_file


def test_label_map_crowd_and_empty_images(tiny_coco):
    dataset = CocoDetectionDataset(*tiny_coco)
    assert dataset.label_map == LabelMap((3, 7), ("three", "seven"))
    _, target = dataset[0]
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor).float(), torch.tensor([[1.0, 2, 11, 22], [30, 5, 50, 15]])
    )
    assert target["labels"].tolist() == [1, 0]  # category 7 -> label 1, category 3 -> label 0, crowd dropped
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["image_id"] == 2
    assert dataset.label_map.to_category_ids(torch.tensor([1, 0])) == [7, 3]
    assert LabelMap.from_dict(dataset.label_map.to_dict()) == dataset.label_map


def test_train_transforms_give_square_float_images_and_plain_tensor_targets(tiny_coco):
    torch.manual_seed(0)
    dataset = CocoDetectionDataset(*tiny_coco, transforms=train_transforms(128))
    images, targets = collate([dataset[0], dataset[1]])
    assert all(image.shape == (3, 128, 128) and image.dtype == torch.float32 for image in images)
    assert type(targets[0]["boxes"]) is torch.Tensor and targets[0]["boxes"].dtype == torch.float32
    boxes = targets[0]["boxes"]
    assert torch.all(boxes[:, 2:] > boxes[:, :2]) and boxes.min() >= 0 and boxes.max() <= 128
    assert len(targets[0]["labels"]) == len(boxes)


def test_missing_and_malformed_annotation_files(tmp_path, tiny_coco):
    images, _ = tiny_coco
    with pytest.raises(FileNotFoundError, match=r"annotation file .*nope\.json does not exist"):
        CocoDetectionDataset(images, tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        CocoDetectionDataset(images, broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"not COCO instances format: missing lists \['annotations', 'categories'\]"):
        CocoDetectionDataset(images, wrong)
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoDetectionDataset(tmp_path / "no_images", tiny_coco[1])


def test_synthetic_dataset_is_deterministic_and_varied(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", num_train=12, num_val=3, image_size=128, seed=5)
    b = make_synthetic_coco(tmp_path / "b", num_train=12, num_val=3, image_size=128, seed=5)
    ann_a = json.loads((a / "annotations" / "instances_train2017.json").read_text())
    ann_b = json.loads((b / "annotations" / "instances_train2017.json").read_text())
    assert ann_a == ann_b
    assert (a / "train2017" / "000001.png").read_bytes() == (b / "train2017" / "000001.png").read_bytes()
    assert {c["name"] for c in ann_a["categories"]} == {"circle", "square", "triangle"}
    assert len({a["category_id"] for a in ann_a["annotations"]}) == 3
    sides = [max(a["bbox"][2:]) for a in ann_a["annotations"]]
    assert min(sides) < 30 < max(sides)
    assert len(json.loads((a / "annotations" / "instances_val2017.json").read_text())["images"]) == 3


def test_synthetic_annotations_carry_polygons_matching_the_drawn_shapes(tmp_path):
    """Every shape has a COCO ``segmentation`` polygon (torchvision's detection references read it) whose bounds are
    its box, whose area is the annotation's, and whose mask covers the pixels drawn in the shape's colour."""
    mask_utils = require_optional("pycocotools.mask")
    root = make_synthetic_coco(tmp_path, num_train=6, num_val=1, image_size=128, seed=2)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert data["annotations"]
    for ann in data["annotations"]:
        (polygon,) = ann["segmentation"]
        xs, ys = polygon[0::2], polygon[1::2]
        x, y, w, h = ann["bbox"]
        assert min(xs) == pytest.approx(x, abs=0.01) and max(xs) == pytest.approx(x + w, abs=0.01)
        assert min(ys) == pytest.approx(y, abs=0.01) and max(ys) == pytest.approx(y + h, abs=0.01)
        rle = mask_utils.frPyObjects([polygon], 128, 128)
        pixels = mask_utils.area(mask_utils.merge(rle))
        assert 0 < ann["area"] <= w * h and pixels == pytest.approx(ann["area"], rel=0.1)


@pytest.mark.parametrize(("kwargs", "match"), [({"num_train": -5}, "num_train must be an int >= 1, got -5"),
                                               ({"num_val": 0}, "num_val must be an int >= 1"),
                                               ({"image_size": 8}, "image_size must be an int >= 32")])  # fmt: skip
def test_synthetic_generator_refuses_bad_sizes(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_coco(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda d: d["annotations"][1].update(category_id=9),
            r"annotations\[1\] has a .category_id. not among",
        ),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\] must have a 'bbox' \[x, y, width"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), r"annotations\[0\] must have a 'bbox'"),
        (lambda d: d["annotations"][2].update(image_id=5), r"annotations\[2\] has an 'image_id' not among the images"),
        (lambda d: d["categories"][1].pop("name"), r"categories\[1\] must have an int 'id' and a str 'name'"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] must have an int 'id' and a str 'file_name'"),
    ],
)
def test_malformed_entries_are_named_at_load(tiny_coco, change, match):
    """Found when the dataset is built, naming the file, the entry and the field — not a KeyError mid-training."""
    images, ann_file = tiny_coco
    _edit(ann_file, change)
    with pytest.raises(ValueError, match=match):
        CocoDetectionDataset(images, ann_file)


@pytest.mark.parametrize("content", ["[]", "null"])
def test_annotation_file_that_is_not_an_object(tiny_coco, content):
    images, ann_file = tiny_coco
    ann_file.write_text(content)
    with pytest.raises(ValueError, match=r"is not COCO instances format: a (list|NoneType), not an object"):
        CocoDetectionDataset(images, ann_file)


def test_truncated_image_names_its_path(tiny_coco):
    images, ann_file = tiny_coco
    data = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"image .*1\.png \(image id 1\) cannot be read"):
        CocoDetectionDataset(images, ann_file)[0]


def _with_segmentations(tiny_coco) -> tuple:
    """tiny_coco with a polygon, a compressed RLE and an uncompressed RLE (crowd) segmentation."""
    mask_utils = require_optional("pycocotools.mask")
    import numpy as np

    images, ann_file = tiny_coco
    data = json.loads(ann_file.read_text())
    square = np.zeros((48, 64), np.uint8, order="F")
    square[5:15, 30:50] = 1
    rle = mask_utils.encode(square)
    data["annotations"][0]["segmentation"] = [[1, 2, 11, 2, 11, 22, 1, 22]]  # the box as a polygon
    data["annotations"][1]["segmentation"] = {"size": [48, 64], "counts": rle["counts"].decode()}
    data["annotations"][2]["segmentation"] = {"size": [48, 64], "counts": [0, 48 * 64]}  # crowd: dropped
    ann_file.write_text(json.dumps(data))
    return images, ann_file, torch.from_numpy(square)


def test_masks_from_polygons_and_rles_with_the_label_offset(tiny_coco):
    images, ann_file, square = _with_segmentations(tiny_coco)
    _, target = CocoDetectionDataset(images, ann_file, masks=True, label_offset=1)[0]
    masks = target["masks"]
    assert masks.shape == (2, 48, 64) and masks.dtype == torch.uint8
    assert target["labels"].tolist() == [2, 1]  # Mask R-CNN's labels: class 0 is the background
    assert torch.equal(masks[1], square)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)  # pycocotools rasterises the polygon to its pixels
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (1, 10, 2, 21) and masks[0].sum() == 200
    _, empty = CocoDetectionDataset(images, ann_file, masks=True)[1]
    assert empty["masks"].shape == (0, 48, 64)


def test_masks_follow_the_training_transforms(tiny_coco):
    images, ann_file, _ = _with_segmentations(tiny_coco)
    torch.manual_seed(0)
    dataset = CocoDetectionDataset(images, ann_file, train_transforms(128), masks=True)
    for _ in range(4):
        (image,), (target,) = collate([dataset[0]])
        masks, boxes = target["masks"], target["boxes"]
        assert type(masks) is torch.Tensor and masks.shape == (len(boxes), *image.shape[1:])
        for mask, box in zip(masks, boxes):  # each mask lies in its box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]


@pytest.mark.parametrize(
    ("segmentation", "match"),
    [
        (None, r"annotation 1 of image 1: a 'segmentation' \(polygons or RLE\) is needed for masks, got null"),
        ([[1, 2, 3, 4]], "polygons must be lists of at least 3"),
        ({"size": [10, 10], "counts": "abc"}, r"an RLE's size must be the image's \[height, width\] = \[48, 64\]"),
    ],
)
def test_bad_segmentations_are_named(tiny_coco, segmentation, match):
    images, ann_file = tiny_coco
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["segmentation"] = segmentation
    data["annotations"][1]["segmentation"] = [[30, 5, 50, 5, 50, 15]]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        CocoDetectionDataset(images, ann_file, masks=True)[0]
