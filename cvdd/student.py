"""Validate: a student trained from scratch on a distilled set, with the epoch plan's augmentation."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from cvdd.augment import BatchPlan, EpochPlan, apply_batch
from cvdd.metrics import topk_accuracy
from cvdd.optim import cosine_schedule

SoftLabels = Callable[[int, int, BatchPlan, torch.Tensor], torch.Tensor]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(z_t / τ) ‖ softmax(z_s / τ))`` averaged over the batch (the SRe2L/CV-DD objective)."""
    return F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


class StudentModule(L.LightningModule):
    """Each Lightning epoch is one plan epoch; batch ``b`` of it is the plan's ``b``-th augmented batch.

    With ``soft_labels`` the loss is the KL divergence to the teachers' logits for that exact batch;
    without, cross-entropy on the class labels mixed by the batch's CutMix/MixUp λ (hard-label baseline).
    """

    def __init__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        plan: EpochPlan,
        num_classes: int,
        soft_labels: SoftLabels | None,
        temperature: float = 20.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        stretch: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "images", "targets", "plan", "soft_labels"])
        self.net = net
        self.register_buffer("images", images, persistent=False)
        self.register_buffer("targets", targets, persistent=False)
        self.plan, self.soft_labels = plan, soft_labels
        self.val_top1 = topk_accuracy(num_classes, 1)
        self._epoch: tuple[int, list[BatchPlan]] | None = None

    def planned(self, epoch: int, batch_index: int) -> BatchPlan:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.plan.epoch(epoch))
        return self._epoch[1][batch_index]

    def training_step(self, batch_index: torch.Tensor, _: int) -> torch.Tensor:
        epoch, b = self.current_epoch, int(batch_index)
        plan = self.planned(epoch, b)
        x = apply_batch(self.images, plan)
        logits = self.net(x)
        if self.soft_labels is not None:
            loss = kd_loss(logits, self.soft_labels(epoch, b, plan, x).to(logits.device), self.hparams.temperature)
        else:
            y = self.targets[plan.indices.to(self.targets.device)]
            loss = plan.lam * F.cross_entropy(logits, y) + (1 - plan.lam) * F.cross_entropy(logits, y[plan.permutation])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _: int) -> None:
        images, labels = batch
        self.val_top1(self.net(images), labels)
        self.log("val/top1", self.val_top1, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = cosine_schedule(optimizer, total_steps=total, stretch=self.hparams.stretch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
