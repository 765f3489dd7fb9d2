"""matplotlib PNG of training loss and validation AP per epoch, from the JSONL metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..eval.coco_eval import SEGM_PREFIX, STAT_NAMES

NOT_LOSSES = {"epoch", "images_per_s", "lr", "max_memory_mb", "seconds", *STAT_NAMES,
              *(SEGM_PREFIX + name for name in STAT_NAMES)}  # fmt: skip


def plot_metrics(log_file: str | Path, png_file: str | Path) -> None:
    """Left: the total and each of the detector's losses; right: box AP / AP50 / AP75 (and mask AP, AP50)."""
    rows = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    epochs = [row["epoch"] for row in rows]
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key in [k for k in rows[0] if k not in NOT_LOSSES]:  # the total and the detector's own losses
        loss_ax.plot(epochs, [row.get(key, float("nan")) for row in rows], marker="o", label=key)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    loss_ax.legend()
    evaluated = [row for row in rows if "AP" in row]
    for key in ("AP", "AP50", "AP75", f"{SEGM_PREFIX}AP", f"{SEGM_PREFIX}AP50"):
        if evaluated and key in evaluated[-1]:
            ap_ax.plot([row["epoch"] for row in evaluated], [row[key] for row in evaluated], marker="o", label=key)
    ap_ax.set(xlabel="epoch", ylabel="COCO AP (val)", title="validation AP", ylim=(0, 1))
    if evaluated:
        ap_ax.legend()
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    plt.close(fig)
