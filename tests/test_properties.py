"""Property tests over the public API's argument space: one argument of a valid call is replaced by a value drawn
from valid and hostile ones (wrong types, NaN, infinities, zero, negatives, wrong shapes, dtypes and devices); the
call either raises a ``ValueError``/``TypeError`` whose message names that argument, or returns a correct result."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from spinenet_fast import SpineNet
from spinenet_fast.data import CocoDetectionDataset
from spinenet_fast.detection import retinanet_spinenet
from spinenet_fast.detection.presets import CUSTOM_SCALINGS
from spinenet_fast.ops import bn_finalize, bn_finalize_reference, conv1x1_bn_stats, conv1x1_bn_stats_reference

# derandomize: CI sees the same examples on every run (a failure reproduces); hypothesis still shrinks it.
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
CHEAP_PROPERTY = settings(PROPERTY, max_examples=200)  # ops on tiny tensors, the reader on a tiny file
TINY = CUSTOM_SCALINGS["49XS-custom"]

NUMBERS = st.one_of(
    st.sampled_from(
        [0, 1, 2, 3, 5, 7, 128, -1, -3, 0.0, 0.5, 1.0, 1.5, -0.5, 1e-3, 1e9, math.nan, math.inf, -math.inf]
    ),
    st.integers(-10, 300),
    st.floats(allow_nan=True, allow_infinity=True),
)
# Scaling values: hostile, but no model too large for the machine's memory (a 1e9 width is valid and needs ~TBs).
SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 8, 16, -1, -3, 0.0, 0.25, 0.5, 1.0, -0.5, "x", None, True]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(-2, 2),
)
JUNK = st.one_of(
    NUMBERS,
    st.sampled_from([None, True, False, "", "x", "49", "relu", [1], (3,), {}, torch.tensor(1.0), torch.zeros(2)]),
)


def assert_names(error: Exception, name: str) -> None:
    assert isinstance(error, (ValueError, TypeError)), f"{name}: {type(error).__name__}: {error}"
    assert name in str(error), f"the error for {name} does not name it: {error}"


def call_or_error(name: str, build, unreadable_file: bool = False):
    """``build()``'s result, or None when it raised a ValueError/TypeError naming ``name`` (or, with
    ``unreadable_file``, an OSError saying which file cannot be read); anything else fails."""
    try:
        return build()
    except OSError as error:
        assert unreadable_file and "cannot be read" in str(error), f"{name}: {error!r}"
        return None
    except Exception as error:
        assert_names(error, name)
        return None


SPINENET_ARGS = {
    "model_id": st.one_of(
        JUNK,
        st.sampled_from(["49S", "96", "foo"]),
        st.fixed_dictionaries(
            {
                "filter_size_scale": SIZES,
                "resample_alpha": SIZES,
                "block_repeats": SIZES,
                "endpoints_num_filters": SIZES,
            }
        ),
    ),
    "min_level": JUNK,
    "max_level": JUNK,
    "activation": st.one_of(JUNK, st.sampled_from(["swish", "relu", "gelu"])),
    "bn_momentum": JUNK,
    "bn_eps": JUNK,
    "stochastic_depth_rate": JUNK,
    "padding": st.one_of(JUNK, st.sampled_from(["torch", "tf_same", "same"])),
    "fused": st.one_of(JUNK, st.sampled_from([True, False, "auto", "yes"])),
}


@PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(SPINENET_ARGS)))
def test_spinenet_arguments(data, name):
    value = data.draw(SPINENET_ARGS[name], label=name)
    kwargs = {"model_id": TINY, name: value}
    model = call_or_error(name, lambda: SpineNet(**kwargs))
    if model is None:
        return
    with torch.no_grad():
        features = model.eval()(torch.randn(1, 3, 128, 128))
    levels = range(model.min_level, model.max_level + 1)
    assert list(features) == [f"p{level}" for level in levels]
    for level, feature in zip(levels, features.values()):
        assert feature.shape == (1, model.out_channels, 128 >> level, 128 >> level)
        assert feature.isfinite().all()


DETECTOR_ARGS = {
    name: st.one_of(JUNK, extra)
    for name, extra in {
        "num_classes": st.integers(1, 5),
        "image_size": st.sampled_from([128, 256, 100]),
        "anchor_size": st.floats(0.5, 8),
        "anchor_style": st.sampled_from(["torchvision", "tf", "other"]),
        "head_num_convs": st.integers(0, 4),
        "score_thresh": st.floats(0, 1),
        "nms_thresh": st.floats(0, 1),
        "detections_per_img": st.integers(0, 200),
        "topk_candidates": st.integers(0, 2000),
        "fg_iou_thresh": st.floats(0, 1),
        "bg_iou_thresh": st.floats(0, 1),
    }.items()
}


@PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(DETECTOR_ARGS)))
def test_detector_arguments(data, name):
    value = data.draw(DETECTOR_ARGS[name], label=name)
    kwargs = {"num_classes": 3, "image_size": 128, "score_thresh": 0.0, name: value}
    model = call_or_error(name, lambda: retinanet_spinenet(TINY, **kwargs))
    if model is None:
        return
    torch.manual_seed(0)
    with torch.no_grad():
        (detections,) = model.eval()([torch.rand(3, 96, 128)])
    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    assert len(boxes) == len(scores) == len(labels) <= model.detections_per_img
    assert (boxes >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    assert ((scores >= model.score_thresh) & (scores <= 1)).all()
    assert ((labels >= 0) & (labels < kwargs["num_classes"])).all()


def tensor_variants(shape, dtype=torch.float32):
    """The tensor itself, and hostile replacements for it."""
    good = torch.randn(shape, dtype=dtype)
    return st.sampled_from([
        good, good.double(), good.half(), good.to(torch.int64), good[..., :1], good.unsqueeze(0), good.flatten(),
        good.to("meta"), torch.empty(0), good.transpose(-1, -2) if good.dim() > 1 else good, None, 1.0, "x",
    ])  # fmt: skip


CONV_ARGS = {
    "x": tensor_variants((2, 6, 5, 7)),
    "weight": tensor_variants((4, 6, 1, 1)),
    "scale": tensor_variants((6,)),
    "shift": tensor_variants((6,)),
    "activation": st.one_of(JUNK, st.sampled_from(["identity", "relu", "swish", "gelu"])),
}


@CHEAP_PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(CONV_ARGS)))
def test_conv1x1_bn_stats_arguments(data, name):
    torch.manual_seed(0)
    args = {"x": torch.randn(2, 6, 5, 7), "weight": torch.randn(4, 6, 1, 1), "scale": torch.rand(6) + 0.5,
            "shift": torch.randn(6), "activation": "swish"}  # fmt: skip
    args[name] = data.draw(CONV_ARGS[name], label=name)
    result = call_or_error(name, lambda: conv1x1_bn_stats(**args))
    if result is None:
        return
    y, stats = result
    expected_y, expected_stats = conv1x1_bn_stats_reference(*args.values())
    torch.testing.assert_close(y, expected_y.to(y.dtype), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(stats, expected_stats, rtol=1e-3, atol=1e-2)


BN_ARGS = {
    "stats": tensor_variants((2, 5)),
    "count": JUNK,
    "weight": tensor_variants((5,)),
    "bias": tensor_variants((5,)),
    "eps": JUNK,
    "running_mean": tensor_variants((5,)),
    "running_var": tensor_variants((5,)),
    "momentum": JUNK,
    "upsample_factor": JUNK,
}


@CHEAP_PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(BN_ARGS)))
def test_bn_finalize_arguments(data, name):
    torch.manual_seed(0)
    y = torch.randn(40, 5)
    args = {"stats": torch.stack([y.sum(0), (y * y).sum(0)]), "count": 40, "weight": torch.rand(5) + 0.5,
            "bias": torch.randn(5), "eps": 1e-3, "running_mean": torch.zeros(5), "running_var": torch.ones(5),
            "momentum": 0.1, "upsample_factor": 1}  # fmt: skip
    args[name] = data.draw(BN_ARGS[name], label=name)
    before = {k: v.clone() for k, v in args.items() if k.startswith("running") and isinstance(v, torch.Tensor)}
    positional = {k: args.pop(k) for k in ("stats", "count", "weight", "bias")}
    result = call_or_error(name, lambda: bn_finalize(*positional.values(), **args))
    if result is None:
        for key, tensor in before.items():  # nothing was half-done
            assert args[key].is_meta or torch.equal(args[key], tensor), key
        return
    mean, var = before["running_mean"].clone(), before["running_var"].clone()
    n = positional["count"] * args["upsample_factor"] ** 2
    expected = bn_finalize_reference(*positional.values(), args["eps"], mean, var, None, args["momentum"], n / (n - 1))
    torch.testing.assert_close(result[0], expected[0])
    torch.testing.assert_close(result[1], expected[1])
    torch.testing.assert_close(args["running_mean"], mean)
    torch.testing.assert_close(args["running_var"], var)


VALID_INSTANCES = {
    "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
               {"id": 2, "file_name": "b.png", "width": 32, "height": 24}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "iscrowd": 0},
                    {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0.5, 1, 4, 4.5], "iscrowd": 0},
                    {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 10], "iscrowd": 1}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
}  # fmt: skip
# (path into the JSON, the word the error must name)
FIELDS = [
    ((), "annotation file"),
    (("images",), "images"),
    (("annotations",), "annotations"),
    (("categories",), "categories"),
    (("images", 0), "images[0]"),
    (("images", 1, "file_name"), "file_name"),
    (("images", 0, "id"), "id"),
    (("annotations", 0), "annotations[0]"),
    (("annotations", 0, "bbox"), "bbox"),
    (("annotations", 1, "bbox", 2), "bbox"),
    (("annotations", 0, "category_id"), "category_id"),
    (("annotations", 1, "image_id"), "image_id"),
    (("categories", 1, "name"), "name"),
    (("categories", 0, "id"), "categor"),  # categories[0] (not an int, a repeated id) or an annotation's category_id
]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 24), (40, 80, 120)).save(root / name)
    return root


@CHEAP_PROPERTY
@given(field=st.sampled_from(FIELDS), value=JUNK)
def test_coco_reader_fields(image_root, field, value):
    path, word = field
    instances = json.loads(json.dumps(VALID_INSTANCES))
    if path:
        *parents, last = path
        container = instances
        for key in parents:
            container = container[key]
        container[last] = value
    else:
        instances = value
    ann_file = image_root / "instances.json"
    ann_file.write_text(json.dumps(instances, default=lambda v: v.tolist() if isinstance(v, torch.Tensor) else str(v)))
    dataset = call_or_error(word, lambda: CocoDetectionDataset(image_root, ann_file))
    if dataset is None:
        return
    loaded = json.loads(ann_file.read_text())
    by_image = {image["id"]: [] for image in loaded["images"]}
    for ann in loaded["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image[ann["image_id"]].append(ann)
    labels = {c["id"]: i for i, c in enumerate(sorted(loaded["categories"], key=lambda c: c["id"]))}
    for index, info in enumerate(sorted(loaded["images"], key=lambda image: image["id"])):
        image, target = call_or_error(word, lambda index=index: dataset[index], unreadable_file=True) or (None, None)
        if image is None:
            continue
        anns = by_image[info["id"]]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor(xyxy).reshape(-1, 4).float())
        assert target["labels"].tolist() == [labels[a["category_id"]] for a in anns]
        assert target["image_id"] == info["id"]
