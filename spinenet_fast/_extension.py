"""Loads the optional compiled extension ``spinenet_fast._C``; importing this package never requires it."""

from __future__ import annotations

import importlib
import types

BUILD_HINT = (
    'build it with: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" pip install -e . --no-build-isolation '
    "(needs nvcc and CUDA_HOME; ninja makes it faster)"
)


def _load() -> tuple[types.ModuleType | None, str | None]:
    try:
        return importlib.import_module("spinenet_fast._C"), None
    except ImportError as exc:
        return None, f"spinenet_fast._C is not available ({exc})"


extension, unavailable_reason = _load()


def require_extension(what: str) -> types.ModuleType:
    """The loaded extension module, or a ``RuntimeError`` saying that ``what`` needs it and how to build it."""
    if extension is None:
        raise RuntimeError(f"{what} needs the compiled extension: {unavailable_reason}; {BUILD_HINT}")
    return extension
