"""ONNX export: the backbone's endpoints and the detector's raw outputs in onnxruntime (CPU) match PyTorch."""

import pytest
import torch

from spinenet_fast import SpineNet, SpineNetClassifier
from spinenet_fast.detection.presets import CUSTOM_SCALINGS, build_detector
from spinenet_fast.export import RawDetector, eager_connections, to_onnx

from ..conftest import require_optional


def _randomise_(model: torch.nn.Module) -> None:
    """Random BN statistics and predictor weights, so that every output carries signal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for name in ("class_predictor", "box_predictor"):
            predictor = getattr(getattr(model, "head", None), name, None)
            if predictor is not None:
                predictor.weight.normal_(0, 0.05)


def _run_onnx(path, images: torch.Tensor) -> list[torch.Tensor]:
    ort = require_optional("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(out) for out in session.run(None, {"images": images.numpy()})]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0.05, "the reference is too small for the comparison to mean anything"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def test_backbone_endpoints_match_in_onnxruntime(tmp_path):
    """tf_same padding (asymmetric pads, −inf max-pool pads), as converted checkpoints use; the detector test
    below covers the default padding."""
    require_optional("onnxscript")
    model = SpineNet(CUSTOM_SCALINGS["49XS-custom"], padding="tf_same", fused=True).eval()
    _randomise_(model)
    path = to_onnx(model, tmp_path / "spinenet.onnx", (128, 256))
    assert model.merges[0].fused is True  # the export switched the fused path off only while tracing
    images = torch.randn(2, 3, 128, 256)  # batch 2: the exported batch dimension is dynamic
    with torch.no_grad(), eager_connections(model):  # the fused path here would run in the Triton interpreter
        expected = list(model(images).values())
    outputs = _run_onnx(path, images)
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    for actual, reference in zip(outputs, expected):
        _assert_close(actual, reference)


def test_detector_raw_outputs_match_in_onnxruntime(tmp_path):
    require_optional("onnxscript")
    model = build_detector("49XS-custom", 3, image_size=128).train()
    _randomise_(model)
    path = to_onnx(model, tmp_path / "retinanet.onnx", 128)
    assert model.training  # the caller's mode is restored
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        cls_logits, bbox_regression = RawDetector(model.eval())(images)
        head = model.head(list(model.backbone(model.transform([images[0]])[0].tensors).values()))
    torch.testing.assert_close(cls_logits, head["cls_logits"])  # RawDetector is the detector's own path
    actual_cls, actual_box = _run_onnx(path, images)
    _assert_close(actual_cls, cls_logits)
    _assert_close(actual_box, bbox_regression)


def test_classifier_logits_match_in_onnxruntime(tmp_path):
    require_optional("onnxscript")
    model = SpineNetClassifier(CUSTOM_SCALINGS["49XS-custom"], 7)
    _randomise_(model)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.5)
    path = to_onnx(model, tmp_path / "classifier.onnx", 128, batch_size=2)
    images = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        expected = model.eval()(images)
    (actual,) = _run_onnx(path, images)
    assert actual.shape == (3, 7)
    _assert_close(actual, expected)


def test_bad_export_arguments(tmp_path):
    model = SpineNet(CUSTOM_SCALINGS["49XS-custom"])
    with pytest.raises(ValueError, match="image_size: the height must be a positive multiple of 128, got 100"):
        to_onnx(model, tmp_path / "x.onnx", 100)
    with pytest.raises(ValueError, match="opset must be an int >= 17, got 13"):
        to_onnx(model, tmp_path / "x.onnx", 128, opset=13)
    with pytest.raises(TypeError, match="a SpineNetClassifier or a RetinaNet-SpineNet detector, got Linear"):
        to_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", 128)
