"""SpineNet models: the block table, the builder and its layers."""

from .classifier import SpineNetClassifier
from .registry import get_model, list_models
from .spinenet import SCALING_MAP, SPINENET_BLOCK_SPECS, BlockSpec, SpineNet, SpineNetScaling

__all__ = [
    "SCALING_MAP",
    "SPINENET_BLOCK_SPECS",
    "BlockSpec",
    "SpineNet",
    "SpineNetClassifier",
    "SpineNetScaling",
    "get_model",
    "list_models",
]
