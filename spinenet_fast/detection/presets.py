"""Named detector presets: the official ids, plus custom scalings that are named as such."""

from __future__ import annotations

from torch import nn

from ..models.spinenet import SCALING_MAP, SpineNetScaling
from ..models.spinenet_mobile import MOBILE_SCALING_MAP
from .maskrcnn import maskrcnn_spinenet
from .mobile import retinanet_spinenet_mobile
from .retinanet import retinanet_spinenet

# Not an official SpineNet: a narrower 49 for CPU demos (about a quarter of 49S's width).
CUSTOM_SCALINGS = {
    "49XS-custom": SpineNetScaling(
        filter_size_scale=0.25, resample_alpha=0.5, block_repeats=1, endpoints_num_filters=48
    ),
}
# The custom scalings' Mask R-CNN settings that differ from the official ones: CPU-sized RoI samples (official: 512
# RoIs per image; the box head's convs over them were 2/3 of a CPU training step).
CUSTOM_MASKRCNN_SETTINGS = {"49XS-custom": {"box_batch_size_per_image": 128}}
# SpineNet-Mobile (RetinaNet only): "mobile-49", "mobile-49S", "mobile-49XS".
MOBILE_NAMES = {f"mobile-{model_id}": model_id for model_id in MOBILE_SCALING_MAP}
MODEL_NAMES = (*SCALING_MAP, *CUSTOM_SCALINGS, *MOBILE_NAMES)
# task -> (builder, its name, label offset: 1 where class 0 is the background)
TASKS = {"box": (retinanet_spinenet, "RetinaNet", 0), "mask": (maskrcnn_spinenet, "Mask R-CNN", 1)}
# The training CLI's defaults that differ per task (None: the task's): the official recipes' activation and
# stochastic depth (RetinaNet: protocol C's swish and 0.2; Mask R-CNN: ReLU and none).
TASK_DEFAULTS = {"box": {"activation": "swish"}, "mask": {"activation": "relu", "stochastic_depth_rate": 0.0}}


def build_detector(name: str, num_classes: int, *, task: str = "box", **kwargs) -> nn.Module:
    """The ``task``'s detector (``"box"``: ``retinanet_spinenet``, ``"mask"``: ``maskrcnn_spinenet``) for an official
    id or a named custom scaling (``MODEL_NAMES``); ``num_classes`` object classes (the background added for
    Mask R-CNN)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {list(MODEL_NAMES)}, got {name!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    builder, _, offset = TASKS[task]
    if name in MOBILE_NAMES:
        if task != "box":
            raise ValueError(f"the SpineNet-Mobile models are RetinaNets: --task box, got --task {task}")
        if kwargs.get("stochastic_depth_rate") is None:
            kwargs.pop("stochastic_depth_rate", None)  # the Mobile recipe's 0.2
        return retinanet_spinenet_mobile(MOBILE_NAMES[name], num_classes, **kwargs)
    if task == "mask":
        kwargs = {**CUSTOM_MASKRCNN_SETTINGS.get(name, {}), **kwargs}
    return builder(CUSTOM_SCALINGS.get(name, name), num_classes + offset, **kwargs)


def label_offset(args: dict) -> int:
    """What the run's detector adds to the dataset's contiguous labels (1 for Mask R-CNN's background)."""
    return TASKS[args.get("task", "box")][2]


def task_setting(args: dict, name: str):
    """``args[name]``, or the task's default where the run left it None."""
    value = args.get(name)
    return TASK_DEFAULTS[args.get("task", "box")].get(name) if value is None else value


def detector_from_args(args: dict, num_classes: int) -> nn.Module:
    """Rebuild the detector a training run used, from its saved ``args`` dict (``num_classes`` object classes); a
    ``padding`` the args do not name is the builder's (``"torch"``; SpineNet-Mobile's ``"tf_same"``)."""
    padding = {"padding": args["padding"]} if args.get("padding") is not None else {}
    return build_detector(
        args["model"],
        num_classes,
        task=args.get("task", "box"),
        image_size=args["image_size"],
        activation=task_setting(args, "activation"),
        bn_momentum=args["bn_momentum"],
        stochastic_depth_rate=task_setting(args, "stochastic_depth_rate"),
        fused={"true": True, "false": False}.get(args.get("fused", "auto"), "auto"),
        **padding,
        bn_eps=args.get("bn_eps", 1e-3),
        anchor_style=args.get("anchor_style", "torchvision"),
    )
