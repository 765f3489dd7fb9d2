"""The tiny synthetic dataset and the CLI arguments the training tests share."""

import pytest

from spinenet_fast.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("data"), num_train=8, num_val=4, image_size=128, seed=3)


def train_args(data, out, *extra):
    return [
        "--data-path", str(data), "--model", "49XS-custom", "--image-size", "128", "-b", "4",
        "--workers", "0", "--lr", "0.02", "--output-dir", str(out), "--no-progress", *extra,
    ]  # fmt: skip
