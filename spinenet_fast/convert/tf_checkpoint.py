"""Official TF2 Model Garden RetinaNet- and Mask R-CNN-SpineNet checkpoints -> the ``state_dict`` of our detector.

The checkpoint is read with ``tf.train.load_checkpoint`` (``tf.train.Checkpoint`` format; a directory means its
latest checkpoint). Model Garden builds the backbone as a functional Keras model, whose checkpoint names layers
``layer_with_weights-<i>`` in Keras' topological order; the variables' ``full_name`` (``conv2d_12/kernel``,
``bottleneck_block_3/conv2d_1/kernel``) numbers each layer kind in creation order instead, and creation order
is the order in which Model Garden's ``SpineNet.__init__`` walks the block table — the order we rebuild from our
own modules. Every mapped tensor's shape is checked, so a checkpoint of another model id fails loudly.

Conversions: conv kernels HWIO -> OIHW; BN gamma/beta/moving_mean/moving_variance -> weight/bias/running_*;
class and box predictors permuted from Model Garden's anchor order (scale-major, aspect ratio as width / height)
to torchvision's (aspect-major, height / width) and box coding (ty, tx, th, tw) -> (dx, dy, dw, dh). The result
loads into :func:`tf_detector` (``padding="tf_same"``, cell-centred ``"tf"`` anchors, the checkpoint's BN
epsilon: Model Garden's default 1e-3 unless its config said otherwise).

Mask R-CNN (:func:`from_tf_maskrcnn_checkpoint`, loading into :func:`tf_maskrcnn`): the same backbone; the RPN's
predictors permuted like RetinaNet's (one anchor scale); dense kernels transposed, the first one's inputs reordered
from Model Garden's flattened (H, W, C) RoI features to torchvision's (C, H, W); per-class box deltas reordered;
the mask head's transposed-conv kernel (H, W, out, in) -> (in, out, H, W).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._optional import require
from ..detection.anchors import ASPECT_RATIOS
from ..detection.maskrcnn import SpineNetMaskRCNN, maskrcnn_spinenet
from ..detection.retinanet import SpineNetRetinaNet, retinanet_spinenet

VARIABLE = "/.ATTRIBUTES/VARIABLE_VALUE"
BN_FIELDS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
TF_DETECTOR_KWARGS = {"padding": "tf_same", "anchor_style": "tf"}
MG_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # Model Garden's default anchor aspect ratios, as width / height
NUM_SCALES = 3
BOX_ORDER = [1, 0, 3, 2]  # Model Garden's (ty, tx, th, tw) -> torchvision's (dx, dy, dw, dh)
# Model Garden's block table has a 16th block (level 2, fed by blocks 1 and 12) off the P3–P7 path: its two
# same/up-sampling connections add 2 × (squeeze + expand) top-level convs, which we skip.
EXTRA_L2_BLOCK_CONVS = 4
# Keras layer kinds of Model Garden's SpineNet (bottleneck / residual blocks) and SpineNet-Mobile (inverted bottleneck
# blocks, depthwise resampling convs) backbones.
LAYER_NAME = re.compile(
    r"(conv2d|depthwise_conv2d|batch_normalization|bottleneck_block|residual_block|inverted_bottleneck_block)(?:_(\d+))?"
)


def tf_detector(model_id: str, num_classes: int = 91, **kwargs) -> SpineNetRetinaNet:
    """The detector a converted checkpoint loads into: ``retinanet_spinenet`` with TF padding and anchors."""
    return retinanet_spinenet(model_id, num_classes, **TF_DETECTOR_KWARGS, **kwargs)


def tf_maskrcnn(model_id: str, num_classes: int = 91, **kwargs) -> SpineNetMaskRCNN:
    """The Mask R-CNN a converted checkpoint loads into: ``maskrcnn_spinenet`` with TF padding and anchors."""
    return maskrcnn_spinenet(model_id, num_classes, **TF_DETECTOR_KWARGS, **kwargs)


def from_tf_checkpoint(
    path: str | Path, model_id: str, num_classes: int = 91, *, class_ids: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Convert a Model Garden RetinaNet-SpineNet checkpoint to a ``state_dict`` for ``tf_detector(model_id)``.

    ``num_classes``: the checkpoint's class count (91 for COCO: class index = COCO category id).
    ``class_ids``: keep only these checkpoint classes, in this order (our label i = checkpoint class
    ``class_ids[i]``); the state_dict is then for ``tf_detector(model_id, len(class_ids))``.
    """
    variables = _read_checkpoint(Path(path))
    model = tf_detector(model_id, num_classes)
    converted: dict[str, Tensor] = {}
    _convert_backbone(variables, model.backbone, converted)
    _convert_head(variables, converted, num_classes)
    converted = _complete(converted, model.state_dict(), path, model_id, num_classes)
    if class_ids is not None:
        _select_classes(converted, model.head.num_anchors, num_classes, class_ids)
    return converted


