"""SIGKILL at random points of a training run — inside an optimiser step's epoch, inside the checkpoint's and the
metrics log's atomic writes (mid-write, before and after the rename) — leaves the last good checkpoint and a
readable metrics log, and ``--resume auto`` then finishes with exactly the weights and losses of an uninterrupted
run."""

import json
import random
import subprocess
import sys

import pytest
import torch

from ..conftest import child_env
from .conftest import train_args

# Runs the training CLI in a child that SIGKILLs itself at one point: ("step", n) at the n-th optimiser step;
# ("mid_write", n, fraction) after writing that fraction of the n-th atomic file write's bytes; ("before_rename", n)
# with the n-th temporary file complete; ("after_rename", n) right after the n-th rename. Each epoch makes two atomic
# writes, the checkpoint then the metrics log.
KILLING_CHILD = r"""
import json, os, signal, sys
import torch
from spinenet_fast.train import __main__ as cli

point = json.loads(sys.argv[1])
kind, n = point[0], point[1]
calls = {"write": 0, "replace": 0, "step": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "step":
    real_step = torch.optim.SGD.step
    def step(self, *args, **kwargs):
        calls["step"] += 1
        if calls["step"] == n:
            die()
        return real_step(self, *args, **kwargs)
    torch.optim.SGD.step = step
if kind == "mid_write":
    real_fdopen = os.fdopen
    class Torn:
        def __init__(self, f):
            self.f, self.data = f, bytearray()
        def write(self, b):
            self.data += b
            return len(b)
        def flush(self):
            self.f.write(bytes(self.data[: int(len(self.data) * point[2])]))
            self.f.flush()
            die()
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        calls["write"] += 1
        return Torn(f) if calls["write"] == n else f
    os.fdopen = fdopen
if kind in ("before_rename", "after_rename"):
    real_replace = os.replace
    def replace(src, dst):
        calls["replace"] += 1
        if calls["replace"] == n and kind == "before_rename":
            die()
        real_replace(src, dst)
        if calls["replace"] == n:
            die()
    os.replace = replace
cli.main(sys.argv[2:])
raise SystemExit("the kill point was never reached")
"""

EPOCHS = 3
RNG = random.Random(17)  # the random parts of the kill points, fixed so that a failure reproduces
KILL_POINTS = [
    ("step", RNG.randint(3, 2 * EPOCHS)),  # 2 steps per epoch: somewhere after epoch 0
    ("mid_write", 3, RNG.uniform(0.05, 0.95)),  # epoch 1's checkpoint, torn
    ("before_rename", 3),  # epoch 1's checkpoint complete, not yet in place
    ("after_rename", 3),  # epoch 1's checkpoint in place, its metrics row not yet written
    ("mid_write", 4, RNG.uniform(0.05, 0.95)),  # epoch 1's metrics log, torn
]


def run_cli(args, point=None):
    code = KILLING_CHILD if point else "import sys; from spinenet_fast.train.__main__ import main; main(sys.argv[1:])"
    extra = [json.dumps(point)] if point else []
    return subprocess.run([sys.executable, "-c", code, *extra, *args], env=child_env(), capture_output=True,
                          text=True)  # fmt: skip


def losses(out):
    return [(row["epoch"], row["loss"]) for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli(train_args(tiny_data, out, "--epochs", str(EPOCHS), "--eval-every", "0"))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: "-".join(map(str, p[:2])))
def test_sigkill_then_resume_is_exact(tiny_data, uninterrupted, tmp_path, point):
    args = train_args(tiny_data, tmp_path, "--epochs", str(EPOCHS), "--eval-every", "0")
    killed = run_cli(args, point)
    assert killed.returncode == -9, killed.stderr

    # What survived: a checkpoint that loads, and a log whose every line parses and which the checkpoint's history
    # extends by at most the row of the epoch whose log write was killed.
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    history = checkpoint["metrics"]
    assert len(history) == checkpoint["epoch"] + 1 and rows in (history, history[:-1])

    resumed = run_cli([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert not list(tmp_path.glob(".*.tmp")), "the killed write's temporary file was removed"
    assert losses(tmp_path) == losses(uninterrupted)
    got = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    expected = torch.load(uninterrupted / "checkpoint.pth", weights_only=True)["model"]
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
