"""``python -m spinenet_fast.smoke``: build SpineNet-49, run forward + backward at 256 px, print shapes and size."""

import time

import torch

from spinenet_fast import SpineNet


def main() -> None:
    torch.manual_seed(0)
    model = SpineNet("49").train()
    images = torch.randn(2, 3, 256, 256)
    start = time.perf_counter()
    features = model(images)
    sum(feat.float().square().mean() for feat in features.values()).backward()
    elapsed = time.perf_counter() - start
    print(f"SpineNet-49: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    for name, feat in features.items():
        print(f"  {name}: {tuple(feat.shape)}")
    print(f"forward + backward of {tuple(images.shape)} in {elapsed:.2f} s on {images.device}")


if __name__ == "__main__":
    main()
