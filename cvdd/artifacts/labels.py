"""Soft labels of a set: ``labels/<set>[_float][_top<k>]/epoch_<e>.pt`` plus ``recipe.json`` and ``manifest.json``.

Labels of the full-precision images (``_float``) and top-k storage (``_top<k>``) get their own folders beside
the default ones (PNG images, dense logits).

An epoch's file holds dense logits (fp16/fp32) or top-k sparsified ones. Top-k keeps, per image, the ``k``
largest logits with their class indices plus one number for the rest: the mean of the other logits. Unpacking
fills every dropped class with that mean, so the reconstructed distribution keeps the teacher's ranking of the top
``k`` and a flat tail of the right height. This is what makes labels for 1,000-class sets affordable (top-10 of
ImageNet-1K: 42 bytes per image instead of 2,000 for fp16). The student's temperature is applied later, to the
unpacked logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cvdd.artifacts.io import ArtifactConflictError, NamedArtifact, load_tensors
from cvdd.runtime.errors import ConfigError

DTYPES = {"float16": torch.float16, "float32": torch.float32}
PLAN_KEY = "plan_sha256"  # the epoch plan's digest (32 uint8) stored beside an epoch's labels


def index_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer type that holds every class index."""
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 32768 else torch.int32


def check_storage(dtype: str, topk: int | None) -> None:
    """Refuse a storage setting before any label is computed."""
    if dtype not in DTYPES:
        raise ConfigError(f"relabel.dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    if topk is not None and topk < 1:
        raise ConfigError(f"relabel.topk={topk}; use a positive number of classes or null for dense labels")


def pack_logits(logits: torch.Tensor, dtype: str = "float16", topk: int | None = None) -> dict[str, torch.Tensor]:
    """One epoch's ``(N, classes)`` logits → the tensors written to its file."""
    check_storage(dtype, topk)
    store = DTYPES[dtype]
    num_classes = logits.shape[1]
    if topk is None or topk >= num_classes:
        return {"logits": logits.to(store)}
    values, indices = logits.float().topk(topk, dim=1)
    rest = (logits.float().sum(1) - values.sum(1)) / (num_classes - topk)
    return {
        "values": values.to(store),
        "indices": indices.to(index_dtype(num_classes)),
        "rest": rest.to(store),
        "num_classes": torch.tensor(num_classes),
    }


def unpack_logits(payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stored tensors → dense float32 ``(N, classes)`` logits."""
    if "logits" in payload:
        return payload["logits"].float()
    values, indices = payload["values"].float(), payload["indices"].long()
    dense = payload["rest"].float()[:, None].expand(len(values), int(payload["num_classes"])).clone()
    return dense.scatter_(1, indices, values)


def payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    """Bytes of label data (without the file container's overhead)."""
    return sum(t.numel() * t.element_size() for k, t in payload.items() if k not in ("num_classes", PLAN_KEY))


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
