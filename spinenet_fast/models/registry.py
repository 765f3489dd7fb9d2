"""Builders by name, in the style of ``torchvision.models.get_model``.

``spinenet<id>`` is the backbone (:class:`~spinenet_fast.models.SpineNet`), ``spinenet<id>_cls`` the classifier
(:class:`~spinenet_fast.models.SpineNetClassifier`), ``retinanet_spinenet<id>`` and ``maskrcnn_spinenet<id>`` the
detectors (:func:`~spinenet_fast.detection.retinanet_spinenet`, :func:`~spinenet_fast.detection.maskrcnn_spinenet`),
for every official id (``49s``, ``49``, ``96``, ``143``,
``143l``, ``190``; any case); ``spinenet_mobile<id>`` and ``retinanet_spinenet_mobile<id>`` the SpineNet-Mobile
backbone and RetinaNet (:class:`~spinenet_fast.models.SpineNetMobile`,
:func:`~spinenet_fast.detection.retinanet_spinenet_mobile`) for ``49``, ``49s``, ``49xs``. Keyword arguments go to
the builder.
"""

from __future__ import annotations

from torch import nn

from .classifier import spinenet_classifier
from .spinenet import SCALING_MAP, SpineNet
from .spinenet_mobile import MOBILE_SCALING_MAP, SpineNetMobile

PREFIXES = ("spinenet", "retinanet_spinenet", "maskrcnn_spinenet")
MOBILE_PREFIXES = ("spinenet_mobile", "retinanet_spinenet_mobile")
CLASSIFIER_SUFFIX = "_cls"


def list_models() -> list[str]:
    """Every name :func:`get_model` builds."""
    ids = [model_id.lower() for model_id in SCALING_MAP]
    names = [f"{prefix}{model_id}" for prefix in PREFIXES for model_id in ids]
    names += [f"spinenet{model_id}{CLASSIFIER_SUFFIX}" for model_id in ids]
    return names + [f"{prefix}{model_id.lower()}" for prefix in MOBILE_PREFIXES for model_id in MOBILE_SCALING_MAP]


def get_model(name: str, **kwargs) -> nn.Module:
    """The model called ``name`` (see :func:`list_models`), built with ``kwargs``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str such as 'retinanet_spinenet49', got {type(name).__name__}")
    key = name.lower()
    if key.endswith(CLASSIFIER_SUFFIX) and key.startswith("spinenet"):
        model_id = key.removeprefix("spinenet").removesuffix(CLASSIFIER_SUFFIX).upper()
        if model_id in SCALING_MAP:
            return spinenet_classifier(model_id, **kwargs)
    for prefix in MOBILE_PREFIXES:
        model_id = key.removeprefix(prefix).upper()
        if key.startswith(prefix) and model_id in MOBILE_SCALING_MAP:
            if prefix == "spinenet_mobile":
                return SpineNetMobile(model_id, **kwargs)
            from ..detection import retinanet_spinenet_mobile

            return retinanet_spinenet_mobile(model_id, **kwargs)
    for prefix in PREFIXES:
        model_id = key.removeprefix(prefix).upper()
        if key.startswith(prefix) and model_id in SCALING_MAP:
            if prefix == "spinenet":
                return SpineNet(model_id, **kwargs)
            from .. import detection

            return getattr(detection, prefix)(model_id, **kwargs)  # the builder of that name
    raise ValueError(f"name must be one of {list_models()}, got {name!r}")