def from_tf_maskrcnn_checkpoint(
    path: str | Path, model_id: str, num_classes: int = 91, *, class_ids: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Convert a Model Garden Mask R-CNN-SpineNet checkpoint to a ``state_dict`` for ``tf_maskrcnn(model_id)``.

    ``num_classes``: the checkpoint's class count, background included (91 for COCO: class index = category id).
    ``class_ids``: keep the background and these checkpoint classes, in this order (our label i + 1 = checkpoint
    class ``class_ids[i]``); the state_dict is then for ``tf_maskrcnn(model_id, len(class_ids) + 1)``.
    """
    variables = _read_checkpoint(Path(path))
    with torch.device("meta"):  # only the names and shapes are needed
        model = tf_maskrcnn(model_id, num_classes)
    converted: dict[str, Tensor] = {}
    _convert_backbone(variables, model.backbone, converted)
    _convert_rpn_head(_layer_variables(variables, "rpn_head"), converted)
    _convert_box_head(_layer_variables(variables, "detection_head"), converted, model.roi_heads.box_roi_pool)
    _convert_mask_head(_layer_variables(variables, "mask_head"), converted)
    converted = _complete(converted, model.state_dict(), path, model_id, num_classes)
    if class_ids is not None:
        ids = [0, *_checked_class_ids(class_ids, num_classes, least=1)]  # the background stays class 0
        for key, rows in (("roi_heads.box_predictor.cls_score", 1), ("roi_heads.box_predictor.bbox_pred", 4),
                          ("roi_heads.mask_predictor.mask_logits", 1)):  # fmt: skip
            for field in ("weight", "bias"):
                value = converted[f"{key}.{field}"]
                converted[f"{key}.{field}"] = value.view(num_classes, rows, *value.shape[1:])[ids].flatten(0, 1)
    return converted


def _complete(converted: dict[str, Tensor], target: dict[str, Tensor], path, model_id: str,
              num_classes: int | None) -> dict[str, Tensor]:  # fmt: skip
    """``converted`` in ``target``'s key order, with zero ``num_batches_tracked``; ``ValueError`` for a missing
    parameter or a shape that differs from ``target``'s (``num_classes`` None: a backbone's)."""
    missing = sorted(k for k in target if k not in converted and not k.endswith("num_batches_tracked"))
    if missing:
        raise ValueError(f"checkpoint {path} has no values for {len(missing)} parameters, e.g. {missing[:3]}")
    for key, value in target.items():
        if key.endswith("num_batches_tracked"):
            converted[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif converted[key].shape != value.shape:
            raise ValueError(
                f"checkpoint {path}: {key} has shape {tuple(converted[key].shape)} but SpineNet-{model_id}"
                f"{'' if num_classes is None else f' with {num_classes} classes'} needs {tuple(value.shape)}: is it a "
                f"SpineNet-{model_id} checkpoint?"
            )
    return {key: converted[key] for key in target}


def _read_checkpoint(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``checkpoint key -> (full_name, value)`` for every model variable (not optimizer slots)."""
    tf = require("tensorflow")
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    prefix = tf.train.latest_checkpoint(str(path)) if path.is_dir() else str(path)
    if prefix is None or not Path(prefix + ".index").is_file():
        raise FileNotFoundError(
            f"{path} is not a TF checkpoint: expected a prefix such as ckpt-1 (with ckpt-1.index beside it) "
            "or a directory holding one"
        )
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return {
        a.checkpoint_key: (a.full_name, reader.get_tensor(a.checkpoint_key))
        for node in graph.nodes
        for a in node.attributes
        if a.checkpoint_key.endswith(VARIABLE) and ".OPTIMIZER_SLOT" not in a.checkpoint_key
    }


