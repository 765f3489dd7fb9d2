"""SpineNet models: the block table, the builder and its layers."""

from .classifier import SpineNetClassifier
from .registry import get_model, list_models
from .spinenet import SCALING_MAP, SPINENET_BLOCK_SPECS, BlockSpec, SpineNet, SpineNetScaling
from .spinenet_mobile import MOBILE_SCALING_MAP, SpineNetMobile

__all__ = [
    "MOBILE_SCALING_MAP",
    "SCALING_MAP",
    "SPINENET_BLOCK_SPECS",
    "BlockSpec",
    "SpineNet",
    "SpineNetClassifier",
    "SpineNetMobile",
    "SpineNetScaling",
    "get_model",
    "list_models",
]
