"""Shared test settings: deterministic seeds, the ``gpu`` marker's skip, Triton's CPU interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is imported: Triton kernels then run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Every device the op tests run on: the CPU (Triton interpreter) and, where present, a GPU."""
    return torch.device(request.param)
