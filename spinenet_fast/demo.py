"""``python -m spinenet_fast.demo``: generate the synthetic shapes set, train a small RetinaNet-SpineNet on the CPU,
evaluate it with pycocotools and print COCO AP / AP50 (a few minutes on 2 cores).

The model is the official SpineNet-Mobile-49XS RetinaNet (separable-conv head, TF ``SAME`` padding) at 128 px, without
stochastic depth and with BN momentum 0.1 for the short run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision.transforms.functional import pil_to_tensor

from .data import CocoDetectionDataset
from .data.synthetic import make_synthetic_coco
from .eval.__main__ import main as evaluate_checkpoint
from .predict import load_detector, save_grid
from .train.__main__ import main as train

DEMO_MODEL = "mobile-49XS"
DEMO_TRAIN_ARGS = [
    "--image-size", "128", "-b", "8", "--lr", "0.05", "--bn-momentum", "0.1",
    "--stochastic-depth-rate", "0", "--scale-range", "0.75", "1.33", "--workers", "0",
]  # fmt: skip


def save_validation_grid(checkpoint: Path, data: Path, path: Path, count: int = 8) -> None:
    """The first ``count`` validation images with the checkpoint's detections (score ≥ 0.5) and the ground truth."""
    dataset = CocoDetectionDataset(data / "val2017", data / "annotations" / "instances_val2017.json")
    images, boxes = [], []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        images.append(pil_to_tensor(image))
        boxes.append(target["boxes"].as_subclass(torch.Tensor))
    device = torch.device("cpu")
    model, label_map = load_detector(checkpoint, device, score_thresh=0.5)
    save_grid(model, label_map, images, boxes, path, device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--model", default=DEMO_MODEL,
                        help="the backbone (as the training CLI's --model; e.g. 49XS-custom: SpineNet's topology and "
                        "BN head)")  # fmt: skip
    parser.add_argument("--fused", default="auto", choices=("auto", "true", "false"),
                        help="fused ops (as the training CLI's --fused; on the CPU, their CPU backends)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="weights, data order and augmentation; the 10-epoch run is chaotic, so its AP depends on "
                        "it (README: the demo's AP over seeds)")  # fmt: skip
    args = parser.parse_args(argv)

    data = args.output_dir / "data"
    if not (data / "annotations" / "instances_val2017.json").is_file():
        make_synthetic_coco(data, num_train=args.num_train, num_val=args.num_val, image_size=128, seed=0)
    run = args.output_dir / "train"
    if (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").unlink()
    start = time.perf_counter()
    train(["--data-path", str(data), "--output-dir", str(run), "--epochs", str(args.epochs), "--model", args.model,
           "--fused", args.fused, "--seed", str(args.seed), *DEMO_TRAIN_ARGS])  # fmt: skip
    stats = evaluate_checkpoint(
        ["--checkpoint", str(run / "checkpoint.pth"), "--data-path", str(data), "--output-dir", str(run / "eval"),
         "--workers", "0"]
    )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    grid = run / "predictions.png"
    save_validation_grid(run / "checkpoint.pth", data, grid)
    print(f"\nSynthetic shapes val: COCO AP {stats['AP']:.3f}, AP50 {stats['AP50']:.3f} "
          f"(train + evaluate: {minutes:.1f} min)")  # fmt: skip
    run = run.resolve()  # paths that work from wherever the user stands
    print(f"Loss/AP plot: {run / 'metrics.png'}")
    print(f"Predictions (yellow) and ground truth (green) on 8 validation images: {grid.resolve()}")
    print(f"Checkpoint: {run / 'checkpoint.pth'} (python -m spinenet_fast.predict --checkpoint it IMAGE... --out DIR)")
    return stats


if __name__ == "__main__":
    main()
