"""Which implementation runs each fused op: ``reference`` (plain PyTorch), ``triton`` or ``cuda``.

Each backend declares, per op, a function returning the reasons it cannot run the given inputs (an empty list
means it can). ``auto`` takes the first able backend in the op's order for the inputs' device (``AUTO_ORDER``
unless the op set its own with :func:`set_auto_order`); ``SPINENET_FAST_BACKEND`` or :func:`set_backend` ask for
one explicitly, and an explicit request that cannot run raises, listing every backend and why not — never a
silent fallback.

``cuda`` is the compiled extension ``spinenet_fast._C`` (CUDA kernels, and on CPU tensors their CPU twins that
run the same shared maths) and, for the two GEMM ops, cuBLAS/cuDNN through ATen. ``auto`` never picks it for CPU
tensors: there the CPU twins exist to test the maths and run only when asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "reference")
AUTO_ORDER_CPU = ("triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPILED_DTYPES = (*FLOAT_DTYPES, torch.float64)  # the extension's and ATen's library kernels

_auto_orders: dict[str, tuple[str, ...]] = {}

_requested: str | None = None
_gpu_order_on_cpu = False


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op, with its ``not_supported_reasons(*args) -> list[str]``."""

    fn: Callable
    not_supported_reasons: Callable[..., list[str]]


_registry: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, not_supported_reasons: Callable[..., list[str]]):
    """Decorator: ``fn`` implements ``op`` for ``backend`` where ``not_supported_reasons(*args)`` is empty."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorate(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = Implementation(fn, not_supported_reasons)
        return fn

    return decorate


def triton_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Why the Triton backend cannot run on these tensors: no triton, CPU without the interpreter, dtype."""
    present = [t for t in tensors if t is not None]
    reasons = []
    if not _triton_installed():
        reasons.append("triton is not installed")
    if any(t.device.type == "cpu" for t in present) and os.environ.get("TRITON_INTERPRET") != "1":
        reasons.append("tensors are on the CPU and TRITON_INTERPRET is not 1")
    if any(t.device.type not in ("cpu", "cuda") for t in present):
        reasons.append(f"device {present[0].device.type} is not supported")
    return reasons


def extension_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Why the compiled extension cannot run on these tensors: not built, device or dtype."""
    from spinenet_fast import _extension

    present = [t for t in tensors if t is not None]
    reasons = []
    if _extension.extension is None:
        reasons.append(f"{_extension.unavailable_reason}; {_extension.BUILD_HINT}")
    if any(t.device.type not in ("cpu", "cuda") for t in present):
        reasons.append(f"device {present[0].device.type} is not supported")
    if any(t.dtype not in COMPILED_DTYPES for t in present):
        reasons.append(f"dtype {present[0].dtype} is not one of {COMPILED_DTYPES}")
    return reasons


def library_reasons(x: torch.Tensor) -> list[str]:
    """Why ATen's library kernels (the GEMM ops' ``cuda`` backend) cannot run on ``x``: device or dtype."""
    reasons = [] if x.device.type in ("cpu", "cuda") else [f"device {x.device.type} is not supported"]
    if x.dtype not in COMPILED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {COMPILED_DTYPES}")
    return reasons


def set_auto_order(op: str, order: tuple[str, ...]) -> None:
    """The order in which ``auto`` tries backends for ``op`` on GPU tensors (the measured fastest first)."""
    if sorted(order) != sorted(BACKENDS):
        raise ValueError(f"order must be a permutation of {BACKENDS}, got {order!r}")
    _auto_orders[op] = tuple(order)


def _device_type(args) -> str:
    """The device type of the first tensor in ``args`` (lists of tensors included), ``"cpu"`` if none."""
    for arg in args:
        for t in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(t, torch.Tensor):
                return t.device.type
    return "cpu"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_kernels_available(device: torch.device) -> bool:
    """Whether ``fused="auto"`` should use the fused ops for parameters on ``device``: a GPU with Triton."""
    return device.type == "cuda" and _triton_installed()


def requested_backend() -> str:
    """``set_backend``'s choice, else ``$SPINENET_FAST_BACKEND``, else ``"auto"``."""
    choice = _requested or os.environ.get("SPINENET_FAST_BACKEND", "auto") or "auto"
    if choice != "auto" and choice not in BACKENDS:
        raise ValueError(f"SPINENET_FAST_BACKEND must be 'auto' or one of {BACKENDS}, got {choice!r}")
    return choice


