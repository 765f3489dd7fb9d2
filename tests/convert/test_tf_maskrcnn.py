"""Official TF2 Model Garden Mask R-CNN checkpoints -> our Mask R-CNN: a real Model Garden Mask R-CNN-SpineNet-49S
(the TPU repo's 49S head widths) with random weights and BN statistics, saved as a ``tf.train.Checkpoint``,
converted, and compared part by part on the same image and RoIs: backbone, RPN, RoI align, box head, mask head."""

import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (imported before TensorFlow: the other order crashes torchvision's import)

from spinenet_fast.convert import from_tf_maskrcnn_checkpoint, tf_maskrcnn
from spinenet_fast.convert.tf_checkpoint import _anchor_permutation

from ..conftest import require_optional
from .test_tf_checkpoint import _assert_relative, _randomise

pytestmark = pytest.mark.tf
SIZE = 512  # RoIs up to 512 px: RoI align reads levels 3, 4 and 5
NUM_CLASSES = 91
# (ymin, xmin, ymax, xmax) in image pixels, inside the image (Model Garden extrapolates past its edge, torchvision
# clamps); √area 40 … 470: FPN levels 3 … 5
ROIS = np.array([[10, 20, 50, 70], [100, 30, 300, 250], [5, 8, 500, 420], [60, 200, 400, 510], [30, 40, 200, 90]],
                np.float32)  # fmt: skip
ROI_CLASSES = np.array([1, 7, 90, 3, 45])


@pytest.fixture(scope="module")
def model_garden(tmp_path_factory):
    """(checkpoint prefix, image NHWC, Model Garden outputs) for a random Mask R-CNN-SpineNet-49S."""
    tf = require_optional("tensorflow")
    tf_keras = require_optional("tf_keras")
    require_optional("official.vision")
    from official.core import exp_factory
    from official.vision.modeling import factory

    config = exp_factory.get_exp_config("maskrcnn_spinenet_coco").task.model
    config.backbone.spinenet.model_id = "49S"
    config.rpn_head.num_filters = config.detection_head.num_filters = config.mask_head.num_filters = 128
    config.detection_head.fc_dims = 512  # the TPU repo's spinenet49s_mrcnn.yaml
    config.input_size = [SIZE, SIZE, 3]
    config.norm_activation.use_sync_bn = False
    spec = tf_keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3])
    model = factory.build_maskrcnn(input_specs=spec, model_config=config)
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    rois, classes = tf.constant(ROIS[None]), tf.constant(ROI_CLASSES[None])

    def run():
        features = model.backbone(image, training=False)
        scores, boxes = model.rpn_head(features, training=False)
        roi_features = model.roi_aligner(features, rois, training=False)
        class_outputs, box_outputs = model.detection_head[0](roi_features, training=False)
        mask_features = model.mask_roi_aligner(features, rois, training=False)
        masks = model.mask_head([mask_features, classes], training=False)
        outputs = {"features": features, "rpn_scores": scores, "rpn_boxes": boxes, "roi_features": roi_features,
                   "class_outputs": class_outputs, "box_outputs": box_outputs, "mask_features": mask_features,
                   "masks": masks}  # fmt: skip
        return tf.nest.map_structure(lambda t: t.numpy(), outputs)

    run()  # creates the heads' variables
    _randomise(model.variables, rng)
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path_factory.mktemp("tf") / "ckpt"))
    return prefix, image, run()


@pytest.fixture(scope="module")
def converted(model_garden):
    model = tf_maskrcnn("49S", NUM_CLASSES, image_size=SIZE).eval()
    model.load_state_dict(from_tf_maskrcnn_checkpoint(model_garden[0], "49S", NUM_CLASSES))
    return model


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def test_backbone_and_rpn_match_model_garden(model_garden, converted):
    _, image, reference = model_garden
    with torch.no_grad():
        features = converted.backbone(_nchw(image))
        objectness, deltas = converted.rpn.head(list(features.values()))
    anchors = _anchor_permutation(num_scales=1)
    for i, level in enumerate(range(3, 8)):
        _assert_relative(features[f"p{level}"], _nchw(reference["features"][str(level)]))
        _assert_relative(objectness[i], _nchw(reference["rpn_scores"][str(level)])[:, anchors])
        expected = _nchw(reference["rpn_boxes"][str(level)])
        expected = expected.unflatten(1, (3, 4))[:, anchors][:, :, [1, 0, 3, 2]].flatten(1, 2)
        _assert_relative(deltas[i], expected)


