"""Suite ``connections``: every distinct parent → target connection of SpineNet-49 at 640 px, batch 8.

A connection is one :class:`~spinenet_fast.models.resample.Resample` (squeeze, resample, expand) and the merge's
activation, i.e. a one-parent ``CrossScaleMerge`` sharing the real model's modules, in training mode
(batch-statistics BN). Providers: ``eager``, ``compile``, ``compile-max`` (``mode="max-autotune"``),
``fused-triton`` and ``fused-cuda`` (the fused path with that backend forced for every op). Extra fields:
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
PROVIDERS = ("eager", "compile", "compile-max", "fused-triton", "fused-cuda")


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


def run(s: Settings, env: dict, copy_gbps: float, *, compile_on: str = "headline") -> Iterator[Row]:
    """Rows for every connection × provider × mode (bf16; the headline connection also in fp32)."""
    size, batch = (128, 1) if s.smoke else (640, 8)
    model_id = "49XS-custom" if s.smoke else "49"
    scaling = None
    if s.smoke:
        from spinenet_fast.detection.presets import CUSTOM_SCALINGS

        scaling = CUSTOM_SCALINGS[model_id]
    base = SpineNet(scaling or model_id, stochastic_depth_rate=0.0, fused=False)
    chosen = connections(base)
    if s.smoke:
        chosen = [c for c in chosen if c.parent_level > c.target_level][:1]
    for connection in chosen:
        dtypes = (torch.bfloat16, torch.float32) if connection.is_headline and not s.smoke else (torch.bfloat16,)
        for dtype in dtypes:
            yield from _run_connection(s, env, copy_gbps, connection, dtype, size, batch, compile_on, model_id)


def _run_connection(s, env, copy_gbps, connection, dtype, size, batch, compile_on, model_id) -> Iterator[Row]:
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
    for provider in PROVIDERS:
        if provider.startswith("compile") and compile_on == "none":
            continue
        if provider.startswith("compile") and compile_on == "headline" and not (connection.is_headline or s.smoke):
            continue
        if provider == "compile-max" and s.smoke:
            continue  # max-autotune needs a GPU; --smoke checks the compile path with "compile" alone
        module = _provider_module(connection, provider, "swish", s.smoke)
        backend = provider.removeprefix("fused-") if provider.startswith("fused") else None
        with use_backend(backend):
            modes = autograd_modes(lambda x, m=module: m([x]), make_input, parent_bytes, s)
            for mode, fn in modes.items():
                row = measure(s, env, fn, bench=f"connection {connection.name}", provider=provider, mode=mode,
                              dtype=dtype, shape=shape, extra={"floor_mb": floor[mode] / 2**20})  # fmt: skip
                if row.p50_ms:
                    row.extra["gbps"] = floor[mode] / (row.p50_ms * 1e-3) / 1e9
                    row.extra["floor_fraction"] = row.extra["gbps"] / copy_gbps
                yield row
