"""ONNX export of SpineNet backbones and RetinaNet-SpineNet detectors (``[onnx]`` extra).

The export traces the eager path (fused connections switched off for the export: the same parameters, the
same maths), with ``torch.onnx``'s dynamo exporter, opset ≥ 17, and a dynamic batch dimension.

- A :class:`~spinenet_fast.models.SpineNet` exports as ``images`` (N, 3, S, S) -> ``p3`` … ``p7`` (NCHW).
- A :class:`~spinenet_fast.models.SpineNetClassifier` exports as ``images`` (N, 3, S, S), normalised as it was
  trained (e.g. timm's data config) -> ``logits`` (N, K).
- A RetinaNet-SpineNet exports its raw outputs: ``images`` (N, 3, S, S) RGB in [0, 1] -> ``cls_logits``
  (N, ΣHWA, K) and ``bbox_regression`` (N, ΣHWA, 4) in torchvision's anchor order and box coding; the ImageNet
  normalisation is inside the graph; anchors, decoding and NMS stay with the caller (they depend on the image
  size only, e.g. ``model.anchor_generator`` and ``torchvision.ops.batched_nms``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ._optional import require
from .detection.head import SpineNetRetinaNetHead
from .models.blocks import BlockGroup
from .models.classifier import SpineNetClassifier
from .models.endpoint import Endpoint
from .models.resample import CrossScaleMerge
from .models.spinenet import SIZE_DIVISIBILITY, SpineNet
from .models.stem import Stem

MIN_OPSET = 17


class RawDetector(nn.Module):
    """A RetinaNet-SpineNet's normalisation, backbone and head.

    images (N, 3, H, W) RGB in [0, 1] -> (cls_logits (N, ΣHWA, K), bbox_regression (N, ΣHWA, 4)).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone((images - self.mean) / self.std)
        outputs = self.head(list(features.values()))
        return outputs["cls_logits"], outputs["bbox_regression"]


@contextlib.contextmanager
def eager_connections(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s stem, cross-scale connections, blocks, endpoints and RetinaNet head through the eager modules
    inside the block."""
    fusable = (Stem, CrossScaleMerge, BlockGroup, Endpoint, SpineNetRetinaNetHead)
    merges = [m for m in model.modules() if isinstance(m, fusable)]
    saved = [m.fused for m in merges]
    try:
        for merge in merges:
            merge.fused = False
        yield
    finally:
        for merge, fused in zip(merges, saved):
            merge.fused = fused


def exportable(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module to trace for ``model`` and its output names; ``TypeError`` for anything else."""
    if isinstance(model, SpineNet):
        return model, list(model.endpoints)
    if isinstance(model, SpineNetClassifier):
        return model, ["logits"]
    if isinstance(getattr(model, "backbone", None), SpineNet) and hasattr(model, "head"):
        return RawDetector(model), ["cls_logits", "bbox_regression"]
    raise TypeError(
        f"model must be a SpineNet, a SpineNetClassifier or a RetinaNet-SpineNet detector, got {type(model).__name__}"
    )


def to_onnx(
    model: nn.Module, path: str | Path, image_size: int | tuple[int, int], *, opset: int = 18, batch_size: int = 1
) -> Path:
    """Export ``model`` (a SpineNet, a SpineNetClassifier or a RetinaNet-SpineNet, see the module docstring) to
    ``path`` and return it.

    ``image_size``: S or (H, W), multiples of 128, fixed in the graph; the batch dimension stays dynamic
    (``batch_size`` is the example's). The model is exported in eval mode, on its own device, in fp32 as given.
    """
    require("onnxscript")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % SIZE_DIVISIBILITY:
            raise ValueError(f"image_size: the {name} must be a positive multiple of {SIZE_DIVISIBILITY}, got {size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    module, output_names = exportable(model)
    device = next(model.parameters()).device
    example = torch.rand(batch_size, 3, height, width, device=device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    module.eval()
    try:
        with eager_connections(model), torch.no_grad():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["images"],
                output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
            )
        program.save(str(path))
    finally:
        model.train(was_training)
    return path
