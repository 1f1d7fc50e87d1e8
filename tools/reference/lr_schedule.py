"""The learning-rate schedule of `semoe` (`OptimizerConfig::lr_at`), in plain float64 Python.

step = 0, 1, 2, ... of a run of total_steps steps:

    lr(step) = max_lr * (step + 1) / warmup                       if step < warmup
    otherwise, with span = max(total_steps - warmup, 1),
               decay_span = max(span * cooldown, 1), decay_start = span - decay_span,
               p = clamp((step - warmup - decay_start) / decay_span, 0, 1):
    cosine:    lr = min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * p))
    linear:    lr = min_lr + (max_lr - min_lr) * (1 - p)

cooldown = 1 decays over every step after warmup; less holds max_lr first and decays over the last
`cooldown` fraction (warmup-stable-decay). No torch needed.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear")


def lr_at(step: int, max_lr: float, min_lr: float, warmup: int, total_steps: int,
          schedule: str = "cosine", cooldown: float = 1.0) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}")
    if not 0.0 < cooldown <= 1.0:
        raise ValueError(f"cooldown must be in (0, 1], got {cooldown}")
    if step < warmup:
        return max_lr * (step + 1) / warmup
    span = float(max(total_steps - warmup, 1))
    decay_span = max(span * cooldown, 1.0)
    decay_start = span - decay_span
    prog = min(max(((step - warmup) - decay_start) / decay_span, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * prog))
    return min_lr + (max_lr - min_lr) * (1.0 - prog)
