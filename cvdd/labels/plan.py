"""Replayable, batched augmentation on tensors.

Random draws come from an explicit ``torch.Generator`` so an augmentation can be reproduced
exactly from a seed — per synthetic unit in recover (independent of how units are grouped or
sharded across ranks), and per epoch plan in relabel/validate.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cvdd.runtime.errors import ConfigError
from cvdd.runtime.seeding import derive_seed


def sample_crop_box(
    generator: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)`` (the Inception-style sampler, 10 tries then centre)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_flip_theta(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine matrices (N, 2, 3) for ``F.affine_grid``: crop ``boxes`` (top, left, h, w), mirror where ``flips``."""
    boxes = boxes.to(torch.float64)
    top, left, h, w = boxes.unbind(-1)
    sx = w / width
    sy = h / height
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    sign = torch.where(flips, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    return theta


def resized_crop(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop-resize-flip a batch (N, C, H, W) with per-image affine ``theta`` (bilinear, one kernel call)."""
    grid = F.affine_grid(
        theta.to(images.dtype).to(images.device), [len(images), images.shape[1], *size], align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


MIX_MODES = ("cutmix", "mixup", "none")
PLAN_VERSION = 1  # raise when EpochPlan.epoch draws differently from the same arguments


@dataclass(frozen=True)
class BatchPlan:
    """One planned batch: which images, how each is cropped/flipped, and how the batch is mixed."""

    indices: torch.Tensor  # (B,) image indices into the distilled set
    boxes: torch.Tensor  # (B, 4) random-resized-crop boxes (top, left, h, w)
    flips: torch.Tensor  # (B,) bool
    permutation: torch.Tensor  # (B,) partner of each sample for CutMix/MixUp
    lam: float  # weight of the unmixed image (area share for CutMix)
    mix_box: tuple[int, int, int, int]  # CutMix region (top, left, h, w); zero-size when not CutMix


class EpochPlan:
    """The augmentation of every epoch, rebuilt from ``(seed, images, epochs, batch size)`` alone.

    Relabel and validate construct the same plan from the same arguments, so soft labels computed
    on a planned batch belong to exactly the images the student sees, with no DataLoader
    internals involved. :meth:`identity` fingerprints the arguments and :meth:`epoch_digest` each epoch's batches, so
    a mismatch is detected without rebuilding every epoch.
    """

    def __init__(
        self,
        seed: int,
        num_images: int,
        epochs: int,
        batch_size: int,
        image_size: tuple[int, int],
        mix: str = "cutmix",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        mix_alpha: float = 1.0,
    ):
        if mix not in MIX_MODES:
            raise ConfigError(f"mix={mix!r}; choose from {MIX_MODES}")
        if num_images < 1 or epochs < 1 or batch_size < 1:
            raise ValueError(
                f"EpochPlan needs positive sizes, got images={num_images} epochs={epochs} batch_size={batch_size}"
            )
        self.seed, self.num_images, self.epochs, self.batch_size = seed, num_images, epochs, batch_size
        self.image_size, self.mix, self.crop_scale, self.hflip, self.mix_alpha = (
            tuple(image_size),
            mix,
            tuple(crop_scale),
            hflip,
            mix_alpha,
        )
        self._last: tuple[int, list[BatchPlan]] | None = None

    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def epoch(self, epoch: int) -> list[BatchPlan]:
        """The batches of ``epoch`` (independent of every other epoch: resumable anywhere). The last epoch built is
        kept, so the student's steps and the label reader checking that epoch's digest share one build."""
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} outside the plan's {self.epochs} epochs")
        if self._last is None or self._last[0] != epoch:
            self._last = (epoch, self._build(epoch))
        return self._last[1]

    def _build(self, epoch: int) -> list[BatchPlan]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0x91A7))
        h, w = self.image_size
        order = torch.randperm(self.num_images, generator=gen)
        boxes = torch.tensor([sample_crop_box(gen, h, w, self.crop_scale) for _ in range(self.num_images)])
        flips = (torch.rand(self.num_images, generator=gen) < 0.5) & self.hflip
        plans = []
        for number, start in enumerate(range(0, self.num_images, self.batch_size)):
            idx = order[start : start + self.batch_size]
            perm = torch.randperm(len(idx), generator=gen)
            u = torch.rand(2, generator=gen).tolist()
            rng = np.random.default_rng([self.seed, epoch, number, 0xBE7A])
            lam = float(rng.beta(self.mix_alpha, self.mix_alpha)) if self.mix != "none" else 1.0
            mix_box = (0, 0, 0, 0)
            if self.mix == "cutmix":
                cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
                cy, cx = int(u[0] * h), int(u[1] * w)
                top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
                left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
                mix_box = (top, left, bottom - top, right - left)
                lam = 1.0 - (bottom - top) * (right - left) / (h * w)
            elif self.mix == "none":
                perm = torch.arange(len(idx))
            plans.append(BatchPlan(idx, boxes[idx], flips[idx], perm, lam, mix_box))
        return plans

    def identity(self) -> str:
        """SHA-256 of what the plan is built from (its arguments and :data:`PLAN_VERSION`): O(1), so every consumer
        checks it up front. What the code builds from them is checked per epoch by :meth:`epoch_digest`."""
        arguments = (
            PLAN_VERSION,
            self.seed,
            self.num_images,
            self.epochs,
            self.batch_size,
            self.image_size,
            self.mix,
            self.crop_scale,
            self.hflip,
            self.mix_alpha,
        )
        return hashlib.sha256(repr(arguments).encode()).hexdigest()

    @staticmethod
    def epoch_digest(batches: list[BatchPlan]) -> bytes:
        """SHA-256 (32 bytes) over one epoch's indices, boxes, flips, permutations, λ and mix boxes. Relabel stores
        it with the epoch's labels; a consumer compares it with the epoch it rebuilt before using those labels, so a
        plan that changed under the same arguments (other code, other library) is caught at the epoch it affects
        and no consumer rebuilds all epochs to check the plan."""
        digest = hashlib.sha256()
        for b in batches:
            for t in (b.indices, b.boxes, b.flips, b.permutation):
                digest.update(t.numpy().tobytes())
            digest.update(repr((round(b.lam, 12), b.mix_box)).encode())
        return digest.digest()


def apply_batch(images, plan: BatchPlan, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The planned view of a batch: crop/flip each image (one kernel call), then CutMix or MixUp it.

    ``images`` is anything indexed by a tensor of image indices (a tensor, or :class:`cvdd.labels.student_set.SetImages`
    that normalises on its device). With ``positions`` only those rows of the planned batch are made, from their
    own images and their mixing partners': a rank that forwards one slice of a batch reads only what the slice
    shows. Each row equals the same row of the whole batch, bit for bit (crops are per image).
    """
    count = len(plan.indices)
    rows = torch.arange(count) if positions is None else positions
    top, left, bh, bw = plan.mix_box
    mixing = bool(bh and bw) or plan.lam < 1.0
    partners = plan.permutation[rows]
    needed = torch.unique(torch.cat([rows, partners])) if mixing else rows
    batch = images[plan.indices[needed]]
    h, w = batch.shape[-2:]
    made = resized_crop(batch, crop_flip_theta(plan.boxes[needed], plan.flips[needed], h, w), (h, w))
    where = torch.empty(count, dtype=torch.long)
    where[needed] = torch.arange(len(needed))
    out, partner = made[where[rows]], made[where[partners]] if mixing else None
    if bh and bw:
        out[..., top : top + bh, left : left + bw] = partner[..., top : top + bh, left : left + bw]
    elif plan.lam < 1.0:
        out = plan.lam * out + (1 - plan.lam) * partner
    return out
