"""Pieces every stage shares: the Trainer with its callbacks, loggers and thread count; the run's overrides."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from cvdd.runtime.hardware import configure_threads, requested_workers
from cvdd.runtime.quiet import quiet_libraries


def task_overrides() -> list[str] | None:
    """The overrides this job was started with (the command line, or a sweep job's own), ``None`` outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def instantiate_named(group: Mapping | None) -> list:
    """Instantiate a dict of named ``_target_`` entries (callbacks, loggers); ``None`` entries are skipped."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build_trainer(cfg: DictConfig, extra_callbacks: list[Callback] | None = None) -> tuple[L.Trainer, list[Logger]]:
    """The Trainer from ``cfg.trainer`` with ``cfg.callbacks`` and ``cfg.logger`` attached; every process of it
    runs ``hardware.threads`` CPU threads (``null``: its share of the cores). Lightning's noise is dropped unless
    ``verbose=true`` (:mod:`cvdd.runtime.quiet`)."""
    quiet_libraries(bool(cfg.get("verbose", False)))
    loggers: list[Logger] = instantiate_named(cfg.get("logger"))
    callbacks: list[Callback] = instantiate_named(cfg.get("callbacks")) + list(extra_callbacks or [])
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.callbacks.append(configure_threads(cfg.hardware.get("threads"), trainer.num_devices))
    requested_workers(cfg.hardware.get("member_threads"))  # a bad value stops the job before any work
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, loggers


def log_final(
    loggers: list[Logger], metrics: dict[str, float], table: tuple[str, list[str], list[list]] | None = None
) -> None:
    """A stage's final numbers to every logger (CSV: one more row; W&B: history and summary) and, where the
    logger takes tables (W&B), ``table`` as ``(key, columns, rows)``."""
    for logger in loggers:
        logger.log_metrics(metrics)
        if table is not None and hasattr(logger, "log_table"):
            key, columns, rows = table
            logger.log_table(key=key, columns=columns, data=rows)
        logger.save()


@contextmanager
def stage_trainer(
    cfg: DictConfig, extra_callbacks: list[Callback] | None = None
) -> Iterator[tuple[L.Trainer, list[Logger]]]:
    """A stage's Trainer and loggers (:func:`build_trainer`) for the ``with`` block of its work; its W&B runs are
    closed however the block ends (:func:`finish_loggers`)."""
    trainer, loggers = build_trainer(cfg, extra_callbacks)
    try:
        yield trainer, loggers
    finally:
        finish_loggers(loggers)


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs so the next job of a multirun sweep starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()
