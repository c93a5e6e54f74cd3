"""Learning-rate and weight-decay schedules of the training harness, as functions of the step."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "two-stage")


def _cosine(t: float, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def schedule_at(step: int, total: int, warmup: int, kind: str) -> tuple[float, float]:
    """(learning-rate factor, weight-decay factor) for optimizer step ``step`` (0-based) of ``total``.

    cosine: linear warm-up, then cosine from 1 to 0.1; weight decay throughout.
    two-stage: the BitNet b1.58 recipe (Ma et al. 2024, "training tips"; BitNet b1.58 2B4T report, 2025): a high
    rate first, cosine from 1 to 0.5 over the first half; at mid-training the rate drops to 0.2 and decays by
    cosine to 0.01; weight decay only in the first half (ternary weights need it early, not while they settle)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if step < warmup:
        return (step + 1) / warmup, 1.0
    if kind == "cosine":
        return _cosine((step - warmup) / max(1, total - warmup), 1.0, 0.1), 1.0
    half = total // 2
    if step < half:
        return _cosine((step - warmup) / max(1, half - warmup), 1.0, 0.5), 1.0
    return _cosine((step - half) / max(1, total - half), 0.2, 0.01), 0.0
