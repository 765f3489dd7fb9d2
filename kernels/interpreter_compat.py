"""Fixes to Triton's CPU interpreter, so that kernels run there as they run on a GPU. Installed by
``spinenet_fast.kernels`` when ``TRITON_INTERPRET=1``; each is a no-op where it is not needed (and on GPUs).

1. Rounding: the interpreter converts fp32 to bf16 by truncation (Triton 3.6 and 3.8 alike), where a GPU — and
   PyTorch — round to nearest even. Truncation doubles and biases the error of every bf16 store, which made bf16
   tests fail or pass by the seed; conversions fp32 → bf16 now round to nearest even.
2. Scalars: Triton < 3.7 turns a scalar into a Python int with ``int(array_of_shape_(1,))``, which numpy ≥ 2.4
   refuses ("only 0-dimensional arrays can be converted to Python scalars"), so any kernel that loops over
   ``range(0, K, BLOCK)`` with a runtime ``K`` stops.
"""

from __future__ import annotations

import functools

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


def install() -> None:
    """Patch the interpreter where it needs it."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    if hasattr(interpreter, "_convert_float"):
        _install_rounding(interpreter, tl)
    if _version(triton) < (3, 7) and _version(np) >= (2, 4) and hasattr(interpreter, "_patch_lang"):
        _install_scalar_index(interpreter, tl)
