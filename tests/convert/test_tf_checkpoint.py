"""Official TF2 Model Garden checkpoints -> our detector: a real Model Garden RetinaNet-SpineNet-49S with random
weights and BN statistics, saved as a ``tf.train.Checkpoint``, converted, and compared on the same image."""

import json

import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (imported before TensorFlow: the other order crashes torchvision's import)
from torchvision.models.detection.image_list import ImageList

from spinenet_fast.convert import from_tf_checkpoint, tf_detector
from spinenet_fast.convert.__main__ import main as convert_main
from spinenet_fast.convert.tf_checkpoint import _anchor_permutation
from spinenet_fast.data.synthetic import make_synthetic_coco
from spinenet_fast.eval.__main__ import main as eval_main

from ..conftest import require_optional

pytestmark = pytest.mark.tf
SIZE = 256
NUM_ANCHORS = 9


def _randomise(variables, rng: np.random.Generator) -> None:
    """Kernels with fan-in scaling, biases and BN β / moving mean around 0, γ and moving variance around 1."""
    for variable in variables:
        shape, name = variable.shape.as_list(), variable.name
        if "gamma" in name or "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "kernel" in name:
            value = rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = rng.normal(0, 0.1, shape)
        variable.assign(value.astype(np.float32))


@pytest.fixture(scope="module")
def model_garden(tmp_path_factory):
    """(checkpoint prefix, input image NHWC, Model Garden outputs) for a random RetinaNet-SpineNet-49S."""
    tf = require_optional("tensorflow")
    tf_keras = require_optional("tf_keras")
    require_optional("official.vision")
    from official.core import exp_factory
    from official.vision.modeling import factory

    config = exp_factory.get_exp_config("retinanet_spinenet_coco").task.model
    config.backbone.spinenet.model_id = "49S"
    config.backbone.spinenet.stochastic_depth_drop_rate = 0.0
    config.head.num_filters = 128  # the official 49S head width
    config.input_size = [SIZE, SIZE, 3]
    config.norm_activation.use_sync_bn = False
    config.detection_generator.apply_nms = False  # return the decoded pre-NMS boxes
    spec = tf_keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3])
    model = factory.build_retinanet(input_specs=spec, model_config=config)
    model(np.zeros((1, SIZE, SIZE, 3), np.float32), training=False)  # creates the head's variables
    rng = np.random.default_rng(0)
    _randomise(model.variables, rng)
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path_factory.mktemp("tf") / "ckpt"))
    image = rng.normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    outputs = model(image, output_intermediate_features=True, training=False)
    return prefix, image, {k: v.numpy() if hasattr(v, "numpy") else v for k, v in outputs.items()}


def _to_our_anchor_order(levels, values_per_anchor: int) -> torch.Tensor:
    """Model Garden per-level (N, h, w, A·V) -> (N, ΣhwA, V) in torchvision's anchor order."""
    rows = []
    for level in range(3, 8):
        x = torch.from_numpy(np.array(levels[str(level)]))
        n, h, w, _ = x.shape
        rows.append(x.view(n, h, w, NUM_ANCHORS, values_per_anchor)[:, :, :, _anchor_permutation()].reshape(n, -1,
                    values_per_anchor))  # fmt: skip
    return torch.cat(rows, 1)


