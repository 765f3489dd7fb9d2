"""Activation maths shared by the Triton kernels: ``ACT`` 0 = identity, 1 = relu, 2 = swish (x·sigmoid(x))."""

import triton
import triton.language as tl

ACTIVATION_CODES = {"identity": 0, "relu": 1, "swish": 2}


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """act(x) for fp32 ``x``."""
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d act(x) / dx for fp32 ``x``."""
    if ACT == 1:
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return tl.full(x.shape, 1.0, tl.float32)
