"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True`` and checked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, *, model: str | None = None, num_classes: int | None = None) -> dict:
    """Load a training checkpoint safely; ``ValueError`` if it is for another model id or class count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in ("model", "args", "label_map") if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} is not a spinenet_fast training checkpoint: missing {missing}")
    saved_model = checkpoint["args"].get("model")
    if model is not None and saved_model != model:
        raise ValueError(f"checkpoint {path} is for model {saved_model!r}, but model {model!r} was requested")
    saved_classes = len(checkpoint["label_map"]["category_ids"])
    if num_classes is not None and saved_classes != num_classes:
        raise ValueError(f"checkpoint {path} has {saved_classes} classes, but the dataset has {num_classes}")
    return checkpoint
