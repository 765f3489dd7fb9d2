"""RetinaNet anchors of SpineNet detectors, in torchvision's or TF Model Garden's placement.

Per level l: sides ``anchor_size · 2^l · 2^(i / num_scales)`` for each scale i, × aspect ratios (0.5, 1, 2)
(torchvision's convention: height / width), ordered aspect-major as torchvision's ``AnchorGenerator``.
Style ``"torchvision"`` centres anchors on the pixel grid ``(i·s, j·s)`` with sides rounded to whole pixels;
style ``"tf"`` (the official models', needed by converted checkpoints) centres them on the cells
``((i + ½)·s, (j + ½)·s)`` with exact sides.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator

from ..models.layers import check_choice

ASPECT_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_STYLES = ("torchvision", "tf")


class CellCenteredAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` with TF Model Garden placement: anchors centred on cells, sides not rounded."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[Tensor]]) -> list[Tensor]:
        anchors = super().grid_anchors(grid_sizes, strides)
        return [a + torch.stack([sw, sh, sw, sh]).to(a) / 2 for a, (sh, sw) in zip(anchors, strides)]


def spinenet_anchor_generator(
    anchor_size: float, min_level: int = 3, max_level: int = 7, num_scales: int = 3, style: str = "torchvision"
) -> AnchorGenerator:
    """The anchors of levels ``min_level…max_level`` (see the module docstring), 3 × 3 per location."""
    check_choice("style", style, ANCHOR_STYLES)
    sizes = tuple(
        tuple(anchor_size * 2**level * 2 ** (i / num_scales) for i in range(num_scales))
        for level in range(min_level, max_level + 1)
    )
    generator = CellCenteredAnchorGenerator if style == "tf" else AnchorGenerator
    return generator(sizes, (ASPECT_RATIOS,) * len(sizes))


def flatten_per_anchor(x: Tensor, values_per_anchor: int) -> Tensor:
    """(N, A·V, H, W) -> (N, H·W·A, V), torchvision's anchor order."""
    n, channels, h, w = x.shape
    anchors = channels // values_per_anchor  # explicit: an empty batch has no size to infer
    return (
        x.view(n, anchors, values_per_anchor, h, w)
        .permute(0, 3, 4, 1, 2)
        .reshape(n, h * w * anchors, values_per_anchor)
    )
