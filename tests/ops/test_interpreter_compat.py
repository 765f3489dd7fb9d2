"""The CPU interpreter's fixes (kernels/interpreter_compat.py): fp32 -> bf16 rounds to nearest even, as a GPU and
PyTorch do, in the bit conversion and in a kernel's store."""

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
