"""Triton launches without a GPU: ``JITFunction.run`` replaced by a callback, so nothing compiles or runs.

:func:`route_to_triton` imports every kernel as a real ``JITFunction`` and then sets ``TRITON_INTERPRET=1``, under
which the ops route CPU tensors to their Triton backend; :func:`intercepted_launches` stops each launch before
anything could run. Outputs of intercepted launches stay as allocated (uninitialised): right for counting launches
and recording their arguments, not for values.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterator


def kernel_modules() -> list[str]:
    """Every module of ``spinenet_fast.kernels``."""
    import spinenet_fast.kernels as package

    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def route_to_triton() -> None:
    """Import every kernel module (as real JITFunctions), then route the ops' CPU tensors to Triton."""
    from triton.runtime.jit import JITFunction

    for name in kernel_modules():
        importlib.import_module(name)
    from spinenet_fast.kernels.merge import _merge_fwd_kernel

    if not isinstance(_merge_fwd_kernel, JITFunction):
        raise RuntimeError("run without TRITON_INTERPRET=1: the kernels must import as real JITFunctions")
    os.environ["TRITON_INTERPRET"] = "1"


@contextlib.contextmanager
def intercepted_launches(on_launch: Callable[[object, tuple, dict], None]) -> Iterator[None]:
    """Every ``kernel[grid](*args, **kwargs)`` calls ``on_launch(kernel, args, kwargs)`` instead of running."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        on_launch(self, args, kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original
