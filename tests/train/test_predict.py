"""``python -m spinenet_fast.predict``: drawn detections and COCO-format results from a training checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image

from spinenet_fast.predict import main as predict_main
from spinenet_fast.train.__main__ import main as train_main

from .conftest import train_args


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train_main(train_args(tiny_data, out, "--epochs", "1", "--eval-every", "0"))
    return out / "checkpoint.pth"


def test_predictions_are_drawn_and_written(tiny_data, trained, tmp_path, capsys):
    images = sorted((tiny_data / "val2017").glob("*.png"))[:2]
    results = predict_main([*map(str, images), "--checkpoint", str(trained), "--out", str(tmp_path), "--score-thresh",
                            "0"])  # fmt: skip
    assert results, "a score threshold of 0 keeps every detection"
    assert json.loads((tmp_path / "predictions.json").read_text()) == results
    assert {r["image_id"] for r in results} <= {1, 2} and all(r["category_id"] in (1, 2, 3) for r in results)
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] > 0 and 0 <= r["score"] <= 1 for r in results)
    for image in images:
        drawn = Image.open(tmp_path / image.name)
        assert drawn.size == Image.open(image).size
        assert drawn.tobytes() != Image.open(image).convert("RGB").tobytes()  # boxes were drawn
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(line.endswith(" ms") for line in printed)


def test_missing_image_and_bad_threshold(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image .*nope\.png does not exist"):
        predict_main([str(tmp_path / "nope.png"), "--checkpoint", str(trained), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"--score-thresh must be a number in \[0, 1\], got 2"):
        predict_main([str(tmp_path / "nope.png"), "--checkpoint", str(trained), "--out", str(tmp_path / "o"),
                      "--score-thresh", "2"])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_demo_grid_of_validation_predictions(tiny_data, trained, tmp_path):
    from spinenet_fast.demo import save_validation_grid

    save_validation_grid(trained, tiny_data, tmp_path / "grid.png", count=4)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (4 * 128 + 5 * 4, 128 + 2 * 4)  # one row of 4, padded
    assert (np.asarray(grid.convert("RGB")) == (0, 255, 0)).all(-1).any()  # the ground truth, drawn in lime
