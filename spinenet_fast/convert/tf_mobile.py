"""Official TF2 Model Garden SpineNet-Mobile checkpoints -> our ``state_dict``s: the backbone alone
(:class:`SpineNetMobile`) or the whole RetinaNet (:func:`~spinenet_fast.detection.retinanet_spinenet_mobile`).

Reads the ``backbone/layer_with_weights-*`` variables of a ``tf.train.Checkpoint`` (a RetinaNet checkpoint's, or
one saving the backbone alone as ``backbone``) and for the RetinaNet its ``head/*`` (separable convs; predictors
permuted to torchvision's anchor order and box coding as for SpineNet). As for SpineNet, Keras numbers each
top-level layer kind in creation order, and Model Garden creates them in the order we build ours: the stem, the two
initial blocks, per block its two parents' resampling layers (depthwise convs with their BNs, then the 1×1 conv and
its BN) and the block, then the endpoints. Conv kernels HWIO -> OIHW; depthwise kernels (H, W, C, 1) -> (C, 1, H, W);
BN γ/β/moving statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..detection.mobile import retinanet_spinenet_mobile
from ..detection.retinanet import SpineNetRetinaNet
from ..models.spinenet_mobile import SpineNetMobile
from .tf_checkpoint import (
    BN_FIELDS,
    TF_DETECTOR_KWARGS,
    _backbone_layers,
    _complete,
    _convert_head,
    _read_checkpoint,
    _select_classes,
    _sub,
    _tensor,
)

MBCONV_PARTS = (("expand", "_conv0", "_norm0"), ("depthwise", "_conv1", "_norm1"), ("project", "_conv2", "_norm2"))


def tf_mobile_detector(model_id: str, num_classes: int = 91, **kwargs) -> SpineNetRetinaNet:
    """The detector a converted checkpoint loads into: ``retinanet_spinenet_mobile`` with Model Garden's anchors."""
    return retinanet_spinenet_mobile(model_id, num_classes, **TF_DETECTOR_KWARGS, **kwargs)


def from_tf_spinenet_mobile_checkpoint(path: str | Path, model_id: str) -> dict[str, Tensor]:
    """Convert a Model Garden SpineNet-Mobile backbone to a ``state_dict`` for ``SpineNetMobile(model_id)``."""
    with torch.device("meta"):  # names and shapes only
        backbone = SpineNetMobile(model_id)
    out: dict[str, Tensor] = {}
    _convert_mobile_backbone(_read_checkpoint(Path(path)), backbone, out, "")
    return _complete(out, backbone.state_dict(), path, f"Mobile-{model_id}", None)


def from_tf_mobile_retinanet_checkpoint(
    path: str | Path, model_id: str, num_classes: int = 91, *, class_ids: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Convert a Model Garden RetinaNet-SpineNet-Mobile checkpoint to a ``state_dict`` for
    ``tf_mobile_detector(model_id, num_classes)`` (``class_ids``: as :func:`~.tf_checkpoint.from_tf_checkpoint`)."""
    variables = _read_checkpoint(Path(path))
    with torch.device("meta"):
        model = tf_mobile_detector(model_id, num_classes)
    out: dict[str, Tensor] = {}
    _convert_mobile_backbone(variables, model.backbone, out, "backbone.")
    _convert_head(variables, out, num_classes, separable=True)
    out = _complete(out, model.state_dict(), path, f"Mobile-{model_id}", num_classes)
    if class_ids is not None:
        _select_classes(out, model.head.num_anchors, num_classes, class_ids, predictor="head.class_predictor.1")
    return out


def _convert_mobile_backbone(variables: dict, backbone: SpineNetMobile, out: dict[str, Tensor], prefix: str) -> None:
    """Our backbone's parameters (names under ``prefix``) from the checkpoint's backbone layers."""
    layers = _backbone_layers(variables)
    model_id = backbone.model_id
    conv_norms = _conv_norm_prefixes(backbone)
    theirs = {kind: layers.pop(kind, []) for kind in ("conv2d", "depthwise_conv2d", "batch_normalization")}
    ours = {
        "conv2d": [p for p in conv_norms if ".down." not in p],
        "depthwise_conv2d": [p for p in conv_norms if ".down." in p],
        "batch_normalization": conv_norms,
    }
    blocks = [f"init_blocks.{i}" for i in range(len(backbone.init_blocks))]
    blocks += [f"blocks.{k}" for k in range(len(backbone.blocks))]
    theirs["inverted_bottleneck_block"], ours["inverted_bottleneck_block"] = (
        layers.pop("inverted_bottleneck_block", []),
        blocks,
    )
    for kind in theirs:
        if len(theirs[kind]) != len(ours[kind]):
            raise ValueError(f"the checkpoint's backbone has {len(theirs[kind])} {kind} layers, SpineNet-Mobile-"
                             f"{model_id} has {len(ours[kind])}: is it a SpineNet-Mobile-{model_id} "
                             "checkpoint?")  # fmt: skip
    if layers:
        raise ValueError(f"the checkpoint's backbone has layers SpineNet-Mobile has not: {sorted(layers)}")
    for name, conv in zip(ours["conv2d"], theirs["conv2d"]):
        out[f"{prefix}{name}.conv.weight"] = _tensor(conv["kernel"])
    for name, conv in zip(ours["depthwise_conv2d"], theirs["depthwise_conv2d"]):
        out[f"{prefix}{name}.conv.weight"] = _depthwise(conv["depthwise_kernel"])
    for name, norm in zip(conv_norms, theirs["batch_normalization"]):
        _put_norm(f"{prefix}{name}.bn", norm, out)
    for name, block in zip(blocks, theirs["inverted_bottleneck_block"]):
        for part, conv, norm in MBCONV_PARTS:
            kernel = _sub(block, conv)
            weight = kernel["depthwise_kernel"] if "depthwise_kernel" in kernel else kernel["kernel"]
            out[f"{prefix}{name}.{part}.conv.weight"] = _depthwise(weight) if part == "depthwise" else _tensor(weight)
            _put_norm(f"{prefix}{name}.{part}.bn", _sub(block, norm), out)
        se = _sub(block, "_squeeze_excitation")
        for tf_name, ours_name in (("_se_reduce", "reduce"), ("_se_expand", "expand")):
            for field, param in (("kernel", "weight"), ("bias", "bias")):
                out[f"{prefix}{name}.se.{ours_name}.{param}"] = _tensor(se[f"{tf_name}/{field}"])


def _conv_norm_prefixes(backbone: SpineNetMobile) -> list[str]:
    """Our top-level ConvNorms in Model Garden's creation order."""
    prefixes = ["stem"]
    for k, merge in enumerate(backbone.merges):
        for r, resample in enumerate(merge.resamples):
            prefixes += [f"merges.{k}.resamples.{r}.down.{i}" for i in range(len(resample.down))]
            prefixes.append(f"merges.{k}.resamples.{r}.conv")
    return prefixes + [f"endpoints.{name}" for name in backbone.endpoints]


def _depthwise(value: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float32).copy()).permute(2, 3, 0, 1).contiguous()


def _put_norm(prefix: str, norm: dict[str, np.ndarray], out: dict[str, Tensor]) -> None:
    for tf_name, ours in BN_FIELDS.items():
        out[f"{prefix}.{ours}"] = _tensor(norm[tf_name])
