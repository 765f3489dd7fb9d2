"""``python -m benchmarks.ledger --model 49 --out DIR [--head] [--inference] [--size 256 --batch 1 --dtype bf16]``:
the kernel launches of one SpineNet training step (forward, backward), per part of the model, eager against fused —
counted on a CPU. ``--head``: the whole RetinaNet training step (transform, backbone, head, anchors, matching and
losses). ``--inference``: one forward in eval mode without gradients (every BN an affine map of its running
statistics) instead — the backbone's, or with ``--head`` the backbone's and the head's.

Launch counts do not depend on tensor sizes, so a CPU run at any size gives a GPU's counts, generically:

- ATen: a dispatch mode sees every ATen op as the dispatcher runs it (after autograd and the composite ops'
  decompositions, i.e. the ops that have device kernels): each is one launch unless it is a view, a metadata op
  or an allocation (``NO_KERNEL``) — ``convolution_backward`` is one per gradient it computes (dgrad, wgrad, bias:
  separate kernels on a GPU). The fused ops (``torch.library.custom_op``) are opened: their implementation
  runs under the same mode, so what they launch is counted, not the op itself.
- Triton: every launch of a ``@triton.jit`` kernel, intercepted before it would run (outputs stay uninitialised:
  launches and shapes are right, values are not).
- The extension: its C++ logs every kernel it launches, and the ATen work it does around them (copies, zero
  fills), CUDA launchers and CPU twins alike (``csrc/launch.h``).

The fused model's ops take the backends ``auto`` takes on a GPU (``backends.gpu_auto_order_on_cpu``): the
extension's CPU twins stand in for its CUDA kernels. Parts are the model's modules (stem, the two initial block
groups, merge k and each of its parents, block group k, endpoints) and the loss, tracked by module hooks (the
fused path's parents by a wrapper of ``fused_resample``); a backward launch belongs to the part whose forward
created the autograd node it runs in (a node-creation hook tags each node). Per part also the activation memory
saved for backward (a saved-tensors hook: every storage once, parameters excluded). Writes ``DIR/ledger.json``,
``DIR/ledger.md`` and ``DIR/ledger.png``.

Bytes and FLOPs are modelled per launch (``benchmarks/_traffic.py``: every tensor a launch takes or returns moved
once) and depend on the size: run ``--size 640 --batch 8`` for the budgets' setting. Each block's connection (its
merge and all its parents) is set against its byte floor (read every input once, write every output once) and its
BN-barrier bound (``_traffic.barrier_bound``: the least any kernels can move once every training-mode BN's map, and
the gradient at it, is stored or recomputed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._traffic import (
    ParentMaps,
    aten_kernels,
    barrier_bound,
    connection_floor,
    tensor_bytes,
    tensors_bytes,
    triton_traffic,
)
from ._triton_launches import intercepted_launches, route_to_triton

PASSES = ("forward", "backward")
INFERENCE = "inference forward (eval mode, no gradients)"
FROZEN = " with frozen BatchNorms (eval mode, trainable γ and β)"
# fused_ops.md §7: launches the fused connections must not make (reductions, copies and casts around the kernels).
FORBIDDEN = ("aten sum", "aten stack", "aten clone", "aten lerp_", "aten _to_copy", "extension aten")
PART_KEY = "ledger_part"
AFFINES_PART = "norm affines"  # SpineNet.model_running_affines: once per forward, for every fused module
# ATen ops that launch no kernel: views, metadata, allocations (as the dispatcher sees them).
NO_KERNEL = frozenset(
    (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
        "_reshape_alias", "view_as", "as_strided", "t", "transpose", "permute", "expand", "expand_as", "detach",
        "alias", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "narrow",
        "resize_", "set_", "lift_fresh", "unflatten", "movedim", "result_type", "is_same_size",
        "_has_compatible_shallow_copy_type", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
        "sym_storage_offset", "promote_types", "_to_copy_noop", "view_as_real", "view_as_complex", "_reshape_copy",
    )
)  # fmt: skip


@dataclass
class Ledger:
    """Launches per (part, pass): ``counts[part][pass]`` is a Counter of ``"kind name"``; modelled ``bytes``,
    ``flops`` and ``atomics`` (bytes our kernels add atomically into L2: ``_traffic.TRITON_ATOMICS``) per (part,
    pass) likewise; ``saved``: per part, the bytes of the tensors saved for backward (each storage once; parameters
    excluded)."""

    counts: dict[str, dict[str, Counter]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Counter)))
    bytes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    flops: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    atomics: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    atomic_kernels: Counter = field(default_factory=Counter)  # kernel name -> its atomics over the step
    saved: Counter = field(default_factory=Counter)  # part -> bytes of the activations autograd saves for backward

    def traffic(self, measure: str, part_prefix: str = "", pass_: str | None = None) -> int:
        """Modelled ``"bytes"``, ``"flops"`` or ``"atomics"`` of the parts whose name starts with ``part_prefix``."""
        by_part = getattr(self, measure)
        return sum(n for part, passes in by_part.items() if part.startswith(part_prefix)
                   for p, n in passes.items() if pass_ in (None, p))  # fmt: skip

    def launches(self, part_prefix: str = "", pass_: str | None = None) -> int:
        """Launches of the parts whose name starts with ``part_prefix``, in one pass or both."""
        return sum(self.ops(part_prefix, pass_).values())

    def ops(self, part_prefix: str = "", pass_: str | None = None) -> Counter:
        """``"kind name"`` -> launches, over the matching parts and passes."""
        total: Counter = Counter()
        for part, passes in self.counts.items():
            if part.startswith(part_prefix):
                for p, by_name in passes.items():
                    if pass_ in (None, p):
                        total.update(by_name)
        return total

    def as_json(self) -> dict:
        return {part: {p: dict(c) for p, c in passes.items()} for part, passes in sorted(self.counts.items())}


def _decomposes_on_gpu(name: str) -> bool:
    """Whether the op runs on a GPU as its composite decomposition (no CUDA or explicit kernel of its own)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has(name, "CompositeImplicitAutograd") and not (has(name, "CUDA") or has(name, "CompositeExplicitAutograd"))


