"""Learning-rate schedules shared by every stage (squeeze, recover, validate)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_factor(progress: float, stretch: float = 1.0) -> float:
    """``0.5 (1 + cos(π · progress / stretch))`` for progress in [0, 1].

    ``stretch`` is the η of the SRe2L/CV-DD post-training recipe: η = 2 stops halfway down the
    cosine, so the learning rate ends at half its peak instead of zero.
    """
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0) / stretch))


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, stretch: float = 1.0) -> LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay (stretched by η) over the rest."""
    if total_steps < 1:
        raise ValueError(f"cosine_schedule needs total_steps >= 1, got {total_steps}")
    if stretch <= 0:
        raise ValueError(f"cosine_schedule stretch (η) must be > 0, got {stretch}")
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine_factor((step - warmup_steps) / max(1, total_steps - warmup_steps), stretch)

    return LambdaLR(optimizer, factor)
