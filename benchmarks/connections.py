"""Suite ``connections``: every distinct parent → target connection of SpineNet-49 at 640 px, batch 8.

A connection is one :class:`~spinenet_fast.models.resample.Resample` (squeeze, resample, expand) and the merge's
activation, i.e. a one-parent ``CrossScaleMerge`` sharing the real model's modules, in training mode
(batch-statistics BN). Providers: ``eager``, ``compile``, ``compile-max`` (``mode="max-autotune"``),
``fused-auto`` (what the model runs: each op's auto backend), ``fused-triton`` and ``fused-cuda`` (that backend
forced for every op; an op it lacks makes the row an error). ``pairs`` picks connections by (parent level, target
level), ``modes`` and ``providers`` narrow the rows; :func:`plan` lists them without running. Extra fields:
``floor_mb`` (bytes the connection must move: read the parent, write the output; backward: read the output
gradient and the parent, write the parent's gradient), ``gbps`` and ``floor_fraction`` against the device-copy
bandwidth of the same run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from spinenet_fast import SpineNet
from spinenet_fast.models.resample import CrossScaleMerge, Resample
from spinenet_fast.ops import use_backend

from ._harness import Row, Settings, autograd_modes, measure

HEADLINE = (5, 3)  # fused_ops.md §6: the L5 → L3 connection carries the targets
PROVIDERS = ("eager", "compile", "compile-max", "fused-auto", "fused-triton", "fused-cuda")
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Connection:
    """One distinct connection: levels, widths and the model's module implementing it."""

    parent_level: int
    parent_channels: int
    target_level: int
    target_channels: int
    resample: Resample

    @property
    def name(self) -> str:
        p, t = self.parent_level, self.target_level
        kind = "up" if p > t else "down" if p < t else "same"
        return f"L{self.parent_level}({self.parent_channels})->L{self.target_level}({self.target_channels}) {kind}"

    @property
    def is_headline(self) -> bool:
        return (self.parent_level, self.target_level) == HEADLINE


def connections(model: SpineNet) -> list[Connection]:
    """The model's distinct (parent level, width, target level, width) connections, in block order."""
    seen: dict[tuple, Connection] = {}
    for merge in model.merges:
        for r in merge.resamples:
            key = (r.parent_level, r.squeeze.conv.in_channels, r.target_level, r.expand.conv.out_channels)
            seen.setdefault(key, Connection(*key, resample=r))
    return list(seen.values())


def _provider_module(connection: Connection, provider: str, activation: str, smoke: bool) -> torch.nn.Module:
    fused = provider.startswith("fused")
    module = CrossScaleMerge([connection.resample], (0,), (), activation, fused=fused).train()
    if provider.startswith("compile"):
        if smoke:  # the harness path only: no C++ compiler run on CI machines
            return torch.compile(module, backend="aot_eager")
        return torch.compile(module, mode="max-autotune" if provider == "compile-max" else None)
    return module


def _chosen(smoke: bool, pairs: tuple[tuple[int, int], ...] | None) -> tuple[str, list[Connection]]:
    """The model id and the connections to measure: ``pairs`` (parent level, target level) or all."""
    model_id = "49XS-custom" if smoke else "49"
    scaling = None
    if smoke:
        from spinenet_fast.detection.presets import CUSTOM_SCALINGS

        scaling = CUSTOM_SCALINGS[model_id]
    chosen = connections(SpineNet(scaling or model_id, stochastic_depth_rate=0.0, fused=False))
    if smoke:
        chosen = [c for c in chosen if c.parent_level > c.target_level][:1]
    elif pairs is not None:
        found = {(c.parent_level, c.target_level): c for c in reversed(chosen)}  # the first of each pair
        missing = [p for p in pairs if p not in found]
        if missing:
            raise ValueError(f"SpineNet-49 has no connection {missing}; it has {sorted(found)}")
        chosen = [found[p] for p in pairs]
    return model_id, chosen


