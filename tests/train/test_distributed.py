"""``torchrun`` training on the CPU (gloo): distributed evaluation, reduced metrics, elastic restarts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spinenet_fast.data.synthetic import make_synthetic_coco
from spinenet_fast.eval.__main__ import main as eval_main

from .conftest import train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("data"), num_train=8, num_val=5, image_size=128, seed=5)


def torchrun(args: list[str], *torchrun_args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_args,
               "-m", "spinenet_fast.train", *args]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def workers_of(process: subprocess.Popen) -> list[int]:
    """PIDs of the torchrun agent's child processes (the training workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == process.pid:
            children.append(int(stat.parent.name))
    return children


def test_two_processes_train_and_evaluate_their_shards(data, tmp_path):
    out = tmp_path / "ddp"
    output = finish(torchrun(train_args(data, out, "--epochs", "1", "-b", "2", "--accum-steps", "2")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and output.count("epoch 0:") == 1  # rank 0 logs alone
    assert {"loss", "images_per_s", "AP"} <= rows[0].keys()
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["lr_scheduler"]["last_epoch"] == 1  # 8 images / (2 processes × 2 per batch × 2 batches)
    # The 5 validation images were split 3 + 2 across the ranks and gathered: same stats as one process.
    single = eval_main(["--checkpoint", str(out / "checkpoint.pth"), "--data-path", str(data), "--output-dir",
                        str(tmp_path / "single"), "--workers", "0"])  # fmt: skip
    distributed = json.loads((out / "coco_stats.json").read_text())
    assert distributed == pytest.approx(single)
    results = json.loads((out / "coco_results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == sorted({r["image_id"] for r in json.loads(
        (tmp_path / "single" / "coco_results.json").read_text())})  # fmt: skip


def test_killed_worker_resumes_to_the_uninterrupted_checkpoint(data, tmp_path):
    args = ["--epochs", "3", "-b", "2", "--resume", "auto", "--eval-every", "3"]
    finish(torchrun(train_args(data, tmp_path / "uninterrupted", *args)))
    out = tmp_path / "killed"
    process = torchrun(train_args(data, out, *args), "--max-restarts=1")
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists():  # epoch 0 is checkpointed and logged: kill during epoch 1
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before epoch 0 was logged"
        time.sleep(0.05)
    workers = workers_of(process)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    output = finish(process)
    assert "epoch 2:" in output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2], output[-2000:]  # epoch 1 ran once, after the restart
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)
    expected = torch.load(tmp_path / "uninterrupted" / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 2
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
