"""Cross-scale connections: resample each parent to the target block's level and width, then merge.

Equivalent to architecture.md §5: squeeze 1×1 (α·C) + BN + act -> [3×3/s2 conv + BN + act, 3×3/s2 max-pools |
nearest upsample] -> expand 1×1 + BN -> sum of the parents (+ raw extra inputs) -> act. NCHW throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused_merge import RunningAffines, expand_input_layers, fused_merge_forward
from .layers import ConvNorm, FusedSetting, MaxPool3x3s2, NormFactory, make_activation


def squeeze_channels(parent_channels: int, parent_type: str, resample_alpha: float) -> int:
    """Width of a connection's low-resolution path: ``int(C · α)``, with C /= 4 for a bottleneck parent."""
    base = parent_channels / 4 if parent_type == "bottleneck" else parent_channels
    return int(base * resample_alpha)


class Resample(nn.Module):
    """One parent -> target connection.

    x: (N, parent_channels, H·2^(t-p), W·2^(t-p)) at the parent's level p -> (N, target_channels, H, W) at level t.
    """

    def __init__(
        self,
        parent_channels: int,
        parent_type: str,
        parent_level: int,
        target_channels: int,
        target_level: int,
        resample_alpha: float,
        norm: NormFactory,
        activation: str,
        padding: str,
    ) -> None:
        super().__init__()
        mid = squeeze_channels(parent_channels, parent_type, resample_alpha)
        self.parent_level = parent_level
        self.target_level = target_level
        self.squeeze = ConvNorm(parent_channels, mid, 1, norm, activation=activation, padding=padding)
        if target_level > parent_level:
            self.down = ConvNorm(mid, mid, 3, norm, stride=2, activation=activation, padding=padding)
            self.pools = nn.Sequential(*(MaxPool3x3s2(padding) for _ in range(target_level - parent_level - 1)))
        else:
            self.down = None
            self.pools = None
        self.expand = ConvNorm(mid, target_channels, 1, norm, padding=padding)

    @property
    def upsample_factor(self) -> int:
        return 2 ** max(self.parent_level - self.target_level, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        if self.down is not None:
            x = self.pools(self.down(x))
        elif self.upsample_factor > 1:
            x = F.interpolate(x, scale_factor=self.upsample_factor, mode="nearest")
        return self.expand(x)


class CrossScaleMerge(FusedSetting, nn.Module):
    """The input of one scale-permuted block: ``act(Σ resample_i(feats[parent_i]) + Σ feats[extra_j])``.

    ``parent_ids`` and ``extra_ids`` index the network's growing list of block outputs (all NCHW).
    With ``fused`` (True, or ``"auto"`` on a GPU) the same parameters run through the fused ops instead.
    """

    def __init__(
        self,
        resamples: list[Resample],
        parent_ids: tuple[int, ...],
        extra_ids: tuple[int, ...],
        activation: str,
        padding: str = "torch",
        fused: bool | str = False,
    ) -> None:
        super().__init__()
        self.resamples = nn.ModuleList(resamples)
        self.parent_ids = tuple(parent_ids)
        self.extra_ids = tuple(extra_ids)
        self.act = make_activation(activation)
        self.activation, self.padding = activation, padding
        self.fused = fused

    def norm_layers(self) -> list[nn.Module]:
        """The norm layer of each conv + norm layer the fused forward runs (squeeze, stride-2 conv, expand)."""
        return [layer.bn for r in self.resamples for layer, _ in [*expand_input_layers(r), (r.expand, True)]]

    def forward(self, feats: list[torch.Tensor], readers: int | None = None,
                affines: RunningAffines | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:  # fmt: skip
        """The merged map; with ``readers``, that many tensors of it, one per reader (fused: views whose gradients
        the merge backward sums as it loads them, ``ops.merge_for_readers``; eager: the same tensor). ``affines``
        (fused): the running-statistics norms' maps where the model computed them (``model_running_affines``)."""
        if self.runs_fused(feats[self.parent_ids[0]]):
            outputs = fused_merge_forward(self, feats, self.activation, self.padding, readers or 1, affines)
            return outputs[0] if readers is None else outputs
        x = self.resamples[0](feats[self.parent_ids[0]])
        for resample, i in zip(self.resamples[1:], self.parent_ids[1:]):
            x = x + resample(feats[i])
        for j in self.extra_ids:
            x = x + feats[j]
        x = self.act(x)
        return x if readers is None else (x,) * readers
