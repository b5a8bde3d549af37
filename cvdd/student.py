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
from cvdd.precision import FP32, Numerics

SoftLabels = Callable[[int, int, BatchPlan, torch.Tensor], torch.Tensor]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(z_t / τ) ‖ softmax(z_s / τ))`` averaged over the batch (the SRe2L/CV-DD objective)."""
    return F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def decay_groups(net: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices and kernels only (``ndim > 1``), none on
    BatchNorm/LayerNorm parameters and biases, as the released SRe2L/CV-DD post-training does;
    ``decay_all`` decays every parameter."""
    params = [p for p in net.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


class StudentModule(L.LightningModule):
    """Each Lightning epoch is one plan epoch; batch ``b`` of it is the plan's ``b``-th augmented batch.

    With ``soft_labels`` the loss is the KL divergence to the teachers' logits for that exact batch;
    without, cross-entropy on the class labels mixed by the batch's CutMix/MixUp λ (hard-label baseline).
    A planned batch is forwarded as ``micro_batches`` slices of ``batch_size / micro_batches`` images
    (student BatchNorm sees each slice alone), each slice's loss divided by ``micro_batches``, and the
    optimiser steps once per planned batch: the released code's "gradient accumulation".
    The student trains in ``numerics`` (:mod:`cvdd.precision`; the loss is fp32) and is tested in fp32.
    Every test evaluation is kept in ``evaluations`` (epochs trained so far, top-1 %), so the best can be
    reported beside the final one.
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
        micro_batches: int = 1,
        decay_all: bool = False,
        numerics: Numerics = FP32,
    ):
        super().__init__()
        if micro_batches < 1 or plan.batch_size % micro_batches:
            raise ValueError(
                f"validate.micro_batches={micro_batches} must be >= 1 and divide the planned batch "
                f"(relabel.batch_size={plan.batch_size})"
            )
        self.save_hyperparameters(ignore=["net", "images", "targets", "plan", "soft_labels", "numerics"])
        self.numerics = numerics
        self.net = numerics.prepare(net)
        self.register_buffer("images", images, persistent=False)
        self.register_buffer("targets", targets, persistent=False)
        self.plan, self.soft_labels = plan, soft_labels
        self.val_top1 = topk_accuracy(num_classes, 1)
        self.evaluations: list[tuple[int, float]] = []
        self._epoch: tuple[int, list[BatchPlan]] | None = None

    def progress_title(self, trainer) -> str:
        return f"student epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def progress_fields(self) -> dict[str, str]:
        """The last test top-1 and when it was measured (Lightning shows the loss)."""
        if not self.evaluations:
            return {}
        epoch, top1 = self.evaluations[-1]
        return {"test top-1": f"{top1:.2f}% (epoch {epoch})"}

    def planned(self, epoch: int, batch_index: int) -> BatchPlan:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.plan.epoch(epoch))
        return self._epoch[1][batch_index]

    def training_step(self, batch_index: torch.Tensor, _: int) -> torch.Tensor:
        epoch, b = self.current_epoch, int(batch_index)
        plan = self.planned(epoch, b)
        x = apply_batch(self.images, plan)
        if self.soft_labels is not None:
            teacher = self.soft_labels(epoch, b, plan, x).to(x.device)
        else:
            y = self.targets[plan.indices.to(self.targets.device)]
            y_mix = y[plan.permutation.to(y.device)]
        micro = self.hparams.micro_batches
        size = self.plan.batch_size // micro
        loss = x.new_zeros(())
        for start in range(0, len(x), size):
            part = slice(start, start + size)
            logits = self.numerics.forward(self.net, x[part])
            if self.soft_labels is not None:
                term = kd_loss(logits, teacher[part], self.hparams.temperature)
            else:
                term = plan.lam * F.cross_entropy(logits, y[part]) + (1 - plan.lam) * F.cross_entropy(
                    logits, y_mix[part]
                )
            loss = loss + term / micro
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _: int) -> None:
        images, labels = batch
        self.val_top1.update(self.net(images), labels)  # every reported accuracy is an fp32 pass

    def on_validation_epoch_end(self) -> None:
        top1 = 100.0 * float(self.val_top1.compute())
        self.val_top1.reset()
        self.evaluations.append((int(self.current_epoch) + 1, top1))
        self.log("val/top1", top1)

    def configure_optimizers(self):
        groups = decay_groups(self.net, self.hparams.weight_decay, self.hparams.decay_all)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = cosine_schedule(optimizer, total_steps=total, stretch=self.hparams.stretch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
