"""Checkpoints and the metrics log: written atomically (temp file + rename), checkpoints read with
``weights_only=True`` and checked."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

# Less free space than this after a failed write: the disk was full (torch.save reports it as "unexpected pos").
FULL_DISK_BYTES = 64 * 2**20


def save_atomic(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it: a crash never leaves half a file.
    A full disk raises ``OSError`` (ENOSPC) saying so and where; the previous file is kept."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def write_jsonl_atomic(rows: list[dict], path: str | Path) -> None:
    """``rows`` as JSON lines, written like :func:`save_atomic`: never a torn last line."""
    _write_atomic(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """The JSON lines of ``path`` that parse (an older run may have left a torn last line); [] without the file."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`save_atomic` of ``path`` left beside it; returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _write_atomic(path: str | Path, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(path.parent).free
        Path(tmp).unlink(missing_ok=True)
        if getattr(exc, "errno", None) == errno.ENOSPC or free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, f"the disk is full: could not write {path} ({free} bytes free on the disk of "
                                        f"{path.parent}); the previous {path.name} is kept") from exc  # fmt: skip
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, *, model: str | None = None, num_classes: int | None = None,
                    task: str | None = None) -> dict:  # fmt: skip
    """Load a training checkpoint safely; ``ValueError`` if it is for another model id, class count or task."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise ValueError(f"checkpoint {path} cannot be read as a PyTorch checkpoint (empty, truncated, not one, or "
                         f"holding objects other than tensors and plain values): {exc}") from exc  # fmt: skip
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise ValueError(f"checkpoint {path} is not a spinenet_fast training checkpoint: a {kind}, "
                         "not a dict with model, args and label_map")  # fmt: skip
    missing = [key for key in ("model", "args", "label_map") if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} is not a spinenet_fast training checkpoint: missing {missing}")
    label_map = checkpoint["label_map"]
    well_formed = isinstance(checkpoint["model"], dict) and isinstance(checkpoint["args"], dict)
    if not (well_formed and isinstance(label_map, dict) and isinstance(label_map.get("category_ids"), list)):
        raise ValueError(f"checkpoint {path} is not a spinenet_fast training checkpoint: model and args must be dicts "
                         "and label_map a dict with a category_ids list")  # fmt: skip
    saved_model = checkpoint["args"].get("model")
    if model is not None and saved_model != model:
        raise ValueError(f"checkpoint {path} is for model {saved_model!r}, but model {model!r} was requested")
    saved_task = checkpoint["args"].get("task", "box")
    if task is not None and saved_task != task:
        raise ValueError(f"checkpoint {path} is for --task {saved_task}, but --task {task} was requested")
    saved_classes = len(checkpoint["label_map"]["category_ids"])
    if num_classes is not None and saved_classes != num_classes:
        raise ValueError(f"checkpoint {path} has {saved_classes} classes, but the dataset has {num_classes}")
    return checkpoint
