"""Random real images: ``ipc`` seeded real training images per class, the baseline every method must beat."""

from __future__ import annotations

from typing import Any

import torch

from cvdd.methods.base import DistillContext, require_real_images
from cvdd.methods.init_images import real_image_order
from cvdd.methods.per_class import PerClassMethod


class RandomReal(PerClassMethod):
    def check(self, ctx: DistillContext) -> None:
        require_real_images(ctx, "method=random_real")

    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        return {**ctx.base_recipe(), "method": self.name}

    def make_class(self, ctx: DistillContext, c: int) -> tuple[torch.Tensor, list[int]]:
        split = ctx.data.view("train")
        sources = real_image_order(split.targets, c, ctx.seed)[: ctx.ipc].tolist()
        return torch.stack([split[source][0] for source in sources]), sources

    def metadata(self, ctx: DistillContext, records: list[list[int]]) -> dict[str, Any]:
        """The training-set index of every image, class-major."""
        return {"sources": [source for sources in records for source in sources]}
