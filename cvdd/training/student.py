"""Validate: a student trained from scratch on a distilled set, with the epoch plan's augmentation."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvdd.labels.plan import BatchPlan, EpochPlan, apply_batch
from cvdd.labels.student_set import SetImages, as_set_images, read_on_every_rank
from cvdd.runtime.distributed import ShardSampler, rank_and_world
from cvdd.runtime.errors import ConfigError
from cvdd.runtime.finite import LossWatch
from cvdd.runtime.precision import FP32, Numerics
from cvdd.training.bn_merge import BatchNormMerge
from cvdd.training.metrics import TopOneCounts
from cvdd.training.optim import cosine_schedule

DDP_SPLITS = ("slices", "batches")  # what ranks share under DDP: each planned batch's slices, or whole batches

# (epoch, batch index, planned batch, the whole augmented batch on demand) -> teacher logits of the whole batch
SoftLabels = Callable[[int, int, BatchPlan, Callable[[], torch.Tensor]], torch.Tensor]


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


def rank_slices(count: int, slice_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` slices of a planned batch of ``count`` images that ``rank`` forwards: the batch is cut
    into slices of ``slice_size`` (the last may be shorter) and rank ``r`` takes the ``r``-th of ``world`` contiguous,
    near-equal blocks of them (possibly none)."""
    starts = range(0, count, slice_size)
    slices = [(start, min(start + slice_size, count)) for start in starts]
    return slices[rank * len(slices) // world : (rank + 1) * len(slices) // world]


class StudentModule(L.LightningModule):
    """Each Lightning epoch is one plan epoch; batch ``b`` of it is the plan's ``b``-th augmented batch.

    With ``soft_labels`` the loss is the KL divergence to the teachers' logits for that exact batch;
    without, cross-entropy on the class labels mixed by the batch's CutMix/MixUp λ (hard-label baseline).
    A planned batch is forwarded as ``micro_batches`` slices of ``batch_size / micro_batches`` images
    (student BatchNorm sees each slice alone), each slice's loss divided by ``micro_batches``, and the
    optimiser steps once per planned batch: the released code's "gradient accumulation".

    **Under DDP the slices are shared, not repeated.** Every rank walks the same planned batches; rank ``r`` of
    ``W`` forwards the ``r``-th contiguous block of a batch's slices (:func:`rank_slices`) with its loss scaled by
    ``W``, so DDP's gradient average is the one-process gradient (with two ranks and two slices bit for bit:
    halving is exact in floating point). BatchNorm running statistics are merged after every step as one process
    would have left them (:class:`.bn_merge.BatchNormMerge`, to float rounding), and DDP's own buffer broadcast
    is off. ``W`` ranks run ``1/W`` of the forward passes when ``W`` divides ``micro_batches``; otherwise some
    ranks idle on each step (their loss is a zero that still joins the gradient average). With
    ``ddp_split="batches"`` rank ``r`` instead takes whole planned batches, ``s·W + r`` at step ``s`` (each in its
    ``micro_batches`` slices, BatchNorm per slice as released): one optimiser step sees ``W`` planned batches, the
    effective batch is ``W ×`` the planned one and an epoch has ``W ×`` fewer steps, with the learning rate as
    configured (not the one-process recipe: scale ``validate.lr`` as you see fit). The distilled images
    are never a buffer: each process holds them as :class:`cvdd.labels.student_set.SetImages` on the host (uint8 for
    PNG sets) and makes on its device only the rows its slices show (and their CutMix partners).

    ``images`` is a tensor, :class:`~cvdd.labels.student_set.SetImages` or a reader ``(rank, world) -> SetImages`` that
    :meth:`setup` calls once the process group exists (every rank reads in parallel, each checking a share).
    The student trains in ``numerics`` (:mod:`cvdd.runtime.precision`; the loss is fp32) and is tested in fp32 on
    ``test_set``, each rank on its shard (:class:`~cvdd.runtime.distributed.ShardSampler`; the counts are summed, so the
    accuracy is exact). Every test evaluation is kept in ``evaluations`` (epochs trained so far, top-1 %), so the
    best can be reported beside the final one.
    """

    broadcast_buffers = False  # read by HydraDDPStrategy: the BatchNorm merge keeps ranks' buffers in step

    def __init__(
        self,
        net: nn.Module,
        *,
        images: torch.Tensor | SetImages | Callable[[int, int], SetImages],
        targets: torch.Tensor,
        plan: EpochPlan,
        soft_labels: SoftLabels | None,
        temperature: float = 20.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        stretch: float = 1.0,
        micro_batches: int = 1,
        decay_all: bool = False,
        numerics: Numerics = FP32,
        test_set: Dataset | None = None,
        loader: dict | None = None,
        ddp_split: str = "slices",
    ):
        super().__init__()
        if micro_batches < 1 or plan.batch_size % micro_batches:
            raise ConfigError(
                f"validate.micro_batches={micro_batches} must be >= 1 and divide the planned batch "
                f"(relabel.batch_size={plan.batch_size})"
            )
        if ddp_split not in DDP_SPLITS:
            raise ConfigError(f"validate.ddp_split={ddp_split!r}; choose from {', '.join(DDP_SPLITS)}")
        self.save_hyperparameters(
            ignore=["net", "images", "targets", "plan", "soft_labels", "numerics", "test_set", "loader"]
        )
        self.numerics = numerics
        self.net = numerics.prepare(net)
        self.bn_merge = BatchNormMerge(self.net)
        self._images = images
        self.images = as_set_images(images) if isinstance(images, (torch.Tensor, SetImages)) else None
        self.targets = targets
        self.plan, self.soft_labels = plan, soft_labels
        self.loss_watch = LossWatch()
        self.test_set, self.loader = test_set, dict(loader or {})
        self.val_top1 = TopOneCounts()
        self.evaluations: list[tuple[int, float]] = []
        self.forwards = 0  # slices this rank forwarded in the current step

    def setup(self, stage: str) -> None:
        if self.images is None:
            self.images = read_on_every_rank(self._images)

    def on_fit_start(self) -> None:
        self.images = self.images.to(self.device)  # the host copy stays; batches are normalised on this device
        self.targets = self.targets.to(self.device)

    def progress_title(self, trainer) -> str:
        return f"student epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def progress_fields(self) -> dict[str, str]:
        """The last test top-1 and when it was measured (Lightning shows the loss)."""
        if not self.evaluations:
            return {}
        epoch, top1 = self.evaluations[-1]
        return {"test top-1": f"{top1:.2f}% (epoch {epoch})"}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.bn_merge.snapshot()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.bn_merge.merge(self.forwards)

    def train_dataloader(self) -> DataLoader:
        """Step indices: every planned batch of an epoch (``slices``: every rank takes part in each), or one step per
        ``W`` planned batches (``batches``)."""
        batches = self.plan.batches_per_epoch()
        _, world = rank_and_world()
        steps = batches if self.hparams.ddp_split == "slices" else -(-batches // world)
        return DataLoader(range(steps), batch_size=None)

    def _share(self, step: int) -> tuple[int | None, list[tuple[int, int]], int]:
        """This rank's planned batch at ``step``, its slices of it and the factor its loss is counted with."""
        rank, world = rank_and_world()
        size = self.plan.batch_size // self.hparams.micro_batches
        if self.hparams.ddp_split == "slices":
            count = len(self.plan.epoch(self.current_epoch)[step].indices)
            return step, rank_slices(count, size, rank, world), world
        b = step * world + rank
        if b >= self.plan.batches_per_epoch():
            return None, [], 1
        return b, rank_slices(len(self.plan.epoch(self.current_epoch)[b].indices), size, 0, 1), 1

    def training_step(self, step: torch.Tensor, batch_idx: int) -> torch.Tensor:
        epoch = self.current_epoch
        b, slices, factor = self._share(int(step))
        micro = self.hparams.micro_batches
        reduce = "sum" if self.hparams.ddp_split == "slices" else "mean"
        self.forwards = len(slices)
        if not slices:  # nothing for this rank at this step: a zero that joins DDP's gradient average
            loss = sum(p.sum() for p in self.net.parameters()) * 0.0
            self.report_loss(loss, reduce, batch_idx)
            return loss
        plan = self.plan.epoch(epoch)[b]
        first, last = slices[0][0], slices[-1][1]
        whole: list[torch.Tensor] = []

        def whole_batch() -> torch.Tensor:  # online teachers label the whole planned batch (BSSL statistics)
            if not whole:
                whole.append(apply_batch(self.images, plan))
            return whole[0]

        if self.soft_labels is not None:
            teacher = self.soft_labels(epoch, b, plan, whole_batch).to(self.device)
        else:
            y = self.targets[plan.indices.to(self.device)]
            y_mix = y[plan.permutation.to(y.device)]
        x = whole[0][first:last] if whole else apply_batch(self.images, plan, torch.arange(first, last))
        loss = x.new_zeros(())
        for start, stop in slices:
            part, local = slice(start, stop), slice(start - first, stop - first)
            logits = self.numerics.forward(self.net, x[local])
            if self.soft_labels is not None:
                term = kd_loss(logits, teacher[part], self.hparams.temperature)
            else:
                term = plan.lam * F.cross_entropy(logits, y[part]) + (1 - plan.lam) * F.cross_entropy(
                    logits, y_mix[part]
                )
            loss = loss + term / micro
        # slices: W ranks' losses add up to the planned batch's and DDP averages gradients, so each rank's counts W
        # times; batches: each rank's loss is a whole batch's, and DDP's average is the mean over the W batches
        self.report_loss(loss, reduce, batch_idx)
        return loss * factor if factor > 1 else loss

    def report_loss(self, loss: torch.Tensor, reduce: str, batch_idx: int) -> None:
        """Log the step's loss over all ranks and watch it; in the epoch's last step, every rank stops together if
        a step's loss was not finite (before any result is written)."""
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True, reduce_fx=reduce)
        self.loss_watch.see_epoch_step(
            self,
            loss,
            batch_idx,
            "the student's training loss",
            "validate.lr, validate.temperature (> 0) and the labels (relabel.temperature)",
        )

    def test_loader(self) -> DataLoader:
        """The test set, this rank's shard (every sample once over all ranks), in batches of ``loader["batch_size"]``
        (``hardware.eval_batch_size``, default 256)."""
        if self.test_set is None:
            raise RuntimeError("StudentModule was built without a test_set")
        rank, world = rank_and_world()
        workers = int(self.loader.get("num_workers", 0))
        return DataLoader(
            self.test_set,
            batch_size=int(self.loader.get("batch_size", 256)),
            sampler=ShardSampler(len(self.test_set), rank, world),
            num_workers=workers,
            pin_memory=bool(self.loader.get("pin_memory", False)),
            persistent_workers=workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self.test_loader() if self.test_set is not None else []  # no test set: no evaluations

    def validation_step(self, batch, _: int) -> None:
        images, labels = batch
        self.val_top1.update(self.net(images), labels)  # every reported accuracy is an fp32 pass

    def on_validation_epoch_end(self) -> None:
        top1 = self.val_top1.compute()  # sums every rank's counts (the shards cover the set once): exact
        self.val_top1.reset()
        self.evaluations.append((int(self.current_epoch) + 1, top1))
        self.log("val/top1", top1)

    def configure_optimizers(self):
        groups = decay_groups(self.net, self.hparams.weight_decay, self.hparams.decay_all)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = cosine_schedule(optimizer, total_steps=total, stretch=self.hparams.stretch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