def _tensor(value: np.ndarray) -> Tensor:
    value = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
    return value.permute(3, 2, 0, 1).contiguous() if value.dim() == 4 else value  # HWIO -> OIHW


def _put_conv_norm(prefix: str, conv: dict[str, np.ndarray], norm: dict[str, np.ndarray], out: dict) -> None:
    """One ConvNorm (``prefix.conv``, ``prefix.bn``) from a Keras conv's and BN's variables."""
    out[f"{prefix}.conv.weight"] = _tensor(conv["kernel"])
    for tf_name, ours in BN_FIELDS.items():
        out[f"{prefix}.bn.{ours}"] = _tensor(norm[tf_name])


def _convert_backbone(variables: dict, backbone: nn.Module, out: dict[str, Tensor]) -> None:
    layers = _backbone_layers(variables)
    convs, norms = layers.pop("conv2d", []), layers.pop("batch_normalization", [])
    ours = _top_level_conv_norms(backbone)
    if len(convs) != len(norms) or len(convs) - len(ours) not in (0, EXTRA_L2_BLOCK_CONVS):
        raise ValueError(
            f"the checkpoint's backbone has {len(convs)} top-level convs and {len(norms)} BNs, SpineNet-"
            f"{backbone.model_id} has {len(ours)}: is it a SpineNet-{backbone.model_id} checkpoint?"
        )
    if len(convs) > len(ours):  # drop the 16th block's convs, created just before the endpoints
        skip = slice(len(ours) - len(backbone.endpoints), len(convs) - len(backbone.endpoints))
        del convs[skip], norms[skip]
    for prefix, conv, norm in zip(ours, convs, norms):
        _put_conv_norm(f"backbone.{prefix}", conv, norm, out)
    for kind, blocks in _our_blocks(backbone).items():
        theirs = layers.pop(kind, [])
        if len(theirs) - len(blocks) not in (0, backbone.scaling.block_repeats if kind == "bottleneck_block" else 0):
            raise ValueError(
                f"the checkpoint's backbone has {len(theirs)} {kind}s, SpineNet-{backbone.model_id} has "
                f"{len(blocks)}: is it a SpineNet-{backbone.model_id} checkpoint?"
            )
        for (prefix, block), tf_block in zip(blocks, theirs):  # the 16th block's come last and are left out
            for part in ("shortcut", "conv1", "conv2", "conv3"):
                if getattr(block, part, None) is None:
                    continue
                index = "0" if part == "shortcut" else part[-1]
                conv = _sub(tf_block, "_shortcut" if part == "shortcut" else f"_conv{index}")
                _put_conv_norm(f"backbone.{prefix}.{part}", conv, _sub(tf_block, f"_norm{index}"), out)
    if layers:
        raise ValueError(f"the checkpoint's backbone has layers we do not know: {sorted(layers)}")


def _backbone_layers(variables: dict) -> dict[str, list[dict[str, np.ndarray]]]:
    """Keras layers of the backbone by kind, each kind in creation order: ``kind -> [{var path: value}]``."""
    pattern = re.compile(r"(?:^|/)_?backbone/layer_with_weights-\d+/(.+)" + re.escape(VARIABLE) + "$")
    by_layer: dict[tuple[str, int], dict[str, np.ndarray]] = defaultdict(dict)
    for key, (full_name, value) in variables.items():
        match = pattern.search(key)
        if match is None:
            continue
        inner = match.group(1)  # "kernel" or "_conv1/kernel"
        names = full_name.split("/")
        layer = names[-len(inner.split("/")) - 1]
        name = LAYER_NAME.fullmatch(layer)
        if name is None:
            raise ValueError(f"checkpoint variable {key} ({full_name}) is not from a SpineNet layer")
        by_layer[(name.group(1), int(name.group(2) or 0))][inner] = value
    if not by_layer:
        raise ValueError("the checkpoint has no backbone/layer_with_weights-* variables: not a Model Garden SpineNet")
    kinds: dict[str, list] = defaultdict(list)
    for kind, number in sorted(by_layer):
        kinds[kind].append(by_layer[(kind, number)])
    return kinds


