"""RDED (Sun et al., CVPR 2024): realistic and diverse images without optimisation.

Candidate crops of real images are scored by the committee's cross-entropy (the teachers' confidence that a crop
shows its class); the ``ipc × factor²`` most realistic crops of each class (lowest cross-entropy) are kept and
every ``factor × factor`` of them are stitched into one image. The scored candidates are the same bank CV-DD's
patch initialisation draws from (:class:`~cvdd.methods.init_images.Initializer`), cached under ``patches/`` and
shared with it.

Differences from the released RDED code: every candidate comes from its own source image (RDED scores several
crops of one image and keeps its best), the committee's mean cross-entropy scores a crop (RDED: one observer
model), and the labels are the soft-label protocol's (relabel), not RDED's region-level labels.
"""

from __future__ import annotations

from typing import Any

import torch

from cvdd.methods.base import DistillContext
from cvdd.methods.init_images import Initializer, PatchSettings
from cvdd.methods.per_class import PerClassMethod
from cvdd.runtime.errors import ConfigError


class RDED(PerClassMethod):
    def __init__(
        self, name: str, set_name: str, labels_by: str, factor: int, candidates_per_image: int, scale: list[float]
    ):
        super().__init__(name, set_name, labels_by)
        self.factor, self.candidates_per_image, self.scale = int(factor), int(candidates_per_image), tuple(scale)

    def settings(self, ctx: DistillContext) -> PatchSettings:
        if self.factor < 1 or self.candidates_per_image < 1:
            raise ConfigError(
                f"method.factor={self.factor} and method.candidates_per_image={self.candidates_per_image} must be "
                f"at least 1"
            )
        if ctx.spec.image_size % self.factor:
            raise ConfigError(
                f"method.factor={self.factor} must divide the image size {ctx.spec.image_size} (tiles of equal size)"
            )
        candidates = self.candidates_per_image * ctx.ipc * self.factor**2
        return PatchSettings(ctx.ipc, "easy", self.factor, candidates, self.scale)

    def check(self, ctx: DistillContext) -> None:
        self.settings(ctx)

    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        committee = ctx.committee(list(ctx.cfg.committee.members))
        return {
            **ctx.base_recipe(),
            "method": self.name,
            "patches": vars(self.settings(ctx)),
            "teachers": ctx.teacher_fingerprints(list(ctx.cfg.committee.members)),
            "numerics": committee.numerics_tags,
        }

    def prepare(self, ctx: DistillContext) -> None:
        """The scored candidate bank, each rank scoring a share of the classes (or read from the patch cache)."""
        committee = ctx.committee(list(ctx.cfg.committee.members))
        self.initializer = Initializer(
            "patches",
            ctx.seed,
            ctx.image_shape,
            real=ctx.data.view("train"),
            patches=self.settings(ctx),
            committee=committee,
            cache=ctx.patch_cache(committee),
        )
        self.initializer.prepare()

    def make_class(self, ctx: DistillContext, c: int) -> tuple[torch.Tensor, list[list[int]]]:
        images = torch.stack([self.initializer.patch_image(c, i) for i in range(ctx.ipc)])
        return images, [self.initializer.patch_candidates(c, i).tolist() for i in range(ctx.ipc)]

    def metadata(self, ctx: DistillContext, records: list[list[list[int]]]) -> dict[str, Any]:
        """How many candidates each class scored and, per class and image, the ones stitched into it."""
        chosen = {str(c): record for c, record in enumerate(records)}
        return {"candidates": self.settings(ctx).candidates, "chosen_candidates": chosen}