def _assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert scale > 0.05, "the reference is too small for the comparison to mean anything"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def test_converted_checkpoint_matches_model_garden(model_garden):
    prefix, image, reference = model_garden
    model = tf_detector("49S", 91, image_size=SIZE, stochastic_depth_rate=0.0).eval()
    model.load_state_dict(from_tf_checkpoint(prefix, "49S", 91))
    x = torch.from_numpy(image).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = model.backbone(x)
        head = model.head(list(features.values()))
    for level in range(3, 8):
        expected = torch.from_numpy(reference[f"backbone_{level}"]).permute(0, 3, 1, 2)
        _assert_relative(features[f"p{level}"], expected)
    _assert_relative(head["cls_logits"], _to_our_anchor_order(reference["cls_outputs"], 91))
    expected_boxes = _to_our_anchor_order(reference["box_outputs"], 4)[..., [1, 0, 3, 2]]  # ty,tx,th,tw -> dx,dy..
    _assert_relative(head["bbox_regression"], expected_boxes)

    anchors = model.anchor_generator(ImageList(x, [(SIZE, SIZE)]), list(features.values()))[0]
    decoded = model.box_coder.decode_single(head["bbox_regression"][0], anchors)
    mg_decoded = {}  # Model Garden's decoded boxes, (ymin, xmin, ymax, xmax) per level in its anchor order
    start = 0
    for level in range(3, 8):
        cells = (SIZE // 2**level) ** 2
        mg_decoded[str(level)] = reference["decoded_boxes"][:, start : start + cells * NUM_ANCHORS].reshape(
            1, SIZE // 2**level, SIZE // 2**level, NUM_ANCHORS * 4
        )
        start += cells * NUM_ANCHORS
    _assert_relative(decoded, _to_our_anchor_order(mg_decoded, 4)[0][:, [1, 0, 3, 2]])


def test_class_selection_and_bad_input(model_garden, tmp_path):
    prefix = model_garden[0]
    full = from_tf_checkpoint(prefix, "49S", 91)
    kept = from_tf_checkpoint(prefix, "49S", 91, class_ids=[3, 1])
    weight = full["head.class_predictor.weight"].view(NUM_ANCHORS, 91, -1, 3, 3)
    torch.testing.assert_close(kept["head.class_predictor.weight"].view(NUM_ANCHORS, 2, -1, 3, 3),
                               weight[:, [3, 1]])  # fmt: skip
    tf_detector("49S", 2).load_state_dict(kept)
    wrong_model = r"shortcut\.conv\.weight has shape \(164, 64, 1, 1\) but SpineNet-49 with 91 classes needs \(256, "
    with pytest.raises(ValueError, match=wrong_model + r"64, 1, 1\): is it a SpineNet-49 checkpoint\?"):
        from_tf_checkpoint(prefix, "49", 91)
    with pytest.raises(ValueError, match=r"_classifier has 819 outputs, 9 anchors × 80 expected"):
        from_tf_checkpoint(prefix, "49S", 80)
    with pytest.raises(ValueError, match=r"class_ids must be a non-empty list of ints in \[0, 91\), got \[91\]"):
        from_tf_checkpoint(prefix, "49S", 91, class_ids=[91])
    with pytest.raises(FileNotFoundError, match="is not a TF checkpoint"):
        from_tf_checkpoint(tmp_path / "missing", "49S")


def test_cli_output_evaluates_with_our_eval_command(model_garden, tmp_path):
    """CLI -> spinenet_fast checkpoint (weights_only) -> ``python -m spinenet_fast.eval``; the synthetic set's
    categories 1–3 select classes 1–3 of the 91."""
    data = make_synthetic_coco(tmp_path / "data", num_train=1, num_val=2, image_size=128, seed=0)
    out = convert_main([model_garden[0], str(tmp_path / "converted.pt"), "--model", "49s", "--image-size", "128",
                        "--annotations", str(data / "annotations" / "instances_val2017.json")])  # fmt: skip
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["args"]["model"] == "49S"  # --model takes any case
    assert checkpoint["args"]["padding"] == "tf_same" and checkpoint["args"]["anchor_style"] == "tf"
    assert checkpoint["label_map"]["category_ids"] == [1, 2, 3]
    stats = eval_main(["--checkpoint", str(out), "--data-path", str(data), "--output-dir", str(tmp_path / "eval"),
                       "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert len(stats) == 12 and json.loads((tmp_path / "eval" / "coco_stats.json").read_text()) == stats
    plain = convert_main([model_garden[0], str(tmp_path / "plain.pt"), "--model", "49S", "--state-dict-only"])
    state_dict = torch.load(plain, weights_only=True)
    tf_detector("49S", 91).load_state_dict(state_dict)