def _sub(layer: dict[str, np.ndarray], attribute: str) -> dict[str, np.ndarray]:
    """The variables of sub-layer ``attribute`` (``_conv1``) of a Keras block."""
    found = {k.split("/", 1)[1]: v for k, v in layer.items() if k.startswith(attribute + "/")}
    if not found:
        raise ValueError(f"a checkpoint block has no {attribute} variables (it has {sorted(layer)})")
    return found


def _top_level_conv_norms(backbone: nn.Module) -> list[str]:
    """Our ConvNorm prefixes in Model Garden's creation order of top-level conv/BN layers."""
    prefixes = ["stem.conv"]
    for k, merge in enumerate(backbone.merges):
        for r, resample in enumerate(merge.resamples):
            parts = ("squeeze", "down", "expand")
            prefixes += [f"merges.{k}.resamples.{r}.{p}" for p in parts if getattr(resample, p) is not None]
    return prefixes + [f"endpoints.{name}" for name in backbone.endpoints]


def _our_blocks(backbone: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Our blocks by Keras kind, in Model Garden's creation order (stem groups, then the block table)."""
    groups = [(f"init_groups.{g}", group) for g, group in enumerate(backbone.init_groups)]
    groups += [(f"groups.{k}", group) for k, group in enumerate(backbone.groups)]
    blocks: dict[str, list] = {"bottleneck_block": [], "residual_block": []}
    for prefix, group in groups:
        for i, block in enumerate(group):
            kind = "bottleneck_block" if hasattr(block, "conv3") else "residual_block"
            blocks[kind].append((f"{prefix}.{i}", block))
    return blocks


def _anchor_permutation(num_scales: int = NUM_SCALES) -> list[int]:
    """For each of our anchors (aspect-major, aspect = height / width) its Model Garden index
    (scale-major, aspect = width / height)."""
    return [
        scale * len(MG_ASPECT_RATIOS) + MG_ASPECT_RATIOS.index(1 / ratio)
        for ratio in ASPECT_RATIOS
        for scale in range(num_scales)
    ]


# A head conv's Keras variables -> our parameter suffixes: a plain conv, or a separable one (SpineNet-Mobile's).
CONV_FIELDS = {"kernel": "weight", "bias": "bias"}
SEPARABLE_FIELDS = {"depthwise_kernel": "0.weight", "pointwise_kernel": "1.weight", "bias": "1.bias"}


def _convert_head(variables: dict, out: dict[str, Tensor], num_classes: int, separable: bool = False) -> None:
    pattern = re.compile(r"(?:^|/)_?head/(.+)" + re.escape(VARIABLE) + "$")
    head = {m.group(1): value for key, (_, value) in variables.items() if (m := pattern.search(key))}
    if not head:
        raise ValueError("the checkpoint has no head/* variables: not a Model Garden RetinaNet")
    fields = SEPARABLE_FIELDS if separable else CONV_FIELDS
    for tf_tower, tower in (("cls", "class_tower"), ("box", "box_tower")):
        for name, value in head.items():
            conv = re.fullmatch(rf"_{tf_tower}_convs/(\d+)/(\w+)", name)
            norm = re.fullmatch(rf"_{tf_tower}_norms/(\d+)/(\d+)/(\w+)", name)
            if conv and conv.group(2) in fields:
                out[f"head.{tower}.convs.{conv.group(1)}.{fields[conv.group(2)]}"] = _head_tensor(value)
            elif norm and norm.group(3) in BN_FIELDS:
                out[f"head.{tower}.norms.{norm.group(1)}.{norm.group(2)}.{BN_FIELDS[norm.group(3)]}"] = _tensor(value)
    anchors = _anchor_permutation()
    for tf_name, ours, per_anchor, order in (
        ("_classifier", "class_predictor", num_classes, list(range(num_classes))),
        ("_box_regressor", "box_predictor", 4, BOX_ORDER),
    ):
        output_kernel = "pointwise_kernel" if separable else "kernel"
        if f"{tf_name}/{output_kernel}" not in head:
            raise ValueError(f"the checkpoint's head has no {tf_name}/{output_kernel} (shared across levels, as "
                             f"SpineNet's is{', separable as SpineNet-Mobile' if separable else ''})")  # fmt: skip
        kernel = _tensor(head[f"{tf_name}/{output_kernel}"])
        if kernel.shape[0] != len(anchors) * per_anchor:
            raise ValueError(
                f"the checkpoint's {tf_name} has {kernel.shape[0]} outputs, {len(anchors)} anchors × {per_anchor} "
                f"expected{' (is num_classes right?)' if per_anchor == num_classes else ''}"
            )
        channels = torch.tensor([a * per_anchor + j for a in anchors for j in order])
        output = f"head.{ours}.1" if separable else f"head.{ours}"
        out[f"{output}.weight"] = kernel[channels].contiguous()
        out[f"{output}.bias"] = _tensor(head[f"{tf_name}/bias"])[channels].contiguous()
        if separable:
            out[f"head.{ours}.0.weight"] = _head_tensor(head[f"{tf_name}/depthwise_kernel"])


def _head_tensor(value: np.ndarray) -> Tensor:
    """A head conv variable as ours: depthwise kernels (H, W, C, 1) -> (C, 1, H, W), the rest as :func:`_tensor`."""
    if value.ndim == 4 and value.shape[3] == 1 and value.shape[2] > 1:
        return torch.from_numpy(np.asarray(value, dtype=np.float32).copy()).permute(2, 3, 0, 1).contiguous()
    return _tensor(value)


def _checked_class_ids(class_ids: Sequence[int], num_classes: int, least: int = 0) -> list[int]:
    ids = list(class_ids)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not least <= i < num_classes for i in ids):
        raise ValueError(f"class_ids must be a non-empty list of ints in [{least}, {num_classes}), got {class_ids!r}")
    return ids


