"""Learning-rate schedules as multipliers of optim.lr, for `torch.optim.lr_scheduler.LambdaLR`."""

from __future__ import annotations

import math
from collections.abc import Callable

from rnnscale.train.config import ScheduleSection


def lr_multiplier(cfg: ScheduleSection, max_steps: int) -> Callable[[int], float]:
    """f(step) -> factor on the peak lr for the step that has `step` steps before it."""
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "wsd":
            decay_start = max(warmup, max_steps - round(cfg.decay_fraction * max_steps))
            progress = _progress(step, decay_start, max_steps)
            return 1.0 - (1.0 - floor) * progress
        progress = _progress(step, warmup, max_steps)
        if cfg.kind == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _progress(step: int, start: int, end: int) -> float:
    """0 at `start`, 1 at the last step `end - 1`, clamped."""
    span = max(end - 1 - start, 1)
    return min(max((step - start) / span, 0.0), 1.0)
