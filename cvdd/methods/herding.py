"""Herding (Welling, ICML 2009), the coreset baseline: per class, the real images whose teacher features track
the class mean most closely, chosen greedily.

Features are the input of the teacher's last linear layer (its penultimate representation, whatever the
architecture: :func:`~cvdd.training.metrics.penultimate_features`), of the plain (unaugmented) training images, in
the teacher's own numerics, on the run's device.
Step ``t`` picks the image that brings the mean of the ``t`` chosen features closest to the class mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from cvdd.methods.base import DistillContext, require_real_images
from cvdd.methods.per_class import PerClassMethod
from cvdd.training.metrics import penultimate_features


def herd(features: torch.Tensor, count: int) -> list[int]:
    """Indices of ``count`` rows of ``features`` chosen greedily so their running mean tracks the mean of all."""
    target = features.mean(dim=0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for t in range(1, count + 1):
        distance = ((total + features) / t - target).norm(dim=1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        total += features[pick]
        available[pick] = False
    return chosen


class Herding(PerClassMethod):
    def __init__(self, name: str, set_name: str, labels_by: str, model: str, batch_size: int = 512):
        super().__init__(name, set_name, labels_by)
        self.model, self.batch_size = model, int(batch_size)

    def check(self, ctx: DistillContext) -> None:
        require_real_images(ctx, "method=herding")

    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        teacher = ctx.committee([self.model])
        return {
            **ctx.base_recipe(),
            "method": self.name,
            "model": self.model,
            "teachers": ctx.teacher_fingerprints([self.model]),
            "numerics": teacher.numerics_tags,
        }

    def make_class(self, ctx: DistillContext, c: int) -> tuple[torch.Tensor, list[int]]:
        teacher = ctx.committee([self.model])
        net, numerics = teacher.members[self.model], teacher.numerics[self.model]
        split = ctx.data.view("train")
        idx = torch.nonzero(split.targets == c).flatten().tolist()
        loader = DataLoader(Subset(split, idx), batch_size=self.batch_size)
        features = penultimate_features(net, (x for x, _ in loader), numerics, ctx.device)
        sources = [idx[j] for j in herd(features, ctx.ipc)]
        return torch.stack([split[source][0] for source in sources]), sources

    def metadata(self, ctx: DistillContext, records: list[list[int]]) -> dict[str, Any]:
        """The training-set index of every chosen image, class-major, in the order herding picked them."""
        return {"sources": [source for sources in records for source in sources]}
