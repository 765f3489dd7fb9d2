"""Backend choice: automatic per device, explicit requests honoured or refused with every reason."""

import pytest
import torch

from spinenet_fast import _extension
from spinenet_fast.ops import backends, merge, set_backend, use_backend
from spinenet_fast.ops.merge import merge_reference

from ..conftest import require_backend


def merge_args(device="cpu"):
    parents = [torch.randn(1, 3, 2, 2, device=device), torch.randn(1, 3, 1, 1, device=device)]
    vectors = [torch.randn(3, device=device) for _ in range(4)]
    return parents, vectors[:2], vectors[2:], [1, 2], None, "relu"


def op_args(device="cpu"):
    """``merge_args`` as the op and its backends take them: (parents, scales, shifts, ratios, extra, row_scale,
    activation)."""
    *args, activation = merge_args(device)
    return *args, None, activation


def test_auto_picks_reference_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = op_args()
    assert backends.select("merge", *args) is merge_reference
    reasons = backends.reasons_by_backend("merge", *args)
    assert reasons["reference"] == []
    assert reasons["triton"] == ["tensors are on the CPU and TRITON_INTERPRET is not 1"]


def test_auto_never_picks_the_extensions_cpu_twins(monkeypatch):
    require_backend("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = op_args()
    assert backends.reasons_by_backend("merge", *args)["cuda"] == []
    assert backends.select("merge", *args) is merge_reference
    with use_backend("cuda"):
        assert backends.select("merge", *args) is not merge_reference


def test_gpu_auto_order_on_cpu_picks_what_a_gpu_would(monkeypatch):
    """The launch ledger's routing: CPU tensors take the GPU's auto order (the extension's CPU twins first for the
    merge, Triton first for the GEMM ops), and only inside the context."""
    require_backend("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = op_args()
    assert backends.choose("merge", *args) == "triton"  # the CPU order
    with backends.gpu_auto_order_on_cpu():
        assert backends.choose("merge", *args) == "cuda"
        x = torch.randn(1, 3, 2, 2)
        assert backends.choose("conv1x1_bn_stats", x, torch.randn(4, 3, 1, 1), None, None, "identity") == "triton"
    assert backends.choose("merge", *args) == "triton"


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_extension, "extension", None)
    monkeypatch.setattr(_extension, "unavailable_reason", "spinenet_fast._C is not available (test)")
    with use_backend("cuda"), pytest.raises(RuntimeError) as info:
        merge(*merge_args())
    assert "cuda: spinenet_fast._C is not available (test); build it with: FORCE_CUDA=1" in str(info.value)


def test_explicit_request_that_cannot_run_lists_every_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError) as info:
        merge(*merge_args())
    message = str(info.value)
    assert "backend 'triton' cannot run merge" in message
    assert "reference: available" in message
    assert "triton: tensors are on the CPU and TRITON_INTERPRET is not 1" in message
    assert "cuda: " in message


def test_environment_variable_and_set_backend(monkeypatch):
    monkeypatch.setenv("SPINENET_FAST_BACKEND", "cuda")
    parents = [torch.randn(1, 3, 2, 2) for _ in range(3)]  # three parents: more than the extension takes
    vectors = [torch.randn(3) for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run merge.*takes 1 or 2 parents, got 3"):
        merge(parents, vectors, vectors, [1, 1, 1], None, "relu")
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
    reasons = backends.reasons_by_backend("merge", parents, vectors, vectors, [1, 1, 1], None, None, "relu")
    assert "the Triton merge takes 1 or 2 parents, got 3" in reasons["triton"]
    assert "the extension's merge takes 1 or 2 parents, got 3" in reasons["cuda"]
    with use_backend("reference"):
        merge(parents, vectors, vectors, [1, 1, 1], None, "relu")  # the reference takes any number


def test_auto_order_per_op_must_name_every_backend():
    with pytest.raises(ValueError, match="order must be a permutation of"):
        backends.set_auto_order("merge", ("cuda", "triton"))
