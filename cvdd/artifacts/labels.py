"""Soft labels of a set: ``labels/<set>[_float][_top<k>]/epoch_<e>.pt`` plus ``recipe.json`` and ``manifest.json``.

Labels of the full-precision images (``_float``) and top-k storage (``_top<k>``) get their own folders beside
the default ones (PNG images, dense logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cvdd.artifacts.io import ArtifactConflictError, NamedArtifact, load_tensors
from cvdd.artifacts.label_store import PLAN_KEY, unpack_logits


@dataclass(frozen=True)
class LabelArtifact(NamedArtifact):
    stage = "labels"

    @property
    def stamp(self) -> Path:
        """The recipe of labels in progress (a resumed run must match it)."""
        return self.folder / "recipe.json"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:04d}.pt"

    def read_epoch(
        self, epoch: int, recorded: dict[str, dict], rebuild: str, plan_digest: bytes | None = None
    ) -> torch.Tensor:
        """Dense float32 logits of one epoch, whatever the stored format, checked against its recorded digest and,
        given ``plan_digest`` (:meth:`cvdd.labels.plan.EpochPlan.epoch_digest` of the epoch the reader rebuilt), against
        the plan the labels were made on."""
        path = self.epoch_path(epoch)
        payload = load_tensors(path, rebuild, recorded.get(path.name))
        if plan_digest is not None:
            stored = payload.get(PLAN_KEY)
            if stored is None or bytes(stored.tolist()) != plan_digest:
                raise ArtifactConflictError(
                    f"{path} was labelled on another augmentation plan than this run rebuilds for epoch {epoch} (the "
                    f"plan's code or a library that draws it changed); make them again with overwrite=true: {rebuild}"
                )
        return unpack_logits(payload)


def label_artifact(root: Path, dataset: str, set_name: str, image_format: str, topk: int | None) -> LabelArtifact:
    """The labels of set ``set_name`` read as ``image_format`` images, stored dense or as top-``topk``."""
    name = set_name + ("_float" if image_format == "float" else "")
    return LabelArtifact(root, dataset, f"{name}_top{topk}" if topk else name)