def _select_classes(state: dict[str, Tensor], num_anchors: int, num_classes: int, class_ids: Sequence[int],
                    predictor: str = "head.class_predictor") -> None:  # fmt: skip
    ids = _checked_class_ids(class_ids, num_classes)
    for key in (f"{predictor}.weight", f"{predictor}.bias"):
        value = state[key]
        state[key] = value.view(num_anchors, num_classes, *value.shape[1:])[:, ids].reshape(-1, *value.shape[1:])


def _layer_variables(variables: dict, layer: str) -> dict[str, np.ndarray]:
    """``{path inside the layer: value}`` of Model Garden's Mask R-CNN layer ``layer`` (``rpn_head``,
    ``detection_head`` — saved under ``_config_dict/`` or as the first of a list — or ``mask_head``)."""
    pattern = re.compile(rf"(?:^|/){layer}/(?:0/)?(.+)" + re.escape(VARIABLE) + "$")
    found = {m.group(1): value for key, (_, value) in variables.items() if (m := pattern.search(key))}
    if not found:
        raise ValueError(f"the checkpoint has no {layer}/* variables: not a Model Garden Mask R-CNN")
    return found


def _put_indexed(layer: dict[str, np.ndarray], tf_list: str, ours: str, out: dict[str, Tensor]) -> None:
    """Model Garden's list ``tf_list`` (``_convs/<i>/kernel``, ``_norms/<l>/<i>/gamma``) -> ``ours.<i>...``:
    ``{}`` in ``ours`` takes the list indices; conv kernels and BN variables are converted."""
    for name, value in layer.items():
        match = re.fullmatch(rf"{tf_list}/([\d/]+)/(\w+)", name)
        if match is None:
            continue
        prefix = ours.format(*match.group(1).split("/"))
        field = match.group(2)
        if field in ("kernel", "bias"):
            out[f"{prefix}.{'weight' if field == 'kernel' else 'bias'}"] = _tensor(value)
        elif field in BN_FIELDS:
            out[f"{prefix}.{BN_FIELDS[field]}"] = _tensor(value)


def _predictor(layer: dict[str, np.ndarray], tf_name: str) -> tuple[Tensor, Tensor]:
    if f"{tf_name}/kernel" not in layer:
        raise ValueError(f"the checkpoint has no {tf_name}: not a Model Garden Mask R-CNN head")
    return _tensor(layer[f"{tf_name}/kernel"]), _tensor(layer[f"{tf_name}/bias"])


