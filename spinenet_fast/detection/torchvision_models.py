"""RetinaNet-SpineNet builders registered with torchvision's model registry, so that
``torchvision.models.get_model("retinanet_spinenet49", weights=None, num_classes=...)`` — and torchvision's detection
reference scripts (``train.py --model retinanet_spinenet49``, after ``import spinenet_fast``) — build them.

They take torchvision's detection builder keywords: ``weights`` / ``weights_backbone`` (None: no pretrained weights
ship with this package; a clear error otherwise), ``progress``, ``num_classes`` (default 91),
``trainable_backbone_layers`` (None or 5: every layer trains — there is no pretrained backbone to freeze), and the
rest of :func:`~spinenet_fast.detection.retinanet_spinenet`'s keywords (``_skip_resize`` included).
"""

from __future__ import annotations

import functools

from torchvision.models._api import register_model

from ..models.spinenet import SCALING_MAP
from .retinanet import SpineNetRetinaNet, retinanet_spinenet

NO_WEIGHTS = (
    "no pretrained {what} ship with spinenet-fast (got {value!r}): convert TF Model Garden's RetinaNet-SpineNet "
    "checkpoint with `python -m spinenet_fast.convert` and load the state_dict it writes"
)


def _build(model_id: str, *, weights=None, progress: bool = True, num_classes: int | None = None,
           weights_backbone=None, trainable_backbone_layers: int | None = None,
           **kwargs) -> SpineNetRetinaNet:  # fmt: skip
    del progress  # nothing is downloaded
    if weights is not None:
        raise ValueError(NO_WEIGHTS.format(what="weights", value=weights))
    if weights_backbone is not None:
        raise ValueError(NO_WEIGHTS.format(what="backbone weights", value=weights_backbone))
    if trainable_backbone_layers not in (None, 5):
        raise ValueError(
            "trainable_backbone_layers must be None or 5 (every SpineNet layer trains: there is no pretrained "
            f"backbone to freeze), got {trainable_backbone_layers!r}"
        )
    return retinanet_spinenet(model_id, 91 if num_classes is None else num_classes, **kwargs)


def model_name(model_id: str) -> str:
    """The registered name of a model id: ``"49S"`` -> ``"retinanet_spinenet49s"``."""
    return f"retinanet_spinenet{model_id.lower()}"


for _model_id in SCALING_MAP:
    register_model(model_name(_model_id))(functools.partial(_build, _model_id))
