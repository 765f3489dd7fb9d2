"""Learning-rate schedule of architecture.md §7: linear warm-up, then ×0.1 at 94% and ×0.01 at 98% of training."""

from __future__ import annotations

REFERENCE_BATCH = 256
REFERENCE_LR = 0.28
REFERENCE_WARMUP_STEPS = 2000
WARMUP_START_FACTOR = 0.0067 / 0.28  # the official warm-up starts at LR 0.0067 for a peak of 0.28


def scaled_lr(global_batch: int) -> float:
    """Peak LR 0.28 at batch 256, scaled linearly with the batch."""
    return REFERENCE_LR * global_batch / REFERENCE_BATCH


def default_warmup_steps(global_batch: int, total_steps: int) -> int:
    """2000 steps at batch 256 (the same number of images at other batches), at most a tenth of training."""
    return min(round(REFERENCE_WARMUP_STEPS * REFERENCE_BATCH / global_batch), total_steps // 10)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * step / warmup_steps
    if step >= 0.98 * total_steps:
        return 0.01
    if step >= 0.94 * total_steps:
        return 0.1
    return 1.0
