"""Measurement primitives shared by the suites (benchmarks.md): device-event timings, memory, kernels, bandwidth.

Every timed function is called ``warmup`` times, then ``runs`` times with the L2 cache flushed before each run
(on a GPU), each run timed by CUDA events (``time.perf_counter`` on a CPU); a row reports the median and the
20th/80th percentiles. Inputs rotate over enough sets to exceed the L2 cache. A provider that fails becomes a
row with ``error`` set instead of stopping the run.
"""

from __future__ import annotations

import datetime
import math
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import cycle
from pathlib import Path

import torch

L2_BYTES = 50 * 2**20  # H100's L2; rotating past 64 MiB of inputs measures HBM, not L2
FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Settings:
    """Where and how long to measure. ``smoke``: tiny shapes, 2 runs, CPU providers — a harness check only."""

    device: torch.device
    warmup: int
    runs: int
    smoke: bool

    @classmethod
    def create(cls, smoke: bool, runs: int | None = None) -> Settings:
        device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
        if smoke:  # no warm-up: the first timed run includes compilation, which --smoke does not judge
            return cls(device, warmup=0, runs=runs or 2, smoke=True)
        return cls(device, warmup=10, runs=runs or 100, smoke=False)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def environment(device: torch.device) -> dict[str, str]:
    """The fields every row carries: device, versions, git commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": sha,
        "date": datetime.date.today().isoformat(),
    }


@dataclass
class Row:
    """One measurement, as benchmarks.md's JSON row plus suite-specific ``extra`` fields."""

    bench: str
    provider: str
    mode: str
    dtype: str
    shape: str
    p50_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mb: float | None = None
    kernels: int | None = None
    device: str = ""
    torch: str = ""
    triton: str = ""
    git_sha: str = ""
    date: str = ""
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


class _CacheFlush:
    """Overwrites a 256 MiB buffer so that each timed run starts with a cold L2 (GPU only)."""

    def __init__(self, device: torch.device) -> None:
        self.buffer = torch.empty(FLUSH_BYTES // 4, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def quantiles(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of the run times."""
    t = torch.tensor(times_ms, dtype=torch.float64)
    p20, p50, p80 = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return p20, p50, p80


def time_runs(fn: Callable[[], object], s: Settings) -> tuple[float, float, float]:
    """(p20, p50, p80) in ms of ``fn`` after ``s.warmup`` calls, over ``s.runs`` timed calls."""
    for _ in range(s.warmup):
        fn()
    s.sync()
    flush = _CacheFlush(s.device)
    times = []
    if s.device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(s.runs)]
        for start, end in events:
            flush()
            start.record()
            fn()
            end.record()
        s.sync()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(s.runs):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return quantiles(times)


def peak_memory_mb(fn: Callable[[], object], s: Settings) -> float | None:
    """Peak memory one call of ``fn`` allocates above what was allocated before it (GPU only)."""
    if s.device.type != "cuda":
        return None
    s.sync()
    torch.cuda.reset_peak_memory_stats(s.device)
    before = torch.cuda.memory_allocated(s.device)
    fn()
    s.sync()
    return (torch.cuda.max_memory_allocated(s.device) - before) / 2**20


def count_kernels(fn: Callable[[], object], s: Settings) -> int:
    """Kernels (and memcpy/memset) one call of ``fn`` launches on a GPU; on a CPU, the ATen and custom ops it runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        s.sync()
    if s.device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    return sum(1 for e in prof.events() if _is_op(e) and not _has_op_parent(e))


def _is_op(event) -> bool:
    return event.name.startswith(("aten::", "spinenet_fast::"))


def _has_op_parent(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_op(parent):
            return True
        parent = parent.cpu_parent
    return False


def copy_bandwidth_gbps(s: Settings) -> float:
    """Device-copy bandwidth (read + write bytes per second) of a large ``copy_``: the byte floor's yardstick."""
    numel = (2**20 if s.smoke else 2**28) // 4
    src = torch.empty(numel, device=s.device)
    dst = torch.empty_like(src)
    _, p50, _ = time_runs(lambda: dst.copy_(src), s)
    return 2 * src.numel() * src.element_size() / (p50 * 1e-3) / 1e9


def rotation_count(bytes_per_set: int, s: Settings) -> int:
    """How many input sets to rotate so that together they exceed the L2 cache (at least 3; 1 in --smoke)."""
    return 1 if s.smoke else min(16, max(3, math.ceil(64 * 2**20 / max(bytes_per_set, 1))))


def fused_backend(device: torch.device) -> str | None:
    """``auto`` (None) on a GPU; on a CPU (--smoke) the extension's CPU kernels, else the reference: whole
    models under the Triton interpreter would take minutes."""
    if device.type == "cuda":
        return None
    from spinenet_fast import _extension

    return "cuda" if _extension.extension is not None else "reference"


def measure(
    s: Settings,
    env: dict[str, str],
    fn: Callable[[], object],
    *,
    bench: str,
    provider: str,
    mode: str,
    dtype: torch.dtype,
    shape: str,
    extra: dict | None = None,
) -> Row:
    """Time ``fn``, then its peak memory and kernel count; an exception becomes the row's ``error``."""
    row = Row(bench, provider, mode, str(dtype).removeprefix("torch."), shape, **env, extra=dict(extra or {}))
    try:
        row.p20_ms, row.p50_ms, row.p80_ms = time_runs(fn, s)
        row.peak_mb = peak_memory_mb(fn, s)
        row.kernels = count_kernels(fn, s)
    except Exception as exc:  # a provider that cannot run this case is reported, not fatal
        row.extra["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return row


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def autograd_modes(
    forward: Callable[..., object], make_input: Callable[[], tuple], bytes_per_set: int, s: Settings
) -> dict[str, Callable[[], object]]:
    """``fwd``, ``bwd`` and ``fwd+bwd`` closures of ``forward(*inputs)`` over rotating input sets.

    The backward starts from the first output with a fixed random gradient; ``bwd`` replays the backward of
    graphs built once (``retain_graph``), so it times the backward alone. Inputs are made on the first call, so
    that a provider that cannot run fails inside :func:`measure`.
    """
    state: dict[str, object] = {}

    def prepared() -> dict[str, object]:
        if not state:
            sets = [make_input() for _ in range(rotation_count(bytes_per_set, s))]
            state["pairs"] = [(inputs, torch.randn_like(_first(forward(*inputs)))) for inputs in sets]
            state["cycle"] = cycle(state["pairs"])
        return state

    def fwd():
        return forward(*next(prepared()["cycle"])[0])

    def fwd_bwd():
        inputs, grad = next(prepared()["cycle"])
        torch.autograd.backward([_first(forward(*inputs))], [grad])

    def bwd():
        st = prepared()
        if "graphs" not in st:
            st["graphs"] = cycle([(_first(forward(*inputs)), grad) for inputs, grad in st["pairs"]])
        out, grad = next(st["graphs"])
        torch.autograd.backward([out], [grad], retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
