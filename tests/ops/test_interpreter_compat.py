"""The CPU interpreter's fixes (kernels/interpreter_compat.py): fp32 -> bf16 rounds to nearest even, as a GPU and
PyTorch do, in the bit conversion and in a kernel's store; a launch patches the language once; no dropped overflow
check is computed."""

import numpy as np
import torch
import triton
import triton.language as tl
from spinenet_fast.kernels.interpreter_compat import fp32_to_bf16_bits


def test_fp32_to_bf16_bits_rounds_like_torch():
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            3.4e38,
            -3.4e38,
            float("inf"),
            -float("inf"),
            1e-40,
            -1e-39,
            1.0 + 2**-8 + 2**-20,
        ]
    )  # fmt: skip  ties to even, overflow, subnormals
    values = torch.cat([special, torch.randn(4096) * 10 ** torch.randint(-30, 30, (4096,)).float()])
    expected = values.bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(fp32_to_bf16_bits(values.numpy()), expected)
    nan = fp32_to_bf16_bits(np.array([np.nan], dtype=np.float32))
    assert torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).isnan().all()


@triton.jit
def _store_bf16_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))


def test_an_interpreted_bf16_store_rounds_to_nearest_even():
    x = torch.randn(1024)
    y = torch.empty(1024, dtype=torch.bfloat16)
    _store_bf16_kernel[(1,)](x, y, BLOCK=1024)
    assert torch.equal(y, x.bfloat16())


@triton.jit
def _doubled(x):
    return x * 2


@triton.jit
def _helper_calls_kernel(x_ptr, y_ptr, CALLS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    for _ in range(CALLS):
        x = _doubled(x)  # a helper of this module (triton.language patched by the launch)
    tl.store(y_ptr + offsets, x + tl.sum(x, axis=0))  # tl.sum: a helper of triton.language's own (its core module)


def test_a_launch_patches_the_language_once_however_many_helper_calls(monkeypatch):
    """Helpers called inside a launch do not re-patch ``triton.language`` (the launch did): the patching work is the
    same for 2 and 6 helper calls, the results are right, and (Triton 3.8) the launch's restore puts the language
    back."""
    from triton.runtime import interpreter

    patched = []
    patch_builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: patched.append(a[0]) or patch_builtin(*a))
    load = tl.load
    x = torch.randn(64)
    counts = []
    for calls in (2, 2, 6):  # the first launch a warm-up (Triton's modules import more on their first run)
        y = torch.empty(64)
        patched.clear()
        _helper_calls_kernel[(1,)](x, y, CALLS=calls, BLOCK=64)
        counts.append(len(patched))
        doubled = x * 2**calls
        torch.testing.assert_close(y, doubled + doubled.sum())
    assert counts[1] == counts[2] > 0
    if hasattr(interpreter, "_LangPatchScope"):  # Triton 3.8's launches undo their patch (3.2's never did)
        assert tl.load is load


@triton.jit
def _int32_product_kernel(x_ptr, y_ptr):
    tl.store(y_ptr, tl.load(x_ptr) * tl.load(x_ptr))


def test_int32_index_maths_wraps_as_compiled_without_a_dropped_check():
    """Without ``debug`` the interpreter's int32 overflow check (its assert switched off) is not computed: the
    product wraps as compiled Triton's does."""
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    x, y = torch.tensor([70000], dtype=torch.int32), torch.empty(1, dtype=torch.int32)
    _int32_product_kernel[(1,)](x, y)
    assert y.item() == (70000 * 70000 + 2**31) % 2**32 - 2**31
