"""One pass over a composed config, before any work: every number that cannot work is refused, naming its key.

Each stage calls :func:`check_settings` first, so ``ipc=ten``, ``validate.epochs=0`` or ``relabel.temperature=0``
stop the run with the key and what it needs, instead of an ``invalid literal for int()`` deep in the code, a
``ZeroDivisionError`` after an epoch, or NaN labels written as finished work. Keys a stage's config lacks are
skipped; the checks that need more than one value live with the code that reads them (``RecoverOptions.check``,
the committee's ``k``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvdd.runtime.errors import ConfigError

SEED_LIMIT = 2**32  # numpy's and Lightning's seeding take 32-bit seeds

Rule = tuple[str, Callable[[Any], bool], str]


def whole(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v < high


def positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def scale_range(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(positive(x) for x in v) and v[0] <= v[1] <= 1


RULES: list[Rule] = [
    ("seed", whole(0, SEED_LIMIT), f"a whole number from 0 to {SEED_LIMIT - 1}"),
    ("ipc", whole(1), "a whole number of images per class, at least 1"),
    ("squeeze.epochs", whole(0), "a whole number of epochs, 0 or more"),
    ("squeeze.batch_size", whole(1), "a whole number, at least 1"),
    ("squeeze.lr", positive, "a positive learning rate"),
    ("squeeze.eval_every", whole(1), "a whole number of epochs, at least 1"),
    ("committee.temperature", positive, "a positive temperature (the voting weights are softmax(prior / T))"),
    ("method.recover.iterations", whole(1), "a whole number of iterations, at least 1"),
    ("method.recover.lr", positive, "a positive learning rate"),
    ("method.recover.class_block", whole(1), "a whole number of classes per unit, at least 1"),
    ("method.recover.crop_scale", scale_range, "two scales 0 < low <= high <= 1"),
    ("relabel.epochs", whole(1), "a whole number of epochs, at least 1"),
    ("relabel.batch_size", whole(1), "a whole number, at least 1"),
    ("relabel.temperature", positive, "a positive temperature (the teachers' weights are softmax(prior / T))"),
    ("relabel.crop_scale", scale_range, "two scales 0 < low <= high <= 1"),
    ("relabel.stack_images", whole(1), "a whole number of images per forward pass, at least 1"),
    ("validate.epochs", whole(1), "a whole number of epochs, at least 1"),
    ("validate.eval_every", whole(1), "a whole number of epochs between evaluations, at least 1"),
    ("validate.lr", positive, "a positive learning rate"),
    ("validate.temperature", positive, "a positive temperature of the KL loss"),
    ("validate.weight_decay", non_negative, "0 or more"),
    ("validate.stretch", positive, "a positive stretch of the cosine schedule"),
    ("validate.micro_batches", whole(1), "a whole number of slices per batch, at least 1"),
]
ABSENT = object()


def check_settings(cfg: DictConfig) -> None:
    """Refuse the first setting of ``cfg`` no run can use, naming the key, its value and what it needs."""
    for key, valid, needs in RULES:
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is ABSENT:
            continue
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not valid(value):
            raise ConfigError(f"{key}={value!r}: needs {needs}")
    members = OmegaConf.select(cfg, "committee.members", default=ABSENT)
    if members is not ABSENT and not members:
        raise ConfigError("committee.members=[]: a committee needs at least one member (conf/committee/<name>.yaml)")
