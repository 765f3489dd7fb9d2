"""matplotlib PNG of training loss and validation AP per epoch, from the JSONL metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_metrics(log_file: str | Path, png_file: str | Path) -> None:
    rows = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    epochs = [row["epoch"] for row in rows]
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "classification", "bbox_regression"):
        loss_ax.plot(epochs, [row[key] for row in rows], marker="o", label=key)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    loss_ax.legend()
    evaluated = [row for row in rows if "AP" in row]
    for key in ("AP", "AP50", "AP75"):
        ap_ax.plot([row["epoch"] for row in evaluated], [row[key] for row in evaluated], marker="o", label=key)
    ap_ax.set(xlabel="epoch", ylabel="COCO box AP (val)", title="validation AP", ylim=(0, 1))
    ap_ax.legend()
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    plt.close(fig)
