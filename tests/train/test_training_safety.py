"""Training never keeps bad weights and never loses finished work: hyper-parameters checked up front, divergence
stops the run before anything is saved (the last good checkpoint kept, a non-zero exit), the metrics log as
crash-safe as the checkpoint, stale temporaries removed, a full disk and an unwritable output directory named."""

import errno
import json
import math
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from spinenet_fast.train import checkpoint as checkpoint_module
from spinenet_fast.train import engine
from spinenet_fast.train.__main__ import main as train_main
from spinenet_fast.train.checkpoint import save_atomic

from ..conftest import child_env
from .conftest import train_args


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--lr", "nan"], r"--lr must be a finite number in \(0, inf\], got nan"),
        (["--lr", "-1"], r"--lr must be a finite number"),
        (["--lr", "inf"], r"--lr must be a finite number"),
        (["--momentum", "1"], r"--momentum must be a finite number in \[0, 1\), got 1.0"),
        (["--weight-decay=-1e-5"], r"--weight-decay must be a finite number in \[0, inf\]"),
        (["--clip-norm", "0"], r"--clip-norm must be a finite number in \(0, inf\]"),
        (["--bn-momentum", "0"], r"--bn-momentum must be a finite number in \(0, 1\]"),
        (["--max-loss", "nan"], r"--max-loss must be a finite number"),
        (["--stochastic-depth-rate", "1.5"], r"--stochastic-depth-rate must be a finite number in \[0, 1\]"),
        (["--scale-range", "2", "1"], r"--scale-range must be two finite numbers 0 < MIN <= MAX, got 2.0 1.0"),
        (["-b", "0"], r"--batch-size must be an int >= 1, got 0"),
        (["--epochs", "0"], r"--epochs must be an int >= 1, got 0"),
    ],
)
def test_unusable_hyperparameters_are_refused_up_front(tiny_data, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        train_main(train_args(tiny_data, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def never_trains(*args, **kwargs):
    raise AssertionError("training started")


def test_unwritable_output_dir_is_found_before_training(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr("spinenet_fast.train.__main__.train_one_epoch", never_trains)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ValueError, match=r"--output-dir .*file is not a writable directory"):
        train_main(train_args(tiny_data, not_a_dir, "--epochs", "1"))


def test_a_loss_above_max_loss_stops_before_the_backward_and_saves_nothing(tiny_data, tmp_path):
    with pytest.raises(engine.TrainingDiverged, match=r"diverged at epoch 0, batch 0 \(after 0 optimiser steps\)"):
        train_main(train_args(tiny_data, tmp_path, "--epochs", "1", "--max-loss", "1e-6"))
    assert not (tmp_path / "checkpoint.pth").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_non_finite_weights_keep_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    """Weights that left the finite range during epoch 1 (the loss of each batch was fine before its step): the
    epoch-0 checkpoint and its metrics row stay, and the run stops naming the epoch and the tensors."""
    real_epoch = engine.train_one_epoch

    def blow_up_in_epoch_1(model, *args, epoch, **kwargs):
        row = real_epoch(model, *args, epoch=epoch, **kwargs)
        if epoch == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(math.inf)
        return row

    monkeypatch.setattr("spinenet_fast.train.__main__.train_one_epoch", blow_up_in_epoch_1)
    with pytest.raises(engine.TrainingDiverged, match=r"in epoch 1: 1 weights and buffers are not finite \("):
        train_main(train_args(tiny_data, tmp_path, "--epochs", "2", "--eval-every", "0"))
    kept = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert kept["epoch"] == 0 and all(t.isfinite().all() for t in kept["model"].values() if t.is_floating_point())
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0]


def test_a_diverging_run_exits_non_zero_with_a_message(tiny_data, tmp_path):
    """``--lr 1e6`` from the command line: a message naming the step, exit status 1, no checkpoint of bad weights."""
    args = train_args(tiny_data, tmp_path, "--epochs", "3", "--eval-every", "0")
    args[args.index("--lr") + 1] = "1e6"
    result = subprocess.run([sys.executable, "-m", "spinenet_fast.train", *args], env=child_env(), capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: training diverged") and "Traceback" not in result.stderr
    if (tmp_path / "checkpoint.pth").exists():  # the epochs before the divergence, if any, with finite weights
        kept = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
        assert all(t.isfinite().all() for t in kept["model"].values() if t.is_floating_point())


def test_stale_temporaries_are_removed(tiny_data, tmp_path):
    stale = [tmp_path / ".checkpoint.pth.k1ll3d.tmp", tmp_path / ".metrics.jsonl.t0rn.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = tmp_path / ".other.tmp"
    keep.write_bytes(b"not ours")
    train_main(train_args(tiny_data, tmp_path, "--epochs", "1", "--eval-every", "0"))
    assert not any(path.exists() for path in stale) and keep.exists()


def test_metrics_survive_a_kill_after_the_checkpoint_and_a_torn_log(tiny_data, tmp_path, monkeypatch):
    """Killed between the checkpoint's rename and the log's write: the row is in the checkpoint, and the resumed run
    rewrites the log from it — a torn last line left by an older writer included."""
    real_write = checkpoint_module.write_jsonl_atomic
    calls = []

    def killed_on_second_write(rows, path):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the epoch-1 checkpoint")
        real_write(rows, path)

    monkeypatch.setattr("spinenet_fast.train.__main__.write_jsonl_atomic", killed_on_second_write)
    with pytest.raises(KeyboardInterrupt):
        train_main(train_args(tiny_data, tmp_path, "--epochs", "2", "--eval-every", "0"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + '{"epoch": 1, "lo')  # torn
    train_main(train_args(tiny_data, tmp_path, "--epochs", "3", "--eval-every", "0", "--resume", "auto"))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2] and all("loss" in row for row in rows)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["metrics"] == rows


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 0}, path)

    def disk_full_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(torch, "save", disk_full_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=r"the disk is full: could not write .*checkpoint\.pth \(0 bytes free") as info:
        save_atomic({"epoch": 1}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def failing_save(obj, f):
        raise RuntimeError("not a disk problem")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="not a disk problem"):
        save_atomic({"epoch": 1}, tmp_path / "checkpoint.pth")
    assert list(tmp_path.iterdir()) == []