def _providers_for(connection: Connection, providers: tuple[str, ...], compile_on: str, smoke: bool) -> list[str]:
    chosen = []
    for provider in providers:
        if provider.startswith("compile") and compile_on == "none":
            continue
        if provider.startswith("compile") and compile_on == "headline" and not (connection.is_headline or smoke):
            continue
        if provider == "compile-max" and smoke:
            continue  # max-autotune needs a GPU; --smoke checks the compile path with "compile" alone
        chosen.append(provider)
    return chosen


def _dtypes(connection: Connection, smoke: bool, dtypes: tuple[torch.dtype, ...] | None) -> tuple[torch.dtype, ...]:
    """``dtypes`` if given; else bf16, and fp32 too for the headline connection."""
    if dtypes is not None:
        return dtypes
    return (torch.bfloat16, torch.float32) if connection.is_headline and not smoke else (torch.bfloat16,)


def plan(
    smoke: bool, *, compile_on: str = "headline", pairs=None, providers=PROVIDERS, modes=MODES, dtypes=None
) -> list[tuple[str, str, str, str]]:
    """``(bench, provider, mode, dtype)`` of every row :func:`run` would measure, in order."""
    _, chosen = _chosen(smoke, pairs)
    return [
        (f"connection {c.name}", provider, mode, str(dtype).removeprefix("torch."))
        for c in chosen
        for dtype in _dtypes(c, smoke, dtypes)
        for provider in _providers_for(c, providers, compile_on, smoke)
        for mode in modes
    ]


def run(
    s: Settings, env: dict, copy_gbps: float, *, compile_on: str = "headline", pairs=None, providers=PROVIDERS,
    modes=MODES, dtypes=None,
) -> Iterator[Row]:  # fmt: skip
    """Rows for every chosen connection × provider × mode (bf16; the headline connection also in fp32)."""
    size, batch = (128, 1) if s.smoke else (640, 8)
    model_id, chosen = _chosen(s.smoke, pairs)
    for connection in chosen:
        for dtype in _dtypes(connection, s.smoke, dtypes):
            yield from _run_connection(s, env, copy_gbps, connection, dtype, size, batch, model_id,
                                       _providers_for(connection, providers, compile_on, s.smoke), modes)  # fmt: skip


def _run_connection(s, env, copy_gbps, connection, dtype, size, batch, model_id, providers, modes) -> Iterator[Row]:
    side = size >> connection.parent_level
    out_side = size >> connection.target_level
    connection.resample.to(device=s.device, dtype=dtype, memory_format=torch.channels_last)
    item = torch.finfo(dtype).bits // 8
    parent_bytes = batch * connection.parent_channels * side * side * item
    output_bytes = batch * connection.target_channels * out_side * out_side * item
    floor = {"fwd": parent_bytes + output_bytes, "bwd": output_bytes + 2 * parent_bytes}
    floor["fwd+bwd"] = floor["fwd"] + floor["bwd"]

    def make_input():
        x = torch.randn(batch, connection.parent_channels, side, side, device=s.device, dtype=dtype)
        return (x.contiguous(memory_format=torch.channels_last).requires_grad_(),)

    shape = f"{model_id} b{batch} {size}px"
    for provider in providers:
        module = _provider_module(connection, provider, "swish", s.smoke)
        backend = provider.removeprefix("fused-") if provider.startswith("fused") else None
        with use_backend(None if backend == "auto" else backend):
            all_modes = autograd_modes(lambda x, m=module: m([x]), make_input, parent_bytes, s)
            for mode in modes:
                row = measure(s, env, all_modes[mode], bench=f"connection {connection.name}", provider=provider,
                              mode=mode, dtype=dtype, shape=shape, extra={"floor_mb": floor[mode] / 2**20})  # fmt: skip
                if row.p50_ms:
                    row.extra["gbps"] = floor[mode] / (row.p50_ms * 1e-3) / 1e9
                    row.extra["floor_fraction"] = row.extra["gbps"] / copy_gbps
                yield row
