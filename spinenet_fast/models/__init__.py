"""SpineNet models: the block table, the builder and its layers."""

from .registry import get_model, list_models
from .spinenet import SCALING_MAP, SPINENET_BLOCK_SPECS, BlockSpec, SpineNet, SpineNetScaling

__all__ = [
    "SCALING_MAP",
    "SPINENET_BLOCK_SPECS",
    "BlockSpec",
    "SpineNet",
    "SpineNetScaling",
    "get_model",
    "list_models",
]
