"""The training CLI end to end on a tiny synthetic set: outputs, resume equivalence, bad input, --test-only."""

import itertools
import json
import subprocess
import sys

import pytest
import torch

from spinenet_fast.eval.__main__ import main as eval_main
from spinenet_fast.train import engine
from spinenet_fast.train.__main__ import main as train_main

from ..conftest import child_env
from .conftest import train_args


@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train_main(train_args(tiny_data, out, "--epochs", "2"))
    return out


def test_outputs(two_epoch_run):
    rows = [json.loads(line) for line in (two_epoch_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert {"loss", "classification", "bbox_regression", "lr", "images_per_s", "AP", "AP50"} <= set(rows[0])
    assert (two_epoch_run / "metrics.png").stat().st_size > 1000
    stats = json.loads((two_epoch_run / "coco_stats.json").read_text())
    assert len(stats) == 12
    ckpt = torch.load(two_epoch_run / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "label_map", "metrics"}
    assert ckpt["metrics"] == rows  # the log is rewritten from the checkpoint's history
    assert ckpt["epoch"] == 1 and ckpt["label_map"]["names"] == ["circle", "square", "triangle"]


def test_interrupted_run_resumes_to_identical_weights(tiny_data, two_epoch_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_epoch = engine.train_one_epoch
    calls = []

    def crash_on_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during epoch 1")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr("spinenet_fast.train.__main__.train_one_epoch", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_main(train_args(tiny_data, out, "--epochs", "2"))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0  # epoch 0 survived the crash
    monkeypatch.undo()
    train_main(train_args(tiny_data, out, "--epochs", "2", "--resume", str(out / "checkpoint.pth")))
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)
    expected = torch.load(two_epoch_run / "checkpoint.pth", weights_only=True)
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)


def test_test_only_and_eval_cli_agree(tiny_data, two_epoch_run, tmp_path, capsys):
    ckpt = str(two_epoch_run / "checkpoint.pth")
    test_only = train_main(train_args(tiny_data, tmp_path / "t", "--resume", ckpt, "--test-only"))
    capsys.readouterr()
    evaluated = eval_main(["--checkpoint", ckpt, "--data-path", str(tiny_data), "--output-dir", str(tmp_path / "e"),
                           "--workers", "0"])  # fmt: skip
    assert test_only == evaluated
    printed = capsys.readouterr().out
    assert "index created" not in printed and "loading annotations" not in printed  # pycocotools kept quiet
    pairs = set(itertools.pairwise(printed.split()))
    for name, value in evaluated.items():
        assert (name, "n/a" if value == -1 else f"{value:.3f}") in pairs, name
    assert str((tmp_path / "e" / "coco_stats.json").resolve()) in printed
    results = json.loads((tmp_path / "e" / "coco_results.json").read_text())
    assert all(r["category_id"] in (1, 2, 3) and len(r["bbox"]) == 4 for r in results)


def test_resume_with_another_model_is_refused(tiny_data, two_epoch_run, tmp_path):
    args = train_args(tiny_data, tmp_path, "--resume", str(two_epoch_run / "checkpoint.pth"))
    args[args.index("49XS-custom")] = "49S"
    with pytest.raises(ValueError, match="is for model '49XS-custom', but model '49S' was requested"):
        train_main(args)


def test_bad_cli_values(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="--image-size must be a positive multiple of 128, got 100"):
        train_main(train_args(tiny_data, tmp_path, "--image-size", "100"))
    with pytest.raises(ValueError, match="--test-only needs --resume"):
        train_main(train_args(tiny_data, tmp_path, "--test-only"))
    with pytest.raises(FileNotFoundError, match=r"instances_missing\.json does not exist"):
        train_main(train_args(tiny_data, tmp_path, "--train-split", "missing"))
    with pytest.raises(ValueError, match=r"--eval-every must be 0 .* got -1"):
        train_main(train_args(tiny_data, tmp_path, "--eval-every", "-1"))


TRAIN_WITHOUT_PYCOCOTOOLS = """
import sys
sys.modules["pycocotools"] = None  # any import of pycocotools now raises ImportError
from spinenet_fast.train.__main__ import main
main(sys.argv[1:])
assert "pycocotools.coco" not in sys.modules
"""


def test_training_without_evaluation_needs_no_pycocotools(tiny_data, tmp_path):
    """--eval-every 0 trains and checkpoints where pycocotools cannot be imported (the GPU machine's image)."""
    args = train_args(tiny_data, tmp_path, "--epochs", "1", "--eval-every", "0")
    subprocess.run([sys.executable, "-c", TRAIN_WITHOUT_PYCOCOTOOLS, *args], env=child_env(), check=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss"] > 0 and "AP" not in row and not (tmp_path / "coco_stats.json").exists()


def test_what_is_trained_is_said_first(tiny_data, tmp_path, capsys):
    train_main(train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--eval-every", "0"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training RetinaNet-SpineNet-49XS-custom (")
    assert "fused connections and loss off) to detect 3 classes (circle, square, triangle)" in lines[0]
    assert f"8 train2017 images from {tiny_data.resolve()}, 128 px, batch 4, 1 epochs on cpu" in lines[1]
    assert f"output: {(tmp_path / 'run').resolve()}" in lines[2]
    assert lines[3].startswith("epoch 0: loss ")


def test_fused_spinenet49_trains_in_the_training_loop(tiny_data, tmp_path):
    from spinenet_fast.ops import use_backend

    args = train_args(tiny_data, tmp_path, "--epochs", "1", "--fused", "true")
    args[args.index("49XS-custom")] = "49"
    with use_backend("reference"):
        stats = train_main(args)
    assert len(stats) == 12
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 0 and torch.load(tmp_path / "checkpoint.pth", weights_only=True)["args"]["fused"] == "true"


@pytest.mark.heavy
def test_fused_amp_channels_last_compile_and_accumulation(tiny_data, tmp_path):
    """The throughput options together: fused ops (the extension's CPU kernels) under bf16 autocast, NHWC,
    torch.compile (aot_eager: no C++ compiler run) and 2-batch gradient accumulation."""
    from spinenet_fast.ops import use_backend

    from ..conftest import require_backend

    require_backend("cuda")
    extra = ["--epochs", "1", "-b", "2", "--fused", "true", "--amp", "--channels-last", "true", "--compile",
             "aot_eager", "--accum-steps", "2"]  # fmt: skip
    with use_backend("cuda"):
        train_main(train_args(tiny_data, tmp_path, *extra))
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss"] > 0 and row["images_per_s"] > 0
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["lr_scheduler"]["last_epoch"] == 2  # 8 images, 2 per batch, 2 batches per step
    assert all(v.dtype != torch.bfloat16 for v in checkpoint["model"].values())  # autocast keeps fp32 weights


def test_mask_task_trains_evaluates_and_predicts(tiny_data, two_epoch_run, tmp_path, capsys):
    """``--task mask``: a Mask R-CNN run whose metrics, plot and stats include the mask AP, whose checkpoint the eval
    and predict CLIs rebuild (labels mapped back past the background class), and whose task a resume must match."""
    from spinenet_fast.predict import main as predict_main

    out = tmp_path / "mask"
    stats = train_main(train_args(tiny_data, out, "--task", "mask", "--epochs", "1"))
    assert "training Mask R-CNN-SpineNet-49XS-custom" in capsys.readouterr().out
    assert {"AP", "segm_AP", "segm_AP50"} <= set(stats) and len(stats) == 24
    row = json.loads((out / "metrics.jsonl").read_text())
    assert {"loss_mask", "loss_objectness", "segm_AP"} <= set(row) and (out / "metrics.png").stat().st_size > 1000
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["args"]["task"] == "mask"
    assert checkpoint["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4  # 3 classes + background
    evaluated = eval_main(["--checkpoint", str(out / "checkpoint.pth"), "--data-path", str(tiny_data),
                           "--output-dir", str(tmp_path / "e"), "--workers", "0"])  # fmt: skip
    assert evaluated == stats
    results = json.loads((tmp_path / "e" / "coco_results.json").read_text())
    assert all(r["category_id"] in (1, 2, 3) and "counts" in r["segmentation"] for r in results)
    predicted = predict_main(["--checkpoint", str(out / "checkpoint.pth"), "--out", str(tmp_path / "p"),
                              "--score-thresh", "0", str(next((tiny_data / "val2017").iterdir()))])  # fmt: skip
    assert predicted and all(r["category_id"] in (1, 2, 3) for r in predicted)

    refused = train_args(tiny_data, tmp_path / "r", "--resume", str(two_epoch_run / "checkpoint.pth"))
    with pytest.raises(ValueError, match="is for --task box, but --task mask was requested"):
        train_main([*refused, "--task", "mask"])
