"""Backend choice: automatic per device, explicit requests honoured or refused with every reason."""

import pytest
import torch

from spinenet_fast.ops import backends, merge, set_backend, use_backend
from spinenet_fast.ops.merge import merge_reference


def merge_args(device="cpu"):
    parents = [torch.randn(1, 3, 2, 2, device=device), torch.randn(1, 3, 1, 1, device=device)]
    vectors = [torch.randn(3, device=device) for _ in range(4)]
    return parents, vectors[:2], vectors[2:], [1, 2], None, "relu"


def test_auto_picks_reference_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = merge_args()
    assert backends.select("merge", *args) is merge_reference
    reasons = backends.reasons_by_backend("merge", *args)
    assert reasons["reference"] == []
    assert reasons["triton"] == ["tensors are on the CPU and TRITON_INTERPRET is not 1"]
    assert reasons["cuda"] == ["no cuda implementation of merge"]


def test_explicit_request_that_cannot_run_lists_every_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError) as info:
        merge(*merge_args())
    message = str(info.value)
    assert "backend 'triton' cannot run merge" in message
    assert "reference: available" in message
    assert "triton: tensors are on the CPU and TRITON_INTERPRET is not 1" in message
    assert "cuda: no cuda implementation of merge" in message


def test_environment_variable_and_set_backend(monkeypatch):
    monkeypatch.setenv("SPINENET_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run merge"):
        merge(*merge_args())
    monkeypatch.setenv("SPINENET_FAST_BACKEND", "reference")
    assert backends.requested_backend() == "reference"
    with use_backend("triton"):
        assert backends.requested_backend() == "triton"  # set_backend wins over the environment
    monkeypatch.setenv("SPINENET_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPINENET_FAST_BACKEND must be 'auto' or one of"):
        backends.requested_backend()
    with pytest.raises(ValueError, match="backend must be None, 'auto' or one of"):
        set_backend("tpu")


def test_triton_takes_at_most_two_parents():
    parents = [torch.randn(1, 3, 2, 2) for _ in range(3)]
    vectors = [torch.randn(3) for _ in range(3)]
    reasons = backends.reasons_by_backend("merge", parents, vectors, vectors, [1, 1, 1], None, "relu")
    assert "the Triton merge takes 1 or 2 parents, got 3" in reasons["triton"]
    with use_backend("reference"):
        merge(parents, vectors, vectors, [1, 1, 1], None, "relu")  # the reference takes any number
