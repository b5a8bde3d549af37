"""Optimisers and learning-rate schedules shared by every stage (squeeze, recover, validate)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cvdd.runtime.errors import ConfigError

OPTIMIZERS = ("adam", "sgd")


def build_optimizer(
    params: Iterable, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> Optimizer:
    """``adam`` or ``sgd`` (with ``momentum``): the two optimisers of the released teacher recipes."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"squeeze.optimizer={name!r}; choose from {', '.join(OPTIMIZERS)}")


def cosine_factor(progress: float, stretch: float = 1.0) -> float:
    """``0.5 (1 + cos(π · progress / stretch))`` for progress in [0, 1].

    ``stretch`` is the η of the SRe2L/CV-DD post-training recipe: η = 2 stops halfway down the
    cosine, so the learning rate ends at half its peak instead of zero.
    """
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0) / stretch))


def cosine_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    stretch: float = 1.0,
    period_epochs: int | None = None,
    steps_per_epoch: int = 1,
) -> LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay (stretched by η) over the rest.

    With ``period_epochs`` the schedule is instead the released ImageNette teacher recipe's: updated once
    per epoch, ``0.5 (1 + cos(π · epoch / period))`` without clamping, so the learning rate reaches 0 at
    ``period`` epochs and rises again after it (PyTorch's ``CosineAnnealingLR`` stepped past ``T_max``).
    """
    if total_steps < 1:
        raise ValueError(f"cosine_schedule needs total_steps >= 1, got {total_steps}")
    if stretch <= 0:
        raise ConfigError(f"cosine_schedule stretch (η) must be > 0, got {stretch}")
    if period_epochs is not None:
        if period_epochs < 1 or steps_per_epoch < 1:
            raise ConfigError(f"squeeze.cosine_period_epochs={period_epochs} must be >= 1")
        return LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * (step // steps_per_epoch) / period_epochs))
        )
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine_factor((step - warmup_steps) / max(1, total_steps - warmup_steps), stretch)

    return LambdaLR(optimizer, factor)
