"""Shared test settings: deterministic seeds, the ``gpu`` marker's skip, Triton's CPU interpreter."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is imported: Triton kernels then run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # pytest -n N: the cores shared among the workers, not each worker on all of them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def child_env(without: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """This process's environment for a child process (less the variables ``without``, plus ``overrides``), its
    OpenMP threads this test worker's share of the cores (``torch.get_num_threads()``): under ``pytest -n N`` a child
    on every core oversubscribes them, and OpenMP's spin-waiting then slows it several-fold."""
    env = {k: v for k, v in os.environ.items() if k not in without}
    return env | {"OMP_NUM_THREADS": str(torch.get_num_threads())} | overrides


def pytest_collection_modifyitems(config, items):
    # The heaviest tests first (a stable sort: each module's order kept), so that pytest-xdist's workers do not end
    # on one of them while the other cores idle.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require_backend(backend: str) -> None:
    """Skip (saying why) a ``cuda``-backend test when the compiled extension is absent — but fail it when the
    build was requested (``FORCE_CUDA=1``, as CI does), so that a broken extension cannot pass as skipped."""
    if backend != "cuda":
        return
    from spinenet_fast import _extension

    if _extension.extension is None:
        if os.environ.get("FORCE_CUDA") == "1":
            pytest.fail(f"FORCE_CUDA=1 asked for the extension, but {_extension.unavailable_reason}")
        pytest.skip(f"the cuda backend needs the compiled extension: {_extension.unavailable_reason}")


def require_optional(module: str):
    """Import an optional integration's module (TensorFlow, onnxruntime, timm, Model Garden's ``official``, or
    pycocotools, which only evaluation needs), or skip saying why (a whole module, when called at its top) — but
    fail when ``SPINENET_FAST_REQUIRE_OPTIONAL=1`` (CI installs them all), so that a broken
    install cannot pass as skipped."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("SPINENET_FAST_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"SPINENET_FAST_REQUIRE_OPTIONAL=1, but {module} cannot be imported: {exc}")
        pytest.skip(
            f"needs the optional dependency {module} ({exc}); scripts/install.sh installs it", allow_module_level=True
        )


@pytest.fixture(params=["triton", "cuda"])
def fused_backend(request):
    """Both fused backends: Triton (the interpreter on a CPU) and the extension (its CPU kernels on a CPU)."""
    require_backend(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Every device the op tests run on: the CPU (Triton interpreter) and, where present, a GPU."""
    return torch.device(request.param)


class AtenOps(TorchDispatchMode):
    """Records the name (without its namespace) of every ATen op run under it: a fused op's implementation's too,
    not the Triton kernels it launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))
