"""Official TF2 Model Garden SpineNet-Mobile backbones -> ours: Model Garden's own SpineNetMobile-49XS with random
weights and BN statistics, saved as a ``tf.train.Checkpoint``, converted, and compared on the same image."""

import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (imported before TensorFlow: the other order crashes torchvision's import)

from spinenet_fast import SpineNetMobile
from spinenet_fast.convert.tf_mobile import from_tf_spinenet_mobile_checkpoint

from ..conftest import require_optional
from .test_tf_checkpoint import _assert_relative, _randomise

pytestmark = pytest.mark.tf
SIZE = 256


@pytest.fixture(scope="module")
def model_garden(tmp_path_factory):
    """(checkpoint prefix, image NHWC, P3–P7 NHWC) of a random Model Garden SpineNet-Mobile-49XS (swish)."""
    tf = require_optional("tensorflow")
    tf_keras = require_optional("tf_keras")
    require_optional("official.vision")
    from official.vision.modeling.backbones import spinenet_mobile

    scaling = spinenet_mobile.SCALING_MAP["49XS"]
    model = spinenet_mobile.SpineNetMobile(
        input_specs=tf_keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3]),
        endpoints_num_filters=scaling["endpoints_num_filters"],
        filter_size_scale=scaling["filter_size_scale"],
        block_repeats=scaling["block_repeats"],
        activation="swish",
    )
    rng = np.random.default_rng(0)
    _randomise(model.variables, rng)
    prefix = tf.train.Checkpoint(backbone=model).save(str(tmp_path_factory.mktemp("tf") / "ckpt"))
    image = rng.normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    outputs = model(image, training=False)
    return prefix, image, {level: value.numpy() for level, value in outputs.items()}


def test_converted_backbone_matches_model_garden(model_garden):
    prefix, image, reference = model_garden
    model = SpineNetMobile("49XS", stochastic_depth_rate=0.0).eval()
    model.load_state_dict(from_tf_spinenet_mobile_checkpoint(prefix, "49XS"))
    with torch.no_grad():
        features = model(torch.from_numpy(image).permute(0, 3, 1, 2))
    for level in range(3, 8):
        _assert_relative(features[f"p{level}"], torch.from_numpy(reference[str(level)]).permute(0, 3, 1, 2))


def test_another_model_id_is_refused(model_garden):
    with pytest.raises(ValueError, match=r"but SpineNet-Mobile-49 needs .*: is it a SpineNet-Mobile-49 checkpoint\?"):
        from_tf_spinenet_mobile_checkpoint(model_garden[0], "49")


@pytest.fixture(scope="module")
def model_garden_retinanet(tmp_path_factory):
    """(checkpoint prefix, image NHWC, outputs) of Model Garden's own RetinaNet-SpineNet-Mobile-49XS
    (``retinanet_mobile_coco``: separable-conv head, 24 wide as the endpoints), random weights and BN statistics."""
    tf = require_optional("tensorflow")
    tf_keras = require_optional("tf_keras")
    require_optional("official.vision")
    from official.core import exp_factory
    from official.vision.modeling import factory

    config = exp_factory.get_exp_config("retinanet_mobile_coco").task.model
    config.backbone.spinenet_mobile.model_id = "49XS"
    config.backbone.spinenet_mobile.stochastic_depth_drop_rate = 0.0
    config.head.num_filters = 24
    config.input_size = [SIZE, SIZE, 3]
    config.norm_activation.use_sync_bn = False
    config.detection_generator.apply_nms = False
    model = factory.build_retinanet(input_specs=tf_keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3]),
                                    model_config=config)  # fmt: skip
    model(np.zeros((1, SIZE, SIZE, 3), np.float32), training=False)
    rng = np.random.default_rng(1)
    _randomise(model.variables, rng)
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path_factory.mktemp("tf") / "ckpt"))
    image = rng.normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    outputs = model(image, output_intermediate_features=True, training=False)
    return prefix, image, {k: v.numpy() if hasattr(v, "numpy") else v for k, v in outputs.items()}


def test_converted_retinanet_matches_model_garden(model_garden_retinanet):
    from spinenet_fast.convert import from_tf_mobile_retinanet_checkpoint, tf_mobile_detector

    from .test_tf_checkpoint import _to_our_anchor_order

    prefix, image, reference = model_garden_retinanet
    model = tf_mobile_detector("49XS", 91, image_size=SIZE, stochastic_depth_rate=0.0).eval()
    assert sum(p.numel() for p in model.parameters()) == 872_711  # Model Garden's count (tests/detection)
    model.load_state_dict(from_tf_mobile_retinanet_checkpoint(prefix, "49XS", 91))
    with torch.no_grad():
        features = model.backbone(torch.from_numpy(image).permute(0, 3, 1, 2))
        head = model.head(list(features.values()))
    for level in range(3, 8):
        _assert_relative(features[f"p{level}"], torch.from_numpy(reference[f"backbone_{level}"]).permute(0, 3, 1, 2))
    _assert_relative(head["cls_logits"], _to_our_anchor_order(reference["cls_outputs"], 91))
    boxes = _to_our_anchor_order(reference["box_outputs"], 4)[..., [1, 0, 3, 2]]  # (ty, tx, th, tw) -> (dx, dy, ..)
    _assert_relative(head["bbox_regression"], boxes)
    kept = from_tf_mobile_retinanet_checkpoint(prefix, "49XS", 91, class_ids=[3, 1])
    tf_mobile_detector("49XS", 2).load_state_dict(kept)
