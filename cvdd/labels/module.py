"""Relabel: soft labels of the teachers on every planned, augmented batch (inference only)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from cvdd.committee.passes import MemberPasses
from cvdd.labels.bssl import soft_label_logits
from cvdd.labels.plan import BatchPlan, EpochPlan, apply_batch
from cvdd.labels.student_set import SetImages, as_set_images, read_on_every_rank
from cvdd.runtime.packing import pack_consecutive
from cvdd.runtime.precision import Numerics


def stack_batches(batches: Sequence[BatchPlan], max_images: int) -> list[list[BatchPlan]]:
    """Consecutive planned batches of one size, packed into forward passes of at most ``max_images`` images
    (a batch larger than that goes alone). BSSL still normalises each batch by its own statistics."""
    return pack_consecutive(batches, lambda b: len(b.indices), max_images, kind=lambda b: len(b.indices))


class RelabelModule(L.LightningModule):
    """``predict_step`` on an epoch index computes that epoch's labels and hands them to ``on_epoch_done``.

    Teachers are frozen sub-modules, each in its own ``numerics``; BSSL normalises by batch statistics without
    touching their buffers, so they are bit-identical afterwards. Consecutive batches of one size share a
    forward pass of up to ``stack_images`` images (each still normalised by its own statistics); on CPU the
    teachers' passes run ``member_workers`` at a time (:mod:`cvdd.committee.passes`). Labels are fp32 until stored.
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        weights: Mapping[str, float],
        *,
        images: torch.Tensor | SetImages | Callable[[int, int], SetImages],
        plan: EpochPlan,
        on_epoch_done: Callable[[int, torch.Tensor, bytes], None],
        bssl: bool = True,
        halves: bool = False,
        numerics: Mapping[str, Numerics] | None = None,
        stack_images: int = 1,
        member_workers: int = 1,
    ):
        super().__init__()
        self.teachers = nn.ModuleDict(dict(teachers))
        self.teachers.requires_grad_(False).eval()
        self.weights = dict(weights)
        self._images = images
        self.images = as_set_images(images) if isinstance(images, (torch.Tensor, SetImages)) else None
        self.plan, self.on_epoch_done = plan, on_epoch_done
        self.bssl, self.halves = bssl, halves
        self.numerics = dict(numerics or {})
        self.stack_images = stack_images
        self.member_workers = member_workers
        self.passes = MemberPasses(1, 1)
        self._started: float | None = None
        self._labelled = 0

    def progress_title(self, trainer) -> str:
        return "relabel epochs"

    def progress_fields(self) -> dict[str, str]:
        if not self._started or not self._labelled:
            return {}
        return {"images/s": f"{self._labelled / (time.perf_counter() - self._started):.0f}"}

    def setup(self, stage: str) -> None:
        if self.images is None:
            self.images = read_on_every_rank(self._images)

    def on_predict_start(self) -> None:
        self.images = self.images.to(self.device)  # uint8 stays on the host; each batch is normalised on the device
        self.passes = MemberPasses(self.member_workers, torch.get_num_threads())

    def teardown(self, stage: str) -> None:
        self.passes.close()

    def on_predict_batch_start(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning stops fit and validation on SIGTERM but lets predict run on: without this check `kill`,
        # `timeout` or a cluster's pre-emption notice would leave relabel labelling to its last epoch. The
        # finished epochs are on disk, so the next run resumes after them.
        if self.trainer.received_sigterm:
            raise SIGTERMException

    def predict_step(self, epoch: torch.Tensor, batch_idx: int) -> None:
        self._started = self._started or time.perf_counter()
        self.teachers.eval()
        logits = []
        batches = self.plan.epoch(int(epoch))
        for stack in stack_batches(batches, self.stack_images):
            images = torch.cat([apply_batch(self.images, batch) for batch in stack])
            sizes = [len(batch.indices) for batch in stack]
            logits.append(
                soft_label_logits(
                    self.teachers,
                    self.weights,
                    images,
                    self.bssl,
                    self.halves,
                    self.numerics,
                    batch_sizes=sizes,
                    passes=self.passes,
                )
            )
        self.on_epoch_done(int(epoch), torch.cat(logits).cpu(), EpochPlan.epoch_digest(batches))
        self._labelled += len(self.images)