def test_roi_align_matches_model_garden(model_garden, converted):
    """torchvision's ``MultiScaleRoIAlign`` (one sample per bin, FPN level rule) reads what Model Garden's
    ``MultilevelROIAligner`` (``sample_offset`` 0.5) reads, for the 7×7 box and the 14×14 mask RoIs."""
    _, image, reference = model_garden
    boxes = [torch.from_numpy(ROIS[:, [1, 0, 3, 2]])]  # (x1, y1, x2, y2)
    with torch.no_grad():
        features = converted.backbone(_nchw(image))
        box_features = converted.roi_heads.box_roi_pool(features, boxes, [(SIZE, SIZE)])
        mask_features = converted.roi_heads.mask_roi_pool(features, boxes, [(SIZE, SIZE)])
    _assert_relative(box_features, torch.from_numpy(reference["roi_features"][0]).permute(0, 3, 1, 2))
    _assert_relative(mask_features, torch.from_numpy(reference["mask_features"][0]).permute(0, 3, 1, 2))


def test_box_and_mask_heads_match_model_garden(model_garden, converted):
    """The heads on Model Garden's own RoI features: class logits, per-class box deltas, the RoIs' class masks."""
    reference = model_garden[2]
    heads = converted.roi_heads
    with torch.no_grad():
        class_logits, box_deltas = heads.box_predictor(
            heads.box_head(torch.from_numpy(reference["roi_features"][0]).permute(0, 3, 1, 2))
        )
        masks = heads.mask_predictor(
            heads.mask_head(torch.from_numpy(reference["mask_features"][0]).permute(0, 3, 1, 2))
        )
    _assert_relative(class_logits, torch.from_numpy(reference["class_outputs"][0]))
    expected = torch.from_numpy(reference["box_outputs"][0]).unflatten(1, (NUM_CLASSES, 4))[..., [1, 0, 3, 2]]
    _assert_relative(box_deltas, expected.flatten(1))
    _assert_relative(
        masks[torch.arange(len(ROIS)), torch.from_numpy(ROI_CLASSES)], torch.from_numpy(reference["masks"][0])
    )


def test_wrong_model_or_class_count_is_refused(model_garden, tmp_path):
    prefix = model_garden[0]
    with pytest.raises(ValueError, match=r"but SpineNet-49 with 91 classes needs .* is it a SpineNet-49 checkpoint"):
        from_tf_maskrcnn_checkpoint(prefix, "49", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"cls_score\.weight has shape \(91, 512\) but SpineNet-49S with 81 classes"):
        from_tf_maskrcnn_checkpoint(prefix, "49S", 81)
    with pytest.raises(FileNotFoundError, match="is not a TF checkpoint"):
        from_tf_maskrcnn_checkpoint(tmp_path / "missing", "49S")


def test_cli_with_class_selection_evaluates_boxes_and_masks(model_garden, tmp_path):
    """``--task mask --annotations``: the background and the file's categories (1–3) kept, in that order; the
    checkpoint evaluates with our eval command (box and mask stats)."""
    from spinenet_fast.convert.__main__ import main as convert_main
    from spinenet_fast.data.synthetic import make_synthetic_coco
    from spinenet_fast.eval.__main__ import main as eval_main

    data = make_synthetic_coco(tmp_path / "data", num_train=1, num_val=2, image_size=128, seed=0)
    annotations = str(data / "annotations" / "instances_val2017.json")
    out = convert_main([model_garden[0], str(tmp_path / "converted.pt"), "--model", "49s", "--task", "mask",
                        "--image-size", "128", "--annotations", annotations])  # fmt: skip
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["args"]["task"] == "mask" and checkpoint["args"]["activation"] == "relu"
    full = from_tf_maskrcnn_checkpoint(model_garden[0], "49S", NUM_CLASSES)
    for key, rows in (("roi_heads.box_predictor.cls_score.weight", 1), ("roi_heads.box_predictor.bbox_pred.bias", 4),
                      ("roi_heads.mask_predictor.mask_logits.weight", 1)):  # fmt: skip
        expected = full[key].unflatten(0, (NUM_CLASSES, rows))[[0, 1, 2, 3]].flatten(0, 1)
        torch.testing.assert_close(checkpoint["model"][key], expected)
    stats = eval_main(["--checkpoint", str(out), "--data-path", str(data), "--output-dir", str(tmp_path / "eval"),
                       "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert len(stats) == 24 and "segm_AP" in stats
    with pytest.raises(ValueError, match=r"class_ids must be a non-empty list of ints in \[1, 91\), got \[0\]"):
        from_tf_maskrcnn_checkpoint(model_garden[0], "49S", NUM_CLASSES, class_ids=[0])