def _convert_rpn_head(layer: dict[str, np.ndarray], out: dict[str, Tensor]) -> None:
    _put_indexed(layer, "_convs", "rpn.head.tower.convs.{}", out)
    _put_indexed(layer, "_norms", "rpn.head.tower.norms.{}.{}", out)
    anchors = _anchor_permutation(num_scales=1)
    for tf_name, ours, per_anchor, order in (("_classifier", "cls_logits", 1, [0]),
                                             ("_box_regressor", "bbox_pred", 4, BOX_ORDER)):  # fmt: skip
        kernel, bias = _predictor(layer, tf_name)
        if kernel.shape[0] != len(anchors) * per_anchor:
            raise ValueError(f"the checkpoint's RPN {tf_name} has {kernel.shape[0]} outputs, "
                             f"{len(anchors) * per_anchor} expected (3 anchors per location)")  # fmt: skip
        channels = torch.tensor([a * per_anchor + j for a in anchors for j in order])
        out[f"rpn.head.{ours}.weight"] = kernel[channels].contiguous()
        out[f"rpn.head.{ours}.bias"] = bias[channels].contiguous()


def _convert_box_head(layer: dict[str, np.ndarray], out: dict[str, Tensor], roi_pool: nn.Module) -> None:
    _put_indexed(layer, "_convs", "roi_heads.box_head.convs.{}.0", out)
    _put_indexed(layer, "_conv_norms", "roi_heads.box_head.convs.{}.1", out)
    _put_indexed(layer, "_fc_norms", "roi_heads.box_head.fc_norms.{}", out)
    fcs = sorted(int(m.group(1)) for name in layer if (m := re.fullmatch(r"_fcs/(\d+)/kernel", name)))
    size = roi_pool.output_size[0]
    for i in fcs:
        kernel = _tensor(layer[f"_fcs/{i}/kernel"]).t()  # (out, in)
        if i == 0:  # inputs (H, W, C)-flattened -> (C, H, W)
            channels = kernel.shape[1] // (size * size)
            kernel = kernel.reshape(-1, size, size, channels).permute(0, 3, 1, 2).reshape(kernel.shape[0], -1)
        out[f"roi_heads.box_head.fcs.{i}.weight"] = kernel.contiguous()
        out[f"roi_heads.box_head.fcs.{i}.bias"] = _tensor(layer[f"_fcs/{i}/bias"])
    kernel, bias = _predictor(layer, "_classifier")
    out["roi_heads.box_predictor.cls_score.weight"], out["roi_heads.box_predictor.cls_score.bias"] = kernel.t(), bias
    kernel, bias = _predictor(layer, "_box_regressor")
    channels = torch.arange(kernel.shape[1]).view(-1, 4)[:, BOX_ORDER].reshape(-1)
    out["roi_heads.box_predictor.bbox_pred.weight"] = kernel.t()[channels].contiguous()
    out["roi_heads.box_predictor.bbox_pred.bias"] = bias[channels].contiguous()


def _convert_mask_head(layer: dict[str, np.ndarray], out: dict[str, Tensor]) -> None:
    _put_indexed(layer, "_convs", "roi_heads.mask_head.{}.0", out)
    _put_indexed(layer, "_conv_norms", "roi_heads.mask_head.{}.1", out)
    for tf_name, ours in (("_deconv", "upsample"), ("_mask_regressor", "mask_logits")):
        kernel, bias = _predictor(layer, tf_name)  # the transposed conv's (H, W, out, in) -> (in, out, H, W)
        out[f"roi_heads.mask_predictor.{ours}.weight"], out[f"roi_heads.mask_predictor.{ours}.bias"] = kernel, bias
    for tf_name, ours in BN_FIELDS.items():
        if f"_deconv_bn/{tf_name}" not in layer:
            raise ValueError("the checkpoint's mask head has no _deconv_bn: not a Model Garden Mask R-CNN")
        out[f"roi_heads.mask_predictor.norm.{ours}"] = _tensor(layer[f"_deconv_bn/{tf_name}"])
