"""The seam every distillation method plugs into.

A method has one job: make the image set (:meth:`Method.make`) and say what decides it (:meth:`Method.recipe`).
Everything else is the distill job's, written once for all methods: fingerprint the recipe, reuse a finished
set of the same recipe or refuse one of another, write the images, PNGs, grid and (last, on rank 0) the
manifest. Adding a method is one module here and one ``conf/method/<name>.yaml``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from cvdd.artifacts import ArtifactCorruptError, TeacherArtifact, load_tensors
from cvdd.artifacts.distilled import DistilledArtifact, SetPiece
from cvdd.artifacts.identity import dataset_identity
from cvdd.artifacts.patches import PatchCache
from cvdd.committee.committee import Committee, load_committee
from cvdd.committee.priors import MeasureMember
from cvdd.data import dataset_spec
from cvdd.data.registry import ImageDataset
from cvdd.data.spec import DatasetSpec
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError
from cvdd.runtime.hardware import numerics_for


@dataclass
class ImageSet:
    """What a method makes: its images in ``pieces`` (normalised, each image with its class and its index within the
    class; a piece is loaded only when the writer gets to it), and ``metadata`` for the manifest as it is (e.g.
    per-unit losses, chosen source images)."""

    pieces: list[SetPiece]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, images: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor, metadata: dict[str, Any]
    ) -> ImageSet:
        """A set made in memory, one piece."""
        return cls([SetPiece.of(images, labels, ipc_index)], metadata)

    def __len__(self) -> int:
        return sum(len(p.labels) for p in self.pieces)


@dataclass
class DistillContext:
    """What a method works with: the run's config, the real data, the set's folder, the run's Trainer, and what the
    distill stage hands down from above this layer: how missing teachers are squeezed and priors measured."""

    cfg: DictConfig
    root: Path
    data: ImageDataset
    artifact: DistilledArtifact
    trainer: L.Trainer
    ensure_teachers: Callable[[DictConfig, list[str]], None]  # squeezes missing members (committee.train_missing)
    measure: MeasureMember | None = None  # runs a member's prior measurement (committee.priors=measured)
    _committees: dict[tuple, Committee] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> DatasetSpec:
        return dataset_spec(self.cfg.dataset)

    @property
    def ipc(self) -> int:
        return int(self.cfg.ipc)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        spec = self.spec
        return spec.channels, spec.image_size, spec.image_size

    def base_recipe(self) -> dict[str, Any]:
        """What decides every method's images: the data, the IPC and the seed."""
        return {"dataset": dataset_identity(self.cfg.dataset), "ipc": self.ipc, "seed": self.seed}

    def teacher_fingerprints(self, members: list[str]) -> dict[str, str]:
        return {m: TeacherArtifact(self.root, self.cfg.dataset.name, m).read_record()["fingerprint"] for m in members}

    def committee(
        self, members: list[str], priors: dict[str, float] | None = None, first_bn_multiplier: float = 10.0
    ) -> Committee:
        """``members`` (squeezed first when missing and ``committee.train_missing``), each in its recover
        numerics, on the run's device; loaded once per run (a method's recipe and its images use the same)."""
        key = (tuple(members), tuple(sorted((priors or {}).items())), first_bn_multiplier)
        if key not in self._committees:
            self._committees[key] = self._load_committee(members, priors, first_bn_multiplier)
        return self._committees[key]

    def _load_committee(
        self, members: list[str], priors: dict[str, float] | None, first_bn_multiplier: float
    ) -> Committee:
        self.ensure_teachers(self.cfg, members)
        committee = load_committee(
            self.root,
            self.cfg.dataset.name,
            members,
            self.data.classes,
            priors,
            first_bn_multiplier,
            numerics=lambda arch: numerics_for(self.cfg, arch, "recover"),
        )
        return committee.to(self.device)

    def patch_cache(self, committee: Committee) -> PatchCache:
        """Where ``committee``'s scored candidate crops are kept (shared by every set scored the same way)."""
        return PatchCache(
            self.root,
            self.cfg.dataset.name,
            {
                "dataset": dataset_identity(self.cfg.dataset),
                "teachers": self.teacher_fingerprints(list(committee.members)),
                "numerics": committee.numerics_tags,
            },
        )

    @cached_property
    def device(self) -> torch.device:
        """Where single-process methods compute: the Trainer's root device."""
        return self.trainer.strategy.root_device


def finished_piece(path: Path, recipe_hash: str, what: str) -> dict[str, Any] | None:
    """The metadata of a finished piece file (a recover unit, a class) of this recipe, memory-mapped so its images
    stay on disk; ``None`` when it is missing, of another recipe, or damaged (then ``what`` is redone)."""
    if not path.is_file():
        return None
    try:
        saved = load_tensors(path, f"the run redoes {what}", mapped=True)
    except ArtifactCorruptError:
        log.warning("%s is damaged; redoing %s", path, what)
        return None
    return saved if saved["recipe"] == recipe_hash else None


def require_real_images(ctx: DistillContext, needs: str) -> None:
    """Refuse an IPC that a class cannot fill with distinct real training images (``needs`` says who asks)."""
    counts = torch.bincount(ctx.data.view("train").targets, minlength=len(ctx.data.classes))
    short = [(ctx.data.classes[c], int(n)) for c, n in enumerate(counts.tolist()) if n < ctx.ipc]
    if short:
        raise ConfigError(
            f"{needs} needs ipc={ctx.ipc} distinct real images per class, but class {short[0][0]!r} has "
            f"{short[0][1]} ({len(short)} classes are short); lower ipc"
        )


class Method(ABC):
    """One way to make a distilled set. ``name`` is recorded in the manifest; relabel and evaluate report it."""

    def __init__(self, name: str, set_name: str, labels_by: str):
        # set_name and labels_by are read from the config (by the artifacts layer and the soft-label settings);
        # they arrive here only because the method's whole config node is instantiated.
        self.name = name

    def check(self, ctx: DistillContext) -> None:  # noqa: B027  (optional: most methods have nothing to check)
        """Refuse bad settings before any work starts."""

    def summary(self, made: ImageSet) -> list[tuple[str, str]]:
        """The key numbers of a finished set for the stage's summary (e.g. final losses); none by default."""
        return []

    @abstractmethod
    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        """Everything that decides the images (at least ``ctx.base_recipe()``); its fingerprint names the recipe."""

    @abstractmethod
    def make(self, ctx: DistillContext, recipe_hash: str) -> ImageSet:
        """The images of the set; every rank of a distributed run returns the same pieces (it writes a share)."""

    def finish(self, ctx: DistillContext) -> None:  # noqa: B027  (optional: most methods keep nothing aside)
        """Called on rank 0 once the set's manifest is written: drop what only served to make it."""
