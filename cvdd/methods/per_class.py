"""Methods that make their set class by class (RDED, herding, random real images), spread over ranks.

Rank ``r`` of ``W`` makes the classes ``r, r + W, …`` inside a Lightning fit (so ``hardware=ddp`` gives it its
processes and process group, as recover has) and writes each finished class to ``units/class_<c>.pt`` atomically:
a killed run resumes without redoing finished classes, and the distill job's writer streams the class files into
the set one at a time.
"""

from __future__ import annotations

from abc import abstractmethod
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from cvdd.artifacts import load_tensors, save_tensors
from cvdd.artifacts.distilled import SetPiece
from cvdd.methods.base import DistillContext, ImageSet, Method, finished_piece
from cvdd.runtime import log
from cvdd.runtime.distributed import HydraDDPStrategy

REDO_CLASS = "run the same command again: it remakes damaged classes"


def class_key(c: int) -> str:
    return f"class_{c:04d}"


def class_images(path: Path) -> torch.Tensor:
    return load_tensors(path, REDO_CLASS)["images"]


class PerClassMethod(Method):
    """A method whose classes are made independently: it says what every class shares (:meth:`prepare`), how one
    class is made (:meth:`make_class`) and what its records add to the manifest (:meth:`metadata`)."""

    def prepare(self, ctx: DistillContext) -> None:
        """What every class shares (a teacher, a scored patch bank), built on every rank at once before any class."""

    @abstractmethod
    def make_class(self, ctx: DistillContext, c: int) -> tuple[torch.Tensor, Any]:
        """Class ``c``'s ``ipc`` images, normalised, in IPC order, and its record for the manifest (JSON-able)."""

    @abstractmethod
    def metadata(self, ctx: DistillContext, records: list[Any]) -> dict[str, Any]:
        """The manifest's fields from every class's record, in class order."""

    def make(self, ctx: DistillContext, recipe_hash: str) -> ImageSet:
        classes = range(len(ctx.data.classes))
        done = set() if ctx.cfg.get("overwrite", False) else finished_classes(ctx, classes, recipe_hash)
        todo = [c for c in classes if c not in done]
        if done:
            log.info("resuming %s: %d of %d classes already made", ctx.artifact.folder, len(done), len(classes))
        if todo:
            if isinstance(ctx.trainer.strategy, HydraDDPStrategy):
                ctx.trainer.strategy.wrap_model = False  # nothing to train: ranks only share the process group
            ctx.trainer.fit(ClassWorkModule(self, ctx, todo, recipe_hash))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        pieces, records = [], []
        for c in classes:
            path = ctx.artifact.unit_path(class_key(c))
            saved = load_tensors(path, REDO_CLASS, mapped=True)  # the record; the images are read when written
            count = len(saved["images"])
            pieces.append(SetPiece(torch.full((count,), c), torch.arange(count), partial(class_images, path)))
            records.append(saved["record"])
        return ImageSet(pieces, self.metadata(ctx, records))

    def finish(self, ctx: DistillContext) -> None:
        """The class files are a copy of ``images.pt``: once it is written they go."""
        for c in range(len(ctx.data.classes)):
            ctx.artifact.unit_path(class_key(c)).unlink(missing_ok=True)


def finished_classes(ctx: DistillContext, classes: range, recipe_hash: str) -> set[int]:
    """Classes already on disk for this recipe (metadata only is read); a damaged file is made again."""
    return {c for c in classes if finished_piece(ctx.artifact.unit_path(class_key(c)), recipe_hash, f"class {c}")}


class ClassWorkModule(L.LightningModule):
    """One step per class of this rank (``todo[rank::W]``); every rank walks the same number of steps (a rank with
    fewer classes idles), so ranks that gather in :meth:`PerClassMethod.prepare` stay in step. Nothing trains."""

    def __init__(self, method: PerClassMethod, ctx: DistillContext, todo: list[int], recipe_hash: str):
        super().__init__()
        self.automatic_optimization = False
        self.method, self.ctx, self.todo, self.recipe_hash = method, ctx, todo, recipe_hash
        self.mine: list[int] = []
        self.steps = 0

    def on_fit_start(self) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        self.mine = self.todo[rank::world]
        self.steps = -(-len(self.todo) // world)
        self.method.prepare(self.ctx)

    def progress_title(self, trainer: L.Trainer) -> str:
        return f"{self.method.name}: {len(self.todo)} classes"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps), batch_size=None)

    def configure_optimizers(self):
        return None

    def training_step(self, step: int, batch_idx: int) -> None:
        if step >= len(self.mine):
            return None
        c = self.mine[step]
        images, record = self.method.make_class(self.ctx, c)
        save_tensors(
            self.ctx.artifact.unit_path(class_key(c)),
            {"recipe": self.recipe_hash, "images": images.float().cpu(), "record": record},
        )
        return None
