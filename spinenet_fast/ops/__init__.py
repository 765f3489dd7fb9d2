"""Fused ops (cross-scale connections, RetinaNet matching and loss): ``torch.library`` custom ops with reference,
Triton and CUDA (extension) backends."""

from .backends import set_backend, use_backend
from .bn_act_maxpool import bn_act_maxpool, bn_act_maxpool_reference
from .bn_finalize import bn_finalize, bn_finalize_reference
from .conv1x1_bn import conv1x1_bn, conv1x1_bn_backward_reference
from .conv1x1_bn_pair import conv1x1_bn_pair
from .conv1x1_bn_stats import conv1x1_bn_stats, conv1x1_bn_stats_reference
from .conv3x3_bn import conv3x3_bn, conv3x3_bn_backward_reference
from .conv3x3_bn_stats import conv3x3_bn_stats, conv3x3_bn_stats_reference
from .conv3x3_levels import conv3x3_bn_levels, conv3x3_levels, level_views, pack_levels
from .expand_merge import expand_merge, expand_merge_reference
from .expand_merge_affine import expand_merge_affine, expand_merge_affine_for_readers, expand_merge_affine_reference
from .match_anchors import match_anchors, match_anchors_reference
from .merge import merge, merge_backward_reference, merge_for_readers, merge_reference
from .pooled_conv1x1_bn import pooled_conv1x1_bn
from .retinanet_loss import retinanet_loss, retinanet_loss_reference

__all__ = [
    "bn_act_maxpool",
    "bn_act_maxpool_reference",
    "bn_finalize",
    "bn_finalize_reference",
    "conv1x1_bn",
    "conv1x1_bn_backward_reference",
    "conv1x1_bn_pair",
    "conv1x1_bn_stats",
    "conv1x1_bn_stats_reference",
    "conv3x3_bn",
    "conv3x3_bn_backward_reference",
    "conv3x3_bn_levels",
    "conv3x3_bn_stats",
    "conv3x3_bn_stats_reference",
    "conv3x3_levels",
    "expand_merge",
    "expand_merge_affine",
    "expand_merge_affine_for_readers",
    "expand_merge_affine_reference",
    "expand_merge_reference",
    "level_views",
    "match_anchors",
    "match_anchors_reference",
    "merge",
    "merge_backward_reference",
    "merge_for_readers",
    "merge_reference",
    "pack_levels",
    "pooled_conv1x1_bn",
    "retinanet_loss",
    "retinanet_loss_reference",
    "set_backend",
    "use_backend",
]
