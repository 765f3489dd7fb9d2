"""Atomic checkpoints, safe loading with clear errors, the LR schedule."""

import pickle

import pytest
import torch

from spinenet_fast.train.checkpoint import load_checkpoint, save_atomic
from spinenet_fast.train.schedule import WARMUP_START_FACTOR, default_warmup_steps, lr_factor, scaled_lr


def checkpoint(model="49S", category_ids=(1, 2)):
    return {
        "model": {"w": torch.ones(2)},
        "args": {"model": model},
        "label_map": {"category_ids": list(category_ids), "names": [str(c) for c in category_ids]},
    }


def test_save_atomic_round_trip_and_failure_keeps_previous(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.pth"
    save_atomic(checkpoint(), path)
    assert load_checkpoint(path, model="49S", num_classes=2)["model"]["w"].sum() == 2

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom while writing")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({**checkpoint(), "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["model"]["w"].sum() == 2  # the previous checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]  # no temp file left behind


def test_load_rejects_other_model_or_class_count(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic(checkpoint(), path)
    with pytest.raises(ValueError, match="is for model '49S', but model '49' was requested"):
        load_checkpoint(path, model="49")
    with pytest.raises(ValueError, match="has 2 classes, but the dataset has 80"):
        load_checkpoint(path, num_classes=80)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a spinenet_fast training checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_load_is_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({**checkpoint(), "args": {"model": "49S", "obj": object()}}, path)
    with pytest.raises(ValueError, match=r"cannot be read .*[Ww]eights only load failed") as info:
        load_checkpoint(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "cannot be read as a PyTorch checkpoint"),
        (bytes(range(256)) * 4, "cannot be read as a PyTorch checkpoint"),
        (torch.zeros(3), "not a spinenet_fast training checkpoint: a Tensor, not a dict"),
        ({"model": 1, "args": {}, "label_map": {}}, "model and args must be dicts and label_map a dict"),
    ],
)
def test_unreadable_or_foreign_checkpoints_say_so(tmp_path, content, match):
    path = tmp_path / "checkpoint.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)


def test_schedule():
    assert scaled_lr(256) == pytest.approx(0.28) and scaled_lr(16) == pytest.approx(0.0175)
    assert default_warmup_steps(256, 1_000_000) == 2000
    assert default_warmup_steps(64, 1_000_000) == 8000
    assert default_warmup_steps(64, 1000) == 100
    total, warmup = 1000, 100
    assert lr_factor(0, total, warmup) == pytest.approx(WARMUP_START_FACTOR)
    assert lr_factor(50, total, warmup) == pytest.approx(WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) / 2)
    assert [lr_factor(s, total, warmup) for s in (100, 939, 940, 979, 980, 999)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
