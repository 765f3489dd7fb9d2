"""RetinaNet- and Mask R-CNN-SpineNet builders registered with torchvision's model registry, so that
``torchvision.models.get_model("retinanet_spinenet49", weights=None, num_classes=...)`` (``maskrcnn_spinenet49``
and the SpineNet-Mobile ``retinanet_spinenet_mobile49`` / ``49s`` / ``49xs`` alike) — and torchvision's detection
reference scripts (``train.py --model maskrcnn_spinenet49``, after ``import spinenet_fast``) — build them.

They take torchvision's detection builder keywords: ``weights`` / ``weights_backbone`` (None: no pretrained weights
ship with this package; a clear error otherwise), ``progress``, ``num_classes`` (default 91),
``trainable_backbone_layers`` (None or 5: every layer trains — there is no pretrained backbone to freeze), and the
rest of the builder's keywords (:func:`~spinenet_fast.detection.retinanet_spinenet`,
:func:`~spinenet_fast.detection.maskrcnn_spinenet`) (``_skip_resize`` included).
"""

from __future__ import annotations

import functools

from torchvision.models._api import register_model

from ..models.spinenet import SCALING_MAP
from ..models.spinenet_mobile import MOBILE_SCALING_MAP
from .maskrcnn import maskrcnn_spinenet
from .mobile import retinanet_spinenet_mobile
from .retinanet import retinanet_spinenet

NO_WEIGHTS = (
    "no pretrained {what} ship with spinenet-fast (got {value!r}): convert TF Model Garden's RetinaNet-SpineNet "
    "checkpoint with `python -m spinenet_fast.convert` and load the state_dict it writes"
)


def _build(builder, model_id: str, *, weights=None, progress: bool = True, num_classes: int | None = None,
           weights_backbone=None, trainable_backbone_layers: int | None = None,
           **kwargs):  # fmt: skip
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
    return builder(model_id, 91 if num_classes is None else num_classes, **kwargs)


def model_name(model_id: str, detector: str = "retinanet") -> str:
    """The registered name of a model id: ``"49S"`` -> ``"retinanet_spinenet49s"`` (``"maskrcnn_spinenet49s"``)."""
    return f"{detector}_spinenet{model_id.lower()}"


for _model_id in SCALING_MAP:
    for _detector, _builder in (("retinanet", retinanet_spinenet), ("maskrcnn", maskrcnn_spinenet)):
        register_model(model_name(_model_id, _detector))(functools.partial(_build, _builder, _model_id))
for _model_id in MOBILE_SCALING_MAP:
    register_model(f"retinanet_spinenet_mobile{_model_id.lower()}")(
        functools.partial(_build, retinanet_spinenet_mobile, _model_id)
    )
