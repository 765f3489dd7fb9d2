"""Fixes to Triton's CPU interpreter, so that kernels run there as they run on a GPU. Installed by
``spinenet_fast.kernels`` when ``TRITON_INTERPRET=1``; each is a no-op where it is not needed (and on GPUs).

1. Rounding: the interpreter converts fp32 to bf16 by truncation (Triton 3.6 and 3.8 alike), where a GPU — and
   PyTorch — round to nearest even. Truncation doubles and biases the error of every bf16 store, which made bf16
   tests fail or pass by the seed; conversions fp32 → bf16 now round to nearest even.
2. Scalars: Triton < 3.7 turns a scalar into a Python int with ``int(array_of_shape_(1,))``, which numpy ≥ 2.4
   refuses ("only 0-dimensional arrays can be converted to Python scalars"), so any kernel that loops over
   ``range(0, K, BLOCK)`` with a runtime ``K`` stops.
3. Dropped overflow checks: the interpreter redoes every 32-bit integer add, sub and mul in int64 and compares it
   with the int32 range for an assert that its options switch off (``debug`` is False), so the result is thrown away
   — half the time of an index-heavy kernel such as the 3×3 conv. Without ``debug`` the check is no longer computed
   (as compiled Triton emits none).
4. Repeated patching: every call of a ``@triton.jit`` helper inside a kernel re-patches ``triton.language`` (a scan
   of each of its modules' members), though the launch patched it already — a quarter of the time of a kernel that
   calls helpers in its loops. Within a launch, a helper whose language modules that launch has patched already is
   not patched again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import numpy as np


def _version(module) -> tuple[int, int]:
    major, minor = module.__version__.split(".")[:2]
    return int(major), int(minor)


def _scalar_index(self) -> int:
    """``tensor.__index__`` for the interpreter's scalars: their data is a 1-element array."""
    return int(self.handle.data.item())


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of fp32 ``values``, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


def _install_rounding(interpreter, tl) -> None:
    convert = interpreter._convert_float
    if getattr(convert, "spinenet_fast_fix", False):
        return

    @functools.wraps(convert)
    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            return fp32_to_bf16_bits(input).reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    convert_float.spinenet_fast_fix = True
    interpreter._convert_float = convert_float


def _install_scalar_index(interpreter, tl) -> None:
    patch_lang = interpreter._patch_lang
    if getattr(patch_lang, "spinenet_fast_fix", False):
        return

    @functools.wraps(patch_lang)
    def patched(fn):
        scope = patch_lang(fn)
        # After the interpreter's own __index__: its restore afterwards puts back the pre-interpreter original.
        tl.core.tensor.__index__ = _scalar_index
        return scope

    patched.spinenet_fast_fix = True
    interpreter._patch_lang = patched


def _install_one_patch_per_launch(interpreter, tl) -> None:
    patch_lang, executor = interpreter._patch_lang, interpreter.GridExecutor
    if getattr(patch_lang, "spinenet_fast_once", False):
        return
    patched: list[set[int]] = []  # per launch in progress (a stack): the language modules patched in it
    empty_scope = getattr(interpreter, "_LangPatchScope", type(None))  # what a patch returns (None before 3.8)

    def langs(fn) -> set[int]:  # as the interpreter finds them, each time (a module's globals may grow)
        return {id(v) for v in list(fn.__globals__.values()) if inspect.ismodule(v) and v in (tl, tl.core)}

    launch = executor.__call__

    @functools.wraps(launch)
    def tracked_launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    @functools.wraps(patch_lang)
    def patch_once(fn):
        if patched:
            wanted = langs(fn)
            if wanted and wanted <= patched[-1]:  # patched already in this launch (the interpreter never unpatches
                return empty_scope()  # within one: a helper's patch stays, and the launch's is undone at its end)
            patched[-1] |= wanted
        return patch_lang(fn)

    patch_once.spinenet_fast_once = True
    executor.__call__ = tracked_launch
    interpreter._patch_lang = patch_once


def _skip_dropped_overflow_checks(interpreter) -> None:
    builder = interpreter.interpreter_builder
    if not builder.options.debug and builder.options.sanitize_overflow:
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def install() -> None:
    """Patch the interpreter where it needs it."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    if hasattr(interpreter, "_convert_float"):
        _install_rounding(interpreter, tl)
    if _version(triton) < (3, 7) and _version(np) >= (2, 4) and hasattr(interpreter, "_patch_lang"):
        _install_scalar_index(interpreter, tl)
    if hasattr(interpreter, "_patch_lang") and hasattr(interpreter, "GridExecutor"):
        _install_one_patch_per_launch(interpreter, tl)
    if hasattr(interpreter, "interpreter_builder"):
        _skip_dropped_overflow_checks(interpreter)
