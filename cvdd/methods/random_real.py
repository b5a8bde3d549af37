"""Random real images: ``ipc`` seeded real training images per class, the baseline every method must beat."""

from __future__ import annotations

from typing import Any

import torch

from cvdd.init import real_image_order
from cvdd.methods.base import DistillContext, ImageSet, Method, require_real_images


class RandomReal(Method):
    def check(self, ctx: DistillContext) -> None:
        require_real_images(ctx, "method=random_real")

    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        return {**ctx.base_recipe(), "method": self.name}

    def make(self, ctx: DistillContext, recipe_hash: str) -> ImageSet:
        split = ctx.data.view("train")
        images, labels, ipc_index, sources = [], [], [], []
        for c in range(len(ctx.data.classes)):
            for i, source in enumerate(real_image_order(split.targets, c, ctx.seed)[: ctx.ipc].tolist()):
                images.append(split[source][0])
                labels.append(c)
                ipc_index.append(i)
                sources.append(source)
        return ImageSet.of(torch.stack(images), torch.tensor(labels), torch.tensor(ipc_index), {"sources": sources})