class LaunchCounter(TorchDispatchMode):
    """Counts the launches of what runs under it into ``ledger``, for the part on top of ``parts`` in the forward
    and for the part that created the running autograd node in the backward."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger
        self.parts = ["other"]
        self.pass_ = "forward"
        self.ranges: list[str] = []  # the part suffix of each open profiler range ("" for other ranges)

    def part(self) -> str:
        suffix = self.ranges[-1] if self.ranges else ""
        if self.pass_ == "backward":
            node = torch._C._current_autograd_node()
            if node is None:  # the backward's seed gradient
                return "loss"
            if "AccumulateGrad" in node.name():
                return "gradient accumulation"
            return node.metadata.get(PART_KEY, "other") + suffix
        return self.parts[-1] + suffix

    def profiler_range(self, name: str, args: tuple) -> object:
        """Open (``_record_function_enter_new``) or close a profiler range: a fused op's range around one parent's
        work (``ops.expand_merge.parent_scope``: ``expand_merge.parent<i>``) makes its launches that parent's."""
        if name == "profiler::_record_function_enter_new":
            handle = torch.ops.profiler._record_function_enter_new(*args)
            parent = re.fullmatch(r"expand_merge\.parent(\d+)", args[0])
            self.ranges.append(f".resamples.{parent[1]}" if parent else "")
            return handle
        self.ranges.pop()  # ranges nest: the innermost closes
        return torch.ops.profiler._record_function_exit._RecordFunction(*args)

    def count(self, kind: str, name: str, nbytes: int = 0, flops: int = 0, atomics: int = 0) -> None:
        self.ledger.counts[self.part()][self.pass_][f"{kind} {name}"] += 1
        self.add_traffic(nbytes, flops, atomics)
        if atomics:
            self.ledger.atomic_kernels[name] += atomics

    def add_traffic(self, nbytes: int, flops: int, atomics: int = 0) -> None:
        part = self.part()
        self.ledger.bytes[part][self.pass_] += nbytes
        self.ledger.flops[part][self.pass_] += flops
        self.ledger.atomics[part][self.pass_] += atomics

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = torch._library.custom_ops._maybe_get_opdef(func)
        if opdef is not None:  # a fused op: what its implementation launches, under this mode
            with self:
                return opdef._init_fn(*args, **kwargs)
        if _decomposes_on_gpu(func.name()):
            with self:  # below autograd (inside a fused op) a composite op arrives whole: count what it runs
                return func.decompose(*args, **kwargs)
        name = func._schema.name  # namespace::op, without the overload
        if name.startswith("profiler::_record_function"):  # launches nothing
            return self.profiler_range(name, args)
        if name.startswith("spinenet_fast::ext_"):  # the extension: the kernels its C++ logged
            torch.ops.spinenet_fast.ext_launch_log(True)
            out = func(*args, **kwargs)
            for launched in torch.ops.spinenet_fast.ext_launch_log(False):
                kind, _, op = launched.rpartition("::")
                self.count("extension" if not kind else f"extension {kind}", op)
            self.add_traffic(tensors_bytes(args, kwargs) + tensors_bytes(out), 0)  # its arguments and results
            return out
        op = name.split("::")[-1]
        out = func(*args, **kwargs)
        if op not in NO_KERNEL:  # an in-place op reads and writes its input
            for kernel, nbytes, flops in aten_kernels(op, func, args, kwargs, out):
                self.count("aten", kernel, nbytes, flops)
        return out