def set_backend(backend: str | None) -> None:
    """Force ``backend`` for every op (``None`` or ``"auto"`` restores automatic choice)."""
    global _requested
    if backend not in (None, "auto", *BACKENDS):
        raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}, got {backend!r}")
    _requested = None if backend == "auto" else backend


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = _requested
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def auto_where_unimplemented(op: str) -> contextlib.AbstractContextManager:
    """The requested backend for ``op`` where it has an implementation of it, else ``auto``: for an op run inside
    another whose backend was forced, with kernels on fewer backends (the max-pools' backward has no Triton one). A
    ``nullcontext`` where nothing changes (torch.compile before 2.7 cannot trace a generator context manager)."""
    requested = requested_backend()
    if requested == "auto" or requested in implemented(op):
        return contextlib.nullcontext()
    return use_backend(None)


def implemented(op: str) -> tuple[str, ...]:
    """The backends that have an implementation of ``op`` (able to run it or not)."""
    return tuple(b for b in BACKENDS if b in _registry.get(op, {}))


def reasons_by_backend(op: str, *args) -> dict[str, list[str]]:
    """For every backend, why it cannot run ``op`` on ``args`` (an empty list: it can)."""
    implementations = _registry.get(op, {})
    return {
        backend: implementations[backend].not_supported_reasons(*args)
        if backend in implementations
        else [f"no {backend} implementation of {op}"]
        for backend in BACKENDS
    }


def choose(op: str, *args) -> str:
    """The name of the backend that runs ``op`` on ``args``: the requested one, or the first able one."""
    reasons = reasons_by_backend(op, *args)
    requested = requested_backend()
    if requested != "auto":
        candidates = (requested,)
    elif _device_type(args) == "cuda" or _gpu_order_on_cpu:
        candidates = _auto_orders.get(op, AUTO_ORDER)
    else:
        candidates = AUTO_ORDER_CPU
    for backend in candidates:
        if not reasons[backend]:
            return backend
    explained = "; ".join(f"{b}: {', '.join(r) or 'available'}" for b, r in reasons.items())
    raise RuntimeError(f"backend {requested!r} cannot run {op} on these inputs ({explained})")


@contextlib.contextmanager
def gpu_auto_order_on_cpu() -> Iterator[None]:
    """``auto`` chooses for CPU tensors as it would for GPU tensors (the extension's CPU twins standing in for its
    CUDA kernels, Triton for Triton): a CPU run then launches what a GPU run launches (``benchmarks/ledger.py``)."""
    global _gpu_order_on_cpu
    previous = _gpu_order_on_cpu
    _gpu_order_on_cpu = True
    try:
        yield
    finally:
        _gpu_order_on_cpu = previous


def implementation(op: str, backend: str) -> Callable:
    """``backend``'s implementation of ``op`` (whether it can run given inputs is for its reasons to say)."""
    return _registry[op][backend].fn


def select(op: str, *args) -> Callable:
    """The implementation of ``op`` that runs ``args`` (see :func:`choose`)."""
    return _registry[op][choose(op, *args)].fn


@contextlib.contextmanager
def autocast_off(*args) -> Iterator[None]:
    """Autocast disabled for the device of the first tensor in ``args``: the ops choose their own dtypes (storage
    dtype for activations, fp32 for statistics), so nothing inside them may be re-cast."""
    device_type = _device_type(args)
    if not torch.is_autocast_enabled(device_type):  # the common case: nothing to switch off on every op call
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


def run(op: str, *args):
    """Run the chosen implementation of ``op`` on ``args`` with autocast off."""
    fn = select(op, *args)
    with autocast_off(*args):
        return fn(*args)
