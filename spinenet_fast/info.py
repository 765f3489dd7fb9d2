"""``python -m spinenet_fast.info``: versions, build flags and which backend can run each fused op, and why not."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__, _extension, _optional
from .ops import backends


def _example_args(device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """Small valid inputs for every op, to ask each backend whether it can run them."""
    x = torch.zeros(1, 8, 4, 4, device=device, dtype=dtype)
    vector = torch.zeros(8, device=device)
    return {
        "conv1x1_bn_stats": (x, torch.zeros(8, 8, 1, 1, device=device, dtype=dtype), vector, vector, "swish"),
        "conv3x3_bn_stats": (
            x,
            torch.zeros(8, 8, 3, 3, device=device, dtype=dtype),
            vector,
            vector,
            "swish",
            "torch",
            1,
        ),
        "bn_act_maxpool": (x, vector, vector, "swish", 1, "torch"),
        "merge": ([x, x[:, :, :2, :2]], [vector] * 2, [vector] * 2, [1, 2], None, None, "swish"),
        "bn_finalize": (vector, vector, 16, vector, vector, 1e-3),
    }


def report() -> str:
    """The text ``python -m spinenet_fast.info`` prints."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"spinenet_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}",
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""),
        "compiled extension spinenet_fast._C: "
        + ("loaded" if _extension.extension is not None else f"not loaded — {_extension.unavailable_reason}"),
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
        f"SPINENET_FAST_BACKEND={os.environ.get('SPINENET_FAST_BACKEND', '')!r}, "
        f"requested backend: {backends.requested_backend()}",
    ]
    lines.append("optional integrations:")
    lines += [f"  {module:12s} {status}" for module, status in _optional.availability().items()]
    cases = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        cases.append((torch.device("cuda"), torch.bfloat16))
    for device, dtype in cases:
        lines.append(f"\nop × backend on {device.type} {str(dtype)[6:]} (available, or why not):")
        for op, args in _example_args(device, dtype).items():
            reasons = backends.reasons_by_backend(op, *args)
            cells = [f"{b}: {'yes' if not r else '; '.join(r)}" for b, r in reasons.items()]
            try:
                chosen = backends.choose(op, *args)
            except RuntimeError:
                chosen = "none"
            lines.append(f"  {op:20s} runs on {chosen:9s} | " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