def part_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The parts of a SpineNet: stem, init_groups.i, merges.k, merges.k.resamples.i, groups.k, endpoints.pL (a
    SpineNet-Mobile's blocks: init_blocks.i, blocks.k)."""
    parts = {}
    for name, module in model.named_modules():
        path = name.split(".")
        containers = ("init_groups", "init_blocks", "merges", "groups", "blocks", "endpoints")
        container = len(path) == 2 and path[0] in containers
        parent = len(path) == 4 and path[0] == "merges" and path[2] == "resamples"
        if name == "stem" or container or parent:
            parts[name] = module
    return parts


@contextlib.contextmanager
def part_tracking(model: nn.Module, counter: LaunchCounter, extra_parts: dict[str, nn.Module] | None = None
                  ) -> Iterator[None]:  # fmt: skip
    """Keep ``counter.parts`` on the innermost running part (the fused path's parents included; ``extra_parts``:
    modules around the backbone, by name; ``norm affines``: the model's affine maps of its running-statistics norms,
    ``SpineNet.model_running_affines``), and tag every autograd node created meanwhile with it."""
    from spinenet_fast.models import fused_merge

    parts = {**part_modules(model), **(extra_parts or {})}
    names = {id(module): name for name, module in parts.items()}

    def enter(module, args):
        counter.parts.append(names[id(module)])

    def leave(module, args, output):
        counter.parts.pop()

    def tag(node) -> None:
        node.metadata[PART_KEY] = counter.parts[-1]

    handles = [m.register_forward_pre_hook(enter) for m in parts.values()]
    handles += [m.register_forward_hook(leave) for m in parts.values()]
    # the per-parent functions
    resample_functions = ("fused_resample", "fused_mobile_resample", "fused_expand_input", "pooled_expand_input")
    originals = {name: getattr(fused_merge, name) for name in resample_functions}

    def tracked(function, part=None):
        def run(first, *args, **kwargs):
            counter.parts.append(part or names[id(first)])
            try:
                return function(first, *args, **kwargs)
            finally:
                counter.parts.pop()

        return run

    for name, function in originals.items():
        setattr(fused_merge, name, tracked(function))
    affines = getattr(model, "model_running_affines", None)
    if affines is not None:
        model.model_running_affines = tracked(affines, AFFINES_PART)
    torch._C._autograd._push_node_creation_hook(tag)
    try:
        yield
    finally:
        torch._C._autograd._pop_node_creation_hook()
        if affines is not None:
            del model.model_running_affines
        for name, function in originals.items():
            setattr(fused_merge, name, function)
        for handle in handles:
            handle.remove()


def parent_maps(resample: nn.Module, x: torch.Tensor) -> ParentMaps | None:
    """The bytes of a SpineNet ``Resample``'s or a SpineNet-Mobile ``MobileResample``'s maps on parent ``x`` (in
    ``x``'s dtype, as the fused path stores them); None for another kind of connection."""
    from spinenet_fast.models.resample import Resample
    from spinenet_fast.models.spinenet_mobile import MobileResample

    n, channels, h, w = x.shape
    item = n * x.element_size()  # bytes per channel and pixel
    chain, pooled = [], 0
    if isinstance(resample, Resample):
        channels = resample.squeeze.conv.out_channels
        chain.append(channels * h * w * item)
        if resample.down is not None:
            h, w = -(-h // 2), -(-w // 2)
            chain.append(channels * h * w * item)
            if len(resample.pools):
                h, w = h >> len(resample.pools), w >> len(resample.pools)
                pooled = channels * h * w * item
        expand = resample.expand
    elif isinstance(resample, MobileResample):
        for _ in resample.down:  # depthwise: the parent's width
            h, w = -(-h // 2), -(-w // 2)
            chain.append(channels * h * w * item)
        expand = resample.conv
    else:
        return None
    return ParentMaps(tensor_bytes(x), tuple(chain), pooled, expand.conv.out_channels * h * w * item)


@contextlib.contextmanager
def recorded_floors(model: nn.Module) -> Iterator[dict[str, dict[str, dict[str, int] | None]]]:
    """While a forward runs: ``{"merges.k": {"floor": {"forward": bytes, "backward": bytes}, "bound": ...}}``, each
    block connection's byte floor from the tensors its merge actually receives and returns
    (``_traffic.connection_floor``) and its BN-barrier bound (``_traffic.barrier_bound``; None where a parent is
    neither a ``Resample`` nor a ``MobileResample``)."""
    floors: dict[str, dict[str, dict[str, int] | None]] = {}

    def hook(name):
        def record(module, args, output):
            feats = args[0]
            parents, extras = [feats[i] for i in module.parent_ids], [feats[j] for j in module.extra_ids]
            output = output if isinstance(output, torch.Tensor) else output[0]  # one of its readers' copies
            floor = connection_floor(parents, output, list(module.parameters()), extras)
            maps = [parent_maps(r, x) for r, x in zip(module.resamples, parents)]
            # the bound is training-mode BN's (eval mode, frozen norms: an affine map, no barrier)
            training = all(bn.training for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm))
            bound = None if None in maps or not training else barrier_bound(floor, maps, tensor_bytes(output))
            floors[name] = {"floor": floor, "bound": bound}

        return record

    handles = [merge.register_forward_hook(hook(f"merges.{k}")) for k, merge in enumerate(model.merges)]
    try:
        yield floors
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def saved_tensor_accounting(counter: LaunchCounter) -> Iterator[None]:
    """Add the bytes of every tensor autograd saves (each storage once, parameters excluded) to the saving part."""
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not (t.is_leaf and t.requires_grad) and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counter.ledger.saved[counter.part()] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@contextlib.contextmanager
def counting(model: nn.Module, fused: bool, extra_parts: dict[str, nn.Module] | None = None) -> Iterator[LaunchCounter]:
    """A counter of what runs in the block, per part of the SpineNet ``model`` (and ``extra_parts``), its
    connections eager or fused (each op on the backend ``auto`` takes on a GPU), Triton launches intercepted."""
    from spinenet_fast.ops import backends

    for module in model.fusable_modules():
        module.fused = fused
    route_to_triton()
    counter = LaunchCounter(Ledger())

    def triton_launch(kernel, args, kwargs) -> None:
        counter.count("triton", kernel.fn.__name__, *triton_traffic(kernel, args, kwargs))

    with contextlib.ExitStack() as stack:
        stack.enter_context(backends.gpu_auto_order_on_cpu())
        stack.enter_context(intercepted_launches(triton_launch))
        stack.enter_context(part_tracking(model, counter, extra_parts))
        stack.enter_context(counter)
        stack.enter_context(saved_tensor_accounting(counter))
        yield counter


def training_mode(model: nn.Module, frozen_norms: bool = False) -> nn.Module:
    """``model`` in training mode; with ``frozen_norms`` its BatchNorms in eval mode (frozen running statistics,
    trainable γ and β: fine-tuning as torchvision's detection models do with ``FrozenBatchNorm2d``)."""
    model.train()
    if frozen_norms:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def count_training_step(
    model: nn.Module, images: torch.Tensor, *, fused: bool, autocast: torch.dtype | None = None,
    frozen_norms: bool = False,
) -> Ledger:  # fmt: skip
    """Launches of one training step (forward, backward of Σ mean(p²) over the outputs) of a SpineNet on CPU
    tensors: eager, or fused with each op on the backend ``auto`` takes on a GPU; under ``autocast`` (bf16, as
    ``--amp`` trains: fp32 parameters) or in the model's own dtype; ``frozen_norms``: see :func:`training_mode`."""
    training_mode(model, frozen_norms).zero_grad(set_to_none=True)  # a step's gradients are written, not accumulated
    with counting(model, fused) as counter:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            outputs = list(model(images).values())
        counter.parts.append("loss")
        # Σ mean(p²) through per-channel sums: its gradient comes in the outputs' (channels_last) layout, as a head's
        # convolutions return it (mean()'s expanded scalar gradient would come NCHW-contiguous)
        loss = sum((o.float() ** 2).sum((0, 2, 3)).sum() / o.numel() for o in outputs)
        counter.parts.pop()
        counter.pass_ = "backward"
        loss.backward()
    return counter.ledger


def count_inference(model: nn.Module, images: torch.Tensor, *, fused: bool, autocast: torch.dtype | None = None
                    ) -> Ledger:  # fmt: skip
    """Launches of one inference forward of a SpineNet on CPU tensors: eval mode (every BN normalises with its
    running statistics), no gradients, under ``autocast`` or in the model's own dtype; eager, or fused as
    :func:`count_training_step` counts it."""
    model.eval()
    amp = torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    with counting(model, fused) as counter, torch.no_grad(), amp:
        model(images)
    return counter.ledger


def count_detector_inference(detector: nn.Module, images: torch.Tensor, *, fused: bool,
                             autocast: torch.dtype | None = None) -> Ledger:  # fmt: skip
    """Launches of a RetinaNet's backbone and head in one inference forward (eval mode, no gradients) of an image
    batch, eager or fused, as :func:`count_inference` counts a backbone's; parts: the backbone's and ``head``. (The
    transform, anchors and box decoding/NMS around them are torchvision's in both variants.)"""
    detector.eval()
    detector.head.fused = fused
    amp = torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    with counting(detector.backbone, fused, {"head": detector.head}) as counter, torch.no_grad(), amp:
        detector.head(list(detector.backbone(images).values()))
    return counter.ledger


def count_detector_step(
    detector: nn.Module, images: list[torch.Tensor], targets: list[dict], *, fused: bool,
    autocast: torch.dtype | None = None, frozen_norms: bool = False,
) -> Ledger:  # fmt: skip
    """Launches of one RetinaNet training step (``detector(images, targets)``: transform, backbone, head, anchors,
    matching and losses; backward of their sum), eager or fused (connections, blocks, head and loss) as
    :func:`count_training_step` counts a backbone's. Parts: the backbone's, ``transform``, ``head``, ``anchors`` and
    ``loss`` (matching and both losses)."""
    training_mode(detector, frozen_norms).zero_grad(set_to_none=True)
    detector.head.fused = fused
    extra = {"transform": detector.transform, "head": detector.head, "anchors": detector.anchor_generator}
    compute_loss = detector.compute_loss
    with counting(detector.backbone, fused, extra) as counter:

        def tracked_loss(*args, **kwargs):
            counter.parts.append("loss")
            try:
                return compute_loss(*args, **kwargs)
            finally:
                counter.parts.pop()

        detector.compute_loss = tracked_loss
        try:
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                losses = detector(images, targets)
            counter.parts.append("loss")
            loss = sum(losses.values())
            counter.parts.pop()
            counter.pass_ = "backward"
            loss.backward()
        finally:
            del detector.compute_loss
    return counter.ledger


@dataclass(frozen=True)
class PartGroup:
    """A row of the summary: the parts whose names start with one of ``prefixes``."""

    label: str
    prefixes: tuple[str, ...]


def _groups(model, ledgers: dict[str, Ledger]) -> list[PartGroup]:
    """The summary's rows: the backbone's parts, then a detector's (where the ledgers hold a head) and the loss —
    those where a ledger counted launches (an inference forward has no loss; a training step no norm affines)."""
    groups = [
        PartGroup("norm affines (running statistics: all modules', once per forward)", (AFFINES_PART,)),
        PartGroup("stem", ("stem",)),
        PartGroup("initial blocks", ("init_groups.", "init_blocks.")),
        PartGroup("cross-scale parents", tuple(f"merges.{k}.resamples." for k in range(len(model.merges)))),
        PartGroup("merges (sum, activation, extras)", tuple(f"merges.{k}" for k in range(len(model.merges)))),
        PartGroup("blocks", ("groups.", "blocks.")),
        PartGroup("endpoints", ("endpoints.",)),
    ]
    if any("head" in ledger.counts for ledger in ledgers.values()):
        groups += [
            PartGroup("transform and anchors", ("transform", "anchors")),
            PartGroup("head (class and box towers, predictors)", ("head",)),
            PartGroup("loss (matching, focal and box losses)", ("loss",)),
            PartGroup("target checks (forward), gradient accumulation", ("gradient accumulation", "other")),
        ]
    else:
        groups.append(
            PartGroup("loss (Σ mean(p²)) and gradient accumulation", ("loss", "gradient accumulation", "other"))
        )
    counted = [part for ledger in ledgers.values() for part, passes in ledger.counts.items() if any(passes.values())]
    return [group for group in groups if any(part.startswith(group.prefixes) for part in counted)]


def _group_launches(ledger: Ledger, group: PartGroup, pass_: str, exclude: tuple[str, ...] = ()) -> int:
    return sum(
        sum(ledger.counts[part][pass_].values())
        for part in ledger.counts
        if part.startswith(group.prefixes) and not part.startswith(exclude)
    )


def passes_of(ledgers: dict[str, Ledger]) -> tuple[str, ...]:
    """The passes the ledgers counted launches in (a training step's two, an inference forward's one)."""
    counted = {p for ledger in ledgers.values() for passes in ledger.counts.values() for p in passes}
    return tuple(p for p in PASSES if p in counted)


def _parents(groups: list[PartGroup]) -> tuple[str, ...]:
    """The cross-scale parents' prefixes (the merges' rows leave those parts out)."""
    return next(group for group in groups if group.label == "cross-scale parents").prefixes


def summarise(model, ledgers: dict[str, Ledger]) -> dict:
    """Per group and per connection type: launches per pass and variant; bytes saved for backward per group."""
    groups = _groups(model, ledgers)
    parents, passes = _parents(groups), passes_of(ledgers)
    rows = []
    for group in groups:
        exclude = parents if group.label.startswith("merges") else ()
        cells = {f"{v} {p}": _group_launches(ledgers[v], group, p, exclude) for v in ledgers for p in passes}
        rows.append({"part": group.label, **cells})
    rows.append({"part": "total", **{f"{v} {p}": ledgers[v].launches(pass_=p) for v in ledgers for p in passes}})
    saved = [{"part": group.label, **{v: sum(n for part, n in ledger.saved.items() if part.startswith(group.prefixes)
                                             and not (group.label.startswith("merges") and part.startswith(parents)))
                                      for v, ledger in ledgers.items()}} for group in groups]  # fmt: skip
    saved.append({"part": "total", **{v: sum(ledger.saved.values()) for v, ledger in ledgers.items()}})
    connections = []
    for k, merge in enumerate(model.merges):
        for i, resample in enumerate(merge.resamples):
            part = f"merges.{k}.resamples.{i}"
            kind = "up" if resample.parent_level > resample.target_level else "down" if resample.down else "same"
            connections.append({
                "part": part, "connection": f"L{resample.parent_level}->L{resample.target_level} {kind}",
                **{f"{v} {p}": ledgers[v].launches(part, p) for v in ledgers for p in passes},
            })  # fmt: skip
    return {"groups": rows, "connections": connections, "saved": saved}


def summarise_traffic(model, ledgers: dict[str, Ledger], floors: dict[str, dict[str, int]]) -> dict:
    """Modelled bytes and FLOPs per group and in total, and per block connection against its byte floor."""
    groups = _groups(model, ledgers)
    parents, passes = _parents(groups), passes_of(ledgers)
    rows = []
    for group in groups:
        exclude = parents if group.label.startswith("merges") else ()
        cells = {}
        for v, ledger in ledgers.items():
            for p in passes:
                cells[f"{v} {p}"] = sum(
                    ledger.bytes[part][p] for part in ledger.bytes
                    if part.startswith(group.prefixes) and not part.startswith(exclude)
                )  # fmt: skip
        rows.append({"part": group.label, **cells})
    totals = {f"{v} {p}": ledgers[v].traffic("bytes", pass_=p) for v in ledgers for p in passes}
    rows.append({"part": "total", **totals})
    flops = {f"{v} {p}": ledgers[v].traffic("flops", pass_=p) for v in ledgers for p in passes}
    atomics = {f"{v} {p}": ledgers[v].traffic("atomics", pass_=p) for v in ledgers for p in passes}
    atomic_kernels = {v: dict(ledger.atomic_kernels.most_common()) for v, ledger in ledgers.items()}
    connections = []
    for k in range(len(model.merges)):
        part = f"merges.{k}"
        if part not in floors:
            continue
        row = {"part": part}
        for p in passes:
            row[f"floor {p}"] = floors[part]["floor"][p]
            row[f"bound {p}"] = floors[part]["bound"][p] if floors[part]["bound"] else None
            for v, ledger in ledgers.items():
                row[f"{v} {p}"] = ledger.traffic("bytes", part + ".", p) + ledger.bytes[part][p]
                row[f"{v} {p} atomics"] = ledger.traffic("atomics", part + ".", p) + ledger.atomics[part][p]
        connections.append(row)
    return {"bytes": rows, "flops": flops, "atomics": atomics, "atomic_kernels": atomic_kernels,
            "connections": connections}  # fmt: skip


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def connection_headings(pass_: str, ledgers: dict[str, Ledger]) -> list[str]:
    """The connection table's columns of one pass: its floor, its bound, each variant (``fwd``/``bwd``)."""
    short = pass_[0] + "wd"
    return [f"floor {short}", f"bound {short}", *(f"{v} {short}" for v in ledgers)]


def traffic_markdown(traffic: dict, ledgers: dict[str, Ledger]) -> list[str]:
    passes = passes_of(ledgers)
    columns = [f"{v} {p}" for v in ledgers for p in passes]
    lines = ["", "## Modelled memory traffic (MB: every tensor a launch takes or returns moved once; `_traffic.py`)",
             "", "| part | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]  # fmt: skip
    lines += ["| " + r["part"] + " | " + " | ".join(_mb(r[c]) for c in columns) + " |" for r in traffic["bytes"]]
    lines += ["", "GEMM/conv GFLOPs: " + ", ".join(f"{c} {n / 1e9:.2f}" for c, n in traffic["flops"].items())]
    lines += ["", "Atomic adds into L2 (MB of fp32 elements; our kernels' tile reductions, `_traffic.TRITON_ATOMICS`: "
              "not HBM traffic and not in the bytes above, but L2 work a GPU profile shows): "
              + ", ".join(f"{c} {_mb(n)}" for c, n in traffic["atomics"].items() if n)]  # fmt: skip
    for v, kernels in traffic["atomic_kernels"].items():
        if kernels:
            lines.append(f"- {v}: " + ", ".join(f"{k} {_mb(n)}" for k, n in kernels.items()))
    lines += ["", "Each block's connection (its merge and all its parents) against its byte floor (MB; × floor).",
              "Bound: the least any kernels can move once each training-mode BN's map (or the gradient at it) is",
              "stored or recomputed (`_traffic.barrier_bound`): a budget under it is out of reach.", "",
              "| connection | " + " | ".join(heading for p in passes for heading in connection_headings(p, ledgers))
              + " |", "|---|" + "---:|" * ((2 + len(ledgers)) * len(passes))]  # fmt: skip
    for row in traffic["connections"]:
        cells = []
        for p in passes:
            floor, bound = row[f"floor {p}"], row[f"bound {p}"]
            cells += [_mb(floor), f"{_mb(bound)} ({bound / floor:.2f}×)" if bound is not None else "—"]
            cells += [f"{_mb(row[f'{v} {p}'])} ({row[f'{v} {p}'] / floor:.2f}×)" for v in ledgers]
        lines.append(f"| {row['part']} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(summary: dict, config: dict, ledgers: dict[str, Ledger]) -> str:
    passes = passes_of(ledgers)
    columns = [f"{v} {p}" for v in ledgers for p in passes]
    lines = [
        f"# Kernel launches per {config.get('step', 'training step')} (counted on a CPU: {config['description']})",
        "",
        "Counted, not timed: launches are exact and size-independent (`benchmarks/ledger.py` says how they are "
        "counted). Fused: each op on the backend `auto` picks on a GPU.",
        "",
        "| part | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += ["| " + r["part"] + " | " + " | ".join(str(r[c]) for c in columns) + " |" for r in summary["groups"]]
    if "backward" in passes:
        lines += ["", "Activation memory saved for backward (MB; every storage autograd saves, once; parameters "
                  "excluded):", "", "| part | " + " | ".join(ledgers) + " |",
                  "|---|" + "---:|" * len(ledgers)]  # fmt: skip
        lines += ["| " + r["part"] + " | " + " | ".join(_mb(r[v]) for v in ledgers) + " |" for r in summary["saved"]]
    seen = {}
    for row in summary["connections"]:
        seen.setdefault(row["connection"], row)
    lines += ["", "One parent of each kind (first in block order):", "",
              "| connection | part | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]  # fmt: skip
    lines += [f"| {r['connection']} | {r['part']} | " + " | ".join(str(r[c]) for c in columns) + " |"
              for r in seen.values()]  # fmt: skip
    lines += ["", "Launches fused_ops.md §7 forbids around the fused ops (cross-scale parents and merges, fused):", ""]
    fused = ledgers.get("fused-auto")
    for pass_ in passes if fused else ():
        found = {op: n for op, n in fused.ops("merges.", pass_).items() if op.startswith(FORBIDDEN)}
        lines.append(f"- {pass_}: " + (", ".join(f"{op} ×{n}" for op, n in sorted(found.items())) or "none"))
    for variant, ledger in ledgers.items():
        for pass_ in passes:
            top = ledger.ops(pass_=pass_).most_common(12)
            lines += ["", f"{variant} {pass_}, most launched: " + ", ".join(f"{op} ×{n}" for op, n in top)]
    if "traffic" in summary:
        lines += traffic_markdown(summary["traffic"], ledgers)
    return "\n".join(lines) + "\n"


def plot(summary: dict, ledgers: dict[str, Ledger], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kernel launches", summary["groups"][:-1], 1)]
    if "traffic" in summary:
        panels.append(("modelled MB", summary["traffic"]["bytes"][:-1], 1e6))
    passes = passes_of(ledgers)
    figure, axes = plt.subplots(len(panels), len(passes), figsize=(6 * len(passes), 4 * len(panels)), squeeze=False)
    for (title, rows, unit), axes_row in zip(panels, axes):
        for axis, pass_ in zip(axes_row, passes):
            positions = range(len(rows))
            for offset, variant in zip((-0.2, 0.2), ledgers):
                axis.barh([p + offset for p in positions], [r[f"{variant} {pass_}"] / unit for r in rows],
                          height=0.4, label=variant)  # fmt: skip
            axis.set_yticks(list(positions), [r["part"] for r in rows])
            axis.set_title(f"{pass_}: {title}")
            axis.invert_yaxis()
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def detector_inputs(batch: int, size: int, num_classes: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Images and targets of a detector step: four boxes of different sizes and classes per image."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(batch)]
    corners = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.7], [0.05, 0.6, 0.2, 0.8], [0.3, 0.3, 0.9, 0.95]])
    targets = [{"boxes": corners * size, "labels": torch.arange(4) * (num_classes // 4)} for _ in range(batch)]
    return images, targets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="49", help="SpineNet id, 49XS-custom, or mobile-49 / 49S / 49XS")
    parser.add_argument(
        "--head",
        action="store_true",
        help="the RetinaNet training step (91 classes: head, matching, losses), not the backbone's",
    )
    parser.add_argument("--inference", action="store_true",
                        help="one inference forward (eval mode, no gradients) instead of a training step; with "
                        "--head, of the backbone and head")  # fmt: skip
    parser.add_argument("--frozen-norms", action="store_true",
                        help="a training step with every BatchNorm in eval mode (frozen running statistics, trainable "
                        "γ and β: fine-tuning as torchvision's detection models do)")  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="image size (counts do not depend on it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="bfloat16: autocast with fp32 parameters, as --amp trains")  # fmt: skip
    parser.add_argument("--stochastic-depth-rate", type=float, default=0.0,
                        help="the backbone's stochastic depth (0.2: the models' training default; its per-sample "
                        "draws add launches, never full-size maps)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.inference and args.frozen_norms:
        parser.error("--frozen-norms is a training step's setting; --inference already runs every norm frozen")
    from spinenet_fast.detection.presets import CUSTOM_SCALINGS, MOBILE_NAMES, build_detector
    from spinenet_fast.models import SpineNet, SpineNetMobile

    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    torch.manual_seed(0)
    ledgers = {}
    if args.head:
        detector = build_detector(args.model, 91, image_size=args.size,
                                  stochastic_depth_rate=args.stochastic_depth_rate, fused=False)  # fmt: skip
        detector = detector.to(memory_format=torch.channels_last)  # as training on a GPU takes it
        model = detector.backbone
        images, targets = detector_inputs(args.batch, args.size, 91)
        if args.inference:
            batch = torch.stack(images).contiguous(memory_format=torch.channels_last)

            def count(fused: bool) -> Ledger:
                return count_detector_inference(detector, batch, fused=fused, autocast=autocast)

        else:
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                detector.train()(images, targets)  # a steady state: the anchor generator caches cell anchors per dtype

            def count(fused: bool) -> Ledger:
                return count_detector_step(detector, images, targets, fused=fused, autocast=autocast,
                                           frozen_norms=args.frozen_norms)  # fmt: skip

        subject = f"RetinaNet-SpineNet-{args.model} (91 classes)"
    else:
        if args.model in MOBILE_NAMES:
            model = SpineNetMobile(MOBILE_NAMES[args.model], stochastic_depth_rate=args.stochastic_depth_rate,
                                   fused=False)  # fmt: skip
        else:
            model = SpineNet(CUSTOM_SCALINGS.get(args.model, args.model),
                             stochastic_depth_rate=args.stochastic_depth_rate, fused=False)  # fmt: skip
        model = model.to(memory_format=torch.channels_last)
        batch = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)

        def count(fused: bool) -> Ledger:
            if args.inference:
                return count_inference(model, batch, fused=fused, autocast=autocast)
            return count_training_step(model, batch, fused=fused, autocast=autocast, frozen_norms=args.frozen_norms)

        subject = f"SpineNet-{args.model} backbone"
    with recorded_floors(model) as floors:
        ledgers["eager"] = count(False)
    ledgers["fused-auto"] = count(True)
    precision = "bf16 autocast, fp32 parameters" if autocast else "fp32"
    depth = f", stochastic depth {args.stochastic_depth_rate:g}" if args.stochastic_depth_rate else ""
    description = f"{subject}, {args.size} px, batch {args.batch}, {precision}{depth}"
    step = INFERENCE if args.inference else "training step" + (FROZEN if args.frozen_norms else "")
    config = {"model": args.model, "head": args.head, "inference": args.inference, "frozen_norms": args.frozen_norms,
              "step": step, "size": args.size, "batch": args.batch, "dtype": args.dtype,
              "stochastic_depth_rate": args.stochastic_depth_rate, "description": description}  # fmt: skip
    summary = summarise(model, ledgers)
    summary["traffic"] = summarise_traffic(model, ledgers, floors)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "summary": summary, "ledgers": {v: ledger.as_json() for v, ledger in ledgers.items()}}
    (args.out / "ledger.json").write_text(json.dumps(payload, indent=1))
    (args.out / "ledger.md").write_text(to_markdown(summary, config, ledgers))
    plot(summary, ledgers, args.out / "ledger.png")
    print((args.out / "ledger.md").read_text())
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
