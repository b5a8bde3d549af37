"""Relabel: soft labels of the teachers on every planned, augmented batch (inference only)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import nn

from cvdd.augment import EpochPlan, apply_batch
from cvdd.bssl import soft_label_logits
from cvdd.precision import Numerics


class RelabelModule(L.LightningModule):
    """``predict_step`` on an epoch index computes that epoch's labels and hands them to ``on_epoch_done``.

    Teachers are frozen sub-modules, each in its own ``numerics``; BSSL runs them with batch statistics and
    restores their buffers, so they are bit-identical afterwards. Labels are fp32 until stored.
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        weights: Mapping[str, float],
        images: torch.Tensor,
        plan: EpochPlan,
        on_epoch_done: Callable[[int, torch.Tensor], None],
        bssl: bool = True,
        halves: bool = False,
        numerics: Mapping[str, Numerics] | None = None,
    ):
        super().__init__()
        self.teachers = nn.ModuleDict(dict(teachers))
        self.teachers.requires_grad_(False).eval()
        self.weights = dict(weights)
        self.register_buffer("images", images, persistent=False)
        self.plan, self.on_epoch_done = plan, on_epoch_done
        self.bssl, self.halves = bssl, halves
        self.numerics = dict(numerics or {})

    def predict_step(self, epoch: torch.Tensor, batch_idx: int) -> None:
        self.teachers.eval()
        logits = [
            soft_label_logits(
                self.teachers, self.weights, apply_batch(self.images, batch), self.bssl, self.halves, self.numerics
            )
            for batch in self.plan.epoch(int(epoch))
        ]
        self.on_epoch_done(int(epoch), torch.cat(logits).cpu())
