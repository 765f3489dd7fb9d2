"""One op, one declaration: the glue every fused op needs, generated from its spec.

An op is declared by decorating a typed stub (its annotations are the op's schema, its docstring the op's contract)::

    @op_spec.custom_op(
        "conv1x1_bn_stats",
        fake=lambda x, weight, *_: ...,                      # meta outputs (torch.compile, opcheck)
        implementations={
            "reference": Backend(reference),            # plain PyTorch: the CPU path and the oracle
            "cuda": Backend(library, library_reasons),  # the extension / ATen's library kernels
            "triton": Backend(kernel("conv1x1", "conv1x1_bn_stats_forward"), triton_reasons),
        },
        auto_order=FUSED_FIRST,
    )
    def _conv1x1_op(x: Tensor, weight: Tensor, ...) -> tuple[Tensor, Tensor]:
        \"\"\"...\"\"\"

which registers each backend with ``backends`` (its ``not_supported_reasons(*args) -> list[str]``, xformers-style),
the order ``auto`` tries them on a GPU, and the ``torch.library`` custom op ``spinenet_fast::<name>`` that runs the
chosen backend with autocast off, plus its fake. Autograd formulas stay with each op (they differ in kind).
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import backends

# The fused implementation first, then the library (cuDNN/cuBLAS through ATen, or the extension), then PyTorch.
FUSED_FIRST = ("triton", "cuda", "reference")


def always_supported(*args) -> list[str]:
    """The reasons of a backend that runs every input (the reference): none."""
    return []


@dataclass(frozen=True)
class Backend:
    """One backend's implementation of an op and ``not_supported_reasons(*op_args)`` (empty: it can run them)."""

    fn: Callable
    not_supported_reasons: Callable[..., list[str]] = always_supported


def kernel(module: str, name: str) -> Callable:
    """``spinenet_fast.kernels.<module>.<name>``, imported at its first call (Triton is optional)."""

    def run(*args):
        return getattr(importlib.import_module(f"spinenet_fast.kernels.{module}"), name)(*args)

    run.__name__ = run.__qualname__ = f"{module}.{name}"
    return run


def extension(name: str) -> Callable:
    """The compiled extension's op ``torch.ops.spinenet_fast.<name>``, looked up at its first call (it may be absent:
    its backend's reasons then say why)."""

    def run(*args):
        return getattr(torch.ops.spinenet_fast, name)(*args)

    run.__name__ = run.__qualname__ = name
    return run


def custom_op(
    name: str,
    *,
    fake: Callable,
    implementations: dict[str, Backend],
    auto_order: tuple[str, ...] | None = None,
    mutates_args: Iterable[str] = (),
    prepare: Callable[..., tuple] | None = None,
) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator on a typed stub: registers the ``implementations`` of ``name`` (``auto_order``: the order ``auto``
    tries them on a GPU, default ``backends.AUTO_ORDER``) and returns the custom op ``spinenet_fast::<name>`` with the
    stub's schema, which runs the chosen backend on ``prepare(*args)`` (the op's own canonicalisation, such as
    contiguous vectors, before any backend sees them; default: the arguments as given) and returns a tuple where the
    schema returns one. ``fake`` is registered as its meta function."""
    mutates_args = tuple(mutates_args)

    def define(stub: Callable) -> torch.library.CustomOpDef:
        for backend, implementation in implementations.items():
            backends.register(name, backend, implementation.not_supported_reasons)(implementation.fn)
        if auto_order is not None:
            backends.set_auto_order(name, auto_order)
        returns = inspect.signature(stub).return_annotation
        returns_tuple = typing.get_origin(returns) is tuple

        def run(*args):
            outputs = backends.run(name, *(prepare(*args) if prepare is not None else args))
            return tuple(outputs) if returns_tuple else outputs

        schema = torch.library.infer_schema(stub, mutates_args=mutates_args)
        op = torch.library.custom_op(f"spinenet_fast::{name}", run, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake)
        op.__doc__ = stub.__doc__
        return op

    return define
