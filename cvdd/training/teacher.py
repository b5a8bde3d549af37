"""Squeeze: train one classifier on real data (a committee member / teacher)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from cvdd.runtime.finite import LossWatch
from cvdd.runtime.precision import FP32, Numerics
from cvdd.runtime.seeding import derive_seed
from cvdd.training.metrics import topk_accuracy

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class TeacherModule(L.LightningModule):
    """Cross-entropy training of ``net`` with a per-step cosine schedule and micro top-1/top-5; ``net`` runs in
    ``numerics`` (bf16 autocast and/or channels-last where that pays, :mod:`cvdd.runtime.precision`).

    ``optimizer`` and ``scheduler`` are partials from the config: the module supplies the
    parameters and the total number of optimiser steps, which only the Trainer knows.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        numerics: Numerics = FP32,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "numerics"])
        self.numerics = numerics
        self.net = numerics.prepare(net)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_top1 = topk_accuracy(num_classes, 1)
        self.val_top1 = topk_accuracy(num_classes, 1)
        self.val_top5 = topk_accuracy(num_classes, 5)
        self.loss_watch = LossWatch()
        self.title = "squeeze"  # what the progress bar calls this run (the squeeze job names the model and its place)

    def progress_title(self, trainer) -> str:
        return f"{self.title} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.numerics.forward(self.net, x)

    def on_train_epoch_start(self) -> None:
        # Dropout draws from the global RNG: reseed it from (seed, epoch, rank), so a run resumed at an epoch
        # boundary replays the same epochs (the data's own randomness is keyed per sample, see the datamodule).
        torch.manual_seed(derive_seed(self.hparams.seed, self.current_epoch, self.global_rank))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_top1(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.loss_watch.see_epoch_step(self, loss, batch_idx, "the teacher's training loss", "squeeze.lr")
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/top1", self.val_top1, prog_bar=True)
        self.log("val/top5", self.val_top5)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, int(self.trainer.max_epochs)))
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
