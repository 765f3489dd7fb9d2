"""Named detector presets: the official ids, plus custom scalings that are named as such."""

from __future__ import annotations

from ..models.spinenet import SCALING_MAP, SpineNetScaling
from .retinanet import SpineNetRetinaNet, retinanet_spinenet

# Not an official SpineNet: a narrower 49 for CPU demos (about a quarter of 49S's width).
CUSTOM_SCALINGS = {
    "49XS-custom": SpineNetScaling(
        filter_size_scale=0.25, resample_alpha=0.5, block_repeats=1, endpoints_num_filters=48
    ),
}
MODEL_NAMES = (*SCALING_MAP, *CUSTOM_SCALINGS)


def build_detector(name: str, num_classes: int, **kwargs) -> SpineNetRetinaNet:
    """``retinanet_spinenet`` for an official id or a named custom scaling (``MODEL_NAMES``)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {list(MODEL_NAMES)}, got {name!r}")
    return retinanet_spinenet(CUSTOM_SCALINGS.get(name, name), num_classes, **kwargs)


def detector_from_args(args: dict, num_classes: int) -> SpineNetRetinaNet:
    """Rebuild the detector a training run used, from its saved ``args`` dict."""
    return build_detector(
        args["model"],
        num_classes,
        image_size=args["image_size"],
        activation=args["activation"],
        bn_momentum=args["bn_momentum"],
        stochastic_depth_rate=args["stochastic_depth_rate"],
        fused={"true": True, "false": False}.get(args.get("fused", "auto"), "auto"),
        padding=args.get("padding", "torch"),
        bn_eps=args.get("bn_eps", 1e-3),
        anchor_style=args.get("anchor_style", "torchvision"),
    )
