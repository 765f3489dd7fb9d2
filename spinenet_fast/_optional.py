"""Optional integrations (TensorFlow, ONNX Runtime, timm): lazy imports with a clear message when missing."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import types

# module -> (pip extra that installs it, what it is for)
OPTIONAL_MODULES = {
    "tensorflow": ("tf", "converting official TF checkpoints (spinenet_fast.convert)"),
    "onnx": ("onnx", "ONNX export (spinenet_fast.export)"),
    "onnxscript": ("onnx", "ONNX export with torch.onnx's dynamo exporter"),
    "onnxruntime": ("onnx", "running exported ONNX models"),
    "timm": ("timm", "timm.create_model('spinenet49', features_only=True)"),
}


def require(module: str) -> types.ModuleType:
    """Import ``module`` or raise ``ImportError`` saying what needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, purpose = OPTIONAL_MODULES[module]
        raise ImportError(
            f"{purpose} needs the optional dependency {module!r} ({exc}); "
            f'install it with: pip install "spinenet-fast[{extra}]"'
        ) from exc


def availability() -> dict[str, str]:
    """``module -> "available (version)"`` or ``"not installed: pip install spinenet-fast[extra] for …"``,
    without importing the modules (TensorFlow takes seconds to import)."""
    rows = {}
    for module, (extra, purpose) in OPTIONAL_MODULES.items():
        if importlib.util.find_spec(module) is None:
            rows[module] = f'not installed — pip install "spinenet-fast[{extra}]" for {purpose}'
            continue
        distributions = importlib.metadata.packages_distributions().get(module, [module])  # tensorflow-cpu, …
        try:
            version = importlib.metadata.version(distributions[0])
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        rows[module] = f"available ({version}) for {purpose}"
    return rows
