"""SpineNet backbone (Du et al., CVPR 2020): the block table of architecture.md §3 and one builder that walks it.

Input: (N, 3, H, W) with H, W multiples of 128. Output: ``OrderedDict`` ``"p3"…"p7"`` of
(N, endpoints_num_filters, H / 2^l, W / 2^l), highest resolution first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..ops.padding import PADDING_MODES
from .blocks import BlockGroup, block_output_channels
from .endpoint import Endpoint
from .fused_merge import RunningAffines, modules_running_affines
from .layers import ACTIVATIONS, NormFactory, check_choice, fused_for_norm, make_norm_factory
from .resample import CrossScaleMerge, Resample
from .stem import Stem

FILTER_SIZE_MAP = {2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}
STEM_FILTERS = 64
MIN_OUTPUT_LEVEL, MAX_OUTPUT_LEVEL = 3, 7
SIZE_DIVISIBILITY = 2**7
DEFAULT_STOCHASTIC_DEPTH_RATE = 0.2


@dataclass(frozen=True)
class BlockSpec:
    """One scale-permuted block: its level, type, the two ``feats`` entries it reads and whether it is an output."""

    level: int
    block_type: str
    input_offsets: tuple[int, int]
    is_output: bool


SPINENET_BLOCK_SPECS: tuple[BlockSpec, ...] = tuple(
    BlockSpec(level, "bottleneck" if kind == "B" else "residual", inputs, output)
    for level, kind, inputs, output in (
        (2, "B", (0, 1), False),
        (4, "R", (0, 1), False),
        (3, "B", (2, 3), False),
        (4, "B", (2, 4), False),
        (6, "R", (3, 5), False),
        (4, "B", (3, 5), False),
        (5, "R", (6, 7), False),
        (7, "R", (6, 8), False),
        (5, "B", (8, 9), False),
        (5, "B", (8, 10), False),
        (4, "B", (5, 10), True),
        (3, "B", (4, 10), True),
        (5, "B", (7, 12), True),
        (7, "B", (5, 14), True),
        (6, "B", (12, 14), True),
    )
)


@dataclass(frozen=True)
class SpineNetScaling:
    """The numbers that distinguish the members of the SpineNet family (architecture.md §2)."""

    filter_size_scale: float
    resample_alpha: float
    block_repeats: int
    endpoints_num_filters: int

    def __post_init__(self) -> None:
        for name in ("filter_size_scale", "resample_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"model_id[{name!r}] must be a finite positive number, got {value!r}")
        for name in ("block_repeats", "endpoints_num_filters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model_id[{name!r}] must be a positive int, got {value!r}")
        if int(int(FILTER_SIZE_MAP[2] * self.filter_size_scale) * self.resample_alpha) < 1:
            raise ValueError(
                f"model_id: filter_size_scale={self.filter_size_scale} with resample_alpha={self.resample_alpha} "
                "leaves the level-2 connections with no channels"
            )


SCALING_MAP: dict[str, SpineNetScaling] = {
    "49S": SpineNetScaling(0.65, 0.5, 1, 128),
    "49": SpineNetScaling(1.0, 0.5, 1, 256),
    "96": SpineNetScaling(1.0, 0.5, 2, 256),
    "143": SpineNetScaling(1.0, 1.0, 3, 256),
    "143L": SpineNetScaling(1.3, 1.0, 3, 256),
    "190": SpineNetScaling(1.3, 1.0, 4, 512),
}


def resolve_scaling(model_id: str | Mapping | SpineNetScaling) -> SpineNetScaling:
    """An official id (``"49S"``, ``"49"``, ``"96"``, ``"143"``, ``"143L"``, ``"190"``) or a custom scaling dict."""
    if isinstance(model_id, SpineNetScaling):
        return model_id
    if isinstance(model_id, Mapping):
        expected = {f.name for f in fields(SpineNetScaling)}
        if set(model_id) != expected:
            raise ValueError(
                f"model_id as a dict must have exactly the keys {sorted(expected)}, got {sorted(model_id)}"
            )
        return SpineNetScaling(**model_id)
    if not isinstance(model_id, str):
        raise TypeError(f"model_id must be a str or a scaling dict, got {type(model_id).__name__}")
    key = model_id.upper()
    if key not in SCALING_MAP:
        raise ValueError(f"model_id must be one of {list(SCALING_MAP)} or a scaling dict, got {model_id!r}")
    return SCALING_MAP[key]


class FeatureInfo(list):
    """timm-style description of the endpoints: a list of ``{num_chs, reduction, module}`` dicts."""

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        return [dict(d) for d in self]

    def _get(self, key: str, idx: int | None):
        return [d[key] for d in self] if idx is None else self[idx][key]


def check_image_batch(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a floating (N, 3, H, W) batch with H, W positive multiples of 128, on the
    device of the model's first ``weight`` and (outside autocast) of its dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"x must have 3 channels (N, 3, H, W), got {x.shape[1]} channels in shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    for name, size in (("H", x.shape[2]), ("W", x.shape[3])):
        if size % SIZE_DIVISIBILITY or size == 0:
            padded = math.ceil(size / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
            raise ValueError(
                f"x: {name}={size} must be a positive multiple of {SIZE_DIVISIBILITY} (SpineNet reaches level 7); "
                f"pad it to {max(padded, SIZE_DIVISIBILITY)}"
            )
    if weight is not None and x.device != weight.device:
        raise ValueError(f"x must be on the model's device {weight.device}, got {x.device}")
    if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x must have the model's dtype {weight.dtype} (or run under autocast), got {x.dtype}")
    return x


torch.fx.wrap("check_image_batch")


@dataclass(frozen=True)
class _Node:
    """Static facts about one ``feats`` entry, used while building."""

    level: int
    block_type: str
    channels: int


class SpineNet(nn.Module):
    """Scale-permuted backbone; ``forward(x)`` maps (N, 3, H, W) to ``OrderedDict`` ``p{min_level}…p{max_level}``.

    ``model_id`` is an official id or a custom scaling dict with the keys of :class:`SpineNetScaling`.
    ``stochastic_depth_rate=None`` uses the published protocol-C rate 0.2; pass 0.0 to switch it off.
    ``fused``: True runs the stem, the cross-scale connections, the blocks and the endpoints through the fused ops (any
    device; the backend follows ``spinenet_fast.ops.backends``), False through eager modules, ``"auto"`` fused on a
    GPU with Triton.
    Both paths share parameters and ``state_dict`` keys; :meth:`fusable_modules` are the modules that hold the
    setting.
    """

    size_divisibility = SIZE_DIVISIBILITY

    def __init__(
        self,
        model_id: str | Mapping | SpineNetScaling = "49",
        *,
        min_level: int = 3,
        max_level: int = 7,
        activation: str = "swish",
        norm_layer: NormFactory | None = None,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        stochastic_depth_rate: float | None = None,
        padding: str = "torch",
        fused: bool | str = "auto",
    ) -> None:
        super().__init__()
        scaling = resolve_scaling(model_id)
        _check_levels(min_level, max_level)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("padding", padding, PADDING_MODES)
        check_fused(fused)
        drop_rate = DEFAULT_STOCHASTIC_DEPTH_RATE if stochastic_depth_rate is None else stochastic_depth_rate
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"stochastic_depth_rate must be None or a number in [0, 1), got {stochastic_depth_rate!r}")
        norm = make_norm_factory(norm_layer, bn_momentum, bn_eps)
        fused = fused_for_norm(fused, norm)

        self.model_id = model_id.upper() if isinstance(model_id, str) else "custom"
        self.scaling = scaling
        self.activation = activation
        self.padding = padding
        self.fused = fused
        self.min_level, self.max_level = min_level, max_level
        self.stochastic_depth_rate = float(drop_rate)

        def filters_at(level: int) -> int:
            return int(FILTER_SIZE_MAP[level] * scaling.filter_size_scale)

        common = dict(norm=norm, activation=activation, padding=padding)
        self.stem = Stem(STEM_FILTERS, norm, activation, padding, fused=fused)
        init_filters = filters_at(2)
        init_channels = block_output_channels("bottleneck", init_filters)
        self.init_groups = nn.ModuleList(
            BlockGroup("bottleneck", in_ch, init_filters, scaling.block_repeats, drop_rate=0.0, fused=fused, **common)
            for in_ch in (STEM_FILTERS, init_channels)
        )
        nodes = [_Node(2, "bottleneck", init_channels)] * 2
        out_degree = [0, 0]
        self.merges = nn.ModuleList()
        self.groups = nn.ModuleList()
        output_ids: dict[int, int] = {}
        for k, spec in enumerate(SPINENET_BLOCK_SPECS, start=1):
            filters = filters_at(spec.level)
            target_channels = block_output_channels(spec.block_type, filters)
            resamples = [
                Resample(
                    nodes[i].channels,
                    nodes[i].block_type,
                    nodes[i].level,
                    target_channels,
                    spec.level,
                    scaling.resample_alpha,
                    **common,
                )
                for i in spec.input_offsets
            ]
            for i in spec.input_offsets:
                out_degree[i] += 1
            extra_ids = []
            if spec.is_output:
                # Same level <=> same spatial size, since H and W are multiples of 2^7.
                for j, node in enumerate(nodes):
                    if out_degree[j] == 0 and node.level == spec.level and node.channels == target_channels:
                        extra_ids.append(j)
                        out_degree[j] += 1
            self.merges.append(
                CrossScaleMerge(resamples, spec.input_offsets, tuple(extra_ids), activation, padding, fused)
            )
            block_drop_rate = drop_rate * k / len(SPINENET_BLOCK_SPECS)
            self.groups.append(
                BlockGroup(
                    spec.block_type,
                    target_channels,
                    filters,
                    scaling.block_repeats,
                    drop_rate=block_drop_rate,
                    fused=fused,
                    **common,
                )
            )
            nodes.append(_Node(spec.level, spec.block_type, target_channels))
            out_degree.append(0)
            if spec.is_output:
                output_ids[spec.level] = len(nodes) - 1

        levels = range(min_level, max_level + 1)
        self._endpoint_ids = {f"p{level}": output_ids[level] for level in levels}
        self.endpoints = nn.ModuleDict(
            (
                f"p{level}",
                Endpoint(nodes[output_ids[level]].channels, scaling.endpoints_num_filters, fused=fused, **common),
            )
            for level in levels
        )
        self.out_channels = scaling.endpoints_num_filters
        self.strides = [2**level for level in levels]
        self.feature_info = FeatureInfo(
            {"num_chs": scaling.endpoints_num_filters, "reduction": 2**level, "module": f"endpoints.p{level}"}
            for level in levels
        )

    @property
    def extra_edges(self) -> list[tuple[int, int]]:
        """``(source feats index, target block k)`` for every raw extra input the out-degree rule added."""
        return [(j, k) for k, merge in enumerate(self.merges, start=1) for j in merge.extra_ids]

    def keep_endpoints(self, names: list[str]) -> None:
        """Drop the endpoints not in ``names`` (of ``p3``…``p7``) and every block that none of the kept ones reads:
        their parameters would get no gradient (DDP would then need ``find_unused_parameters``). The state dict
        loses their keys."""
        unknown = [name for name in names if name not in self._endpoint_ids]
        if unknown or not names:
            raise ValueError(f"endpoints to keep must be a non-empty subset of {list(self._endpoint_ids)}, got {names}")
        first = len(self.init_groups)
        needed = {self._endpoint_ids[name] for name in names}
        for k in range(len(self.merges) - 1, -1, -1):  # blocks read only earlier blocks: one backward sweep
            if first + k in needed:
                needed.update(self.merges[k].parent_ids + self.merges[k].extra_ids)
        for k in range(len(self.merges)):
            if first + k not in needed:
                self.merges[k], self.groups[k] = PrunedBlock(), PrunedBlock()
        for name in [name for name in self._endpoint_ids if name not in names]:
            del self.endpoints[name], self._endpoint_ids[name]

    def fusable_modules(self) -> list[nn.Module]:
        """The modules with a ``fused`` setting of their own (stem, block groups, merges, endpoints), pruned ones
        left out."""
        modules = [self.stem, *self.init_groups, *self.merges, *self.groups, *self.endpoints.values()]
        return [m for m in modules if not isinstance(m, PrunedBlock)]

    def feature_reads(self) -> list[int]:
        """How many modules read each block output (``feats`` entry): merges as a parent or an extra, endpoints."""
        reads = [0] * (len(self.init_groups) + len(self.merges))
        for merge in self.merges:
            for i in () if isinstance(merge, PrunedBlock) else merge.parent_ids + merge.extra_ids:
                reads[i] += 1
        for i in self._endpoint_ids.values():
            reads[i] += 1
        return reads

    def model_running_affines(self, x: torch.Tensor) -> RunningAffines | None:
        """The running-statistics norms' affine maps of a forward of x, all at once
        (``fused_merge.modules_running_affines``)."""
        return modules_running_affines(self.fusable_modules(), x)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # Every block output and block input comes once per reader (fused: views whose gradients the producing merge
        # sums in its backward kernel, so autograd adds no full-size gradients; eager: the same tensor repeated).
        x = check_image_batch(x, self.stem.conv.conv.weight)
        affines = self.model_running_affines(x)
        x = self.stem(x, affines=affines)
        reads = self.feature_reads()
        feats: list[list[torch.Tensor] | None] = []  # per block: its output's copies not yet read
        for k, group in enumerate(self.init_groups):
            chained = k + 1 < len(self.init_groups)  # the next initial group reads it too
            next_readers = self.init_groups[k + 1].input_readers() if chained else 0
            copies = list(group(x, readers=max(1, reads[k]) + next_readers, affines=affines))
            x = tuple(copies.pop() for _ in range(next_readers)) if chained else None
            feats.append(copies)
        for merge, group in zip(self.merges, self.groups):
            if isinstance(group, PrunedBlock):
                feats.append(None)
                continue
            ids = set(merge.parent_ids + merge.extra_ids)
            inputs = [feats[i].pop() if i in ids else None for i in range(len(feats))]
            merged = merge(inputs, readers=group.input_readers(), affines=affines)
            feats.append(list(group(merged, readers=max(1, reads[len(feats)]), affines=affines)))
        return OrderedDict(
            (name, self.endpoints[name](feats[i].pop(), affines=affines)) for name, i in self._endpoint_ids.items()
        )


class PrunedBlock(nn.Module):
    """The place of a block (or its merge) that no kept endpoint reads (:meth:`SpineNet.keep_endpoints`)."""


def _check_levels(min_level: int, max_level: int) -> None:
    for name, value in (("min_level", min_level), ("max_level", max_level)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not MIN_OUTPUT_LEVEL <= min_level <= max_level <= MAX_OUTPUT_LEVEL:
        raise ValueError(
            f"min_level and max_level must satisfy {MIN_OUTPUT_LEVEL} <= min_level <= max_level <= "
            f"{MAX_OUTPUT_LEVEL}, got min_level={min_level}, max_level={max_level}"
        )


def check_fused(fused: bool | str) -> None:
    if not isinstance(fused, bool) and fused != "auto":
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
