"""Mid-wave snapshots of recover's groups, so a killed run resumes a long wave where it stopped.

A unit file is written only when its wave ends, and a wave can run for hours (Fashion-MNIST at IPC 50 with the
released 4,000 iterations, ImageNet-1K on a few GPUs). Every ``every`` iterations each group's whole state — its
images, Adam's moments and step, its units' augmentation streams and last losses — goes to one file per group
(named by its first unit; groups never depend on waves or ranks, :func:`.recover.plan_groups`). That state is all
the remaining iterations read, so a wave resumed from it ends on the very images of an uninterrupted one (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cvdd.artifacts.io import ArtifactCorruptError, load_tensors, save_tensors
from cvdd.runtime import log

if TYPE_CHECKING:
    from cvdd.methods.committee_voting.recover import GroupState, Unit


def on_cpu(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict`` with its tensors on the CPU (a snapshot loads on any device)."""
    state = {
        i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in optimizer_state["state"].items()
    }
    return {**optimizer_state, "state": state}


class GroupSnapshots:
    """Snapshots of recover groups in ``folder`` for one recipe (``recipe``: its fingerprint), every ``every``
    iterations (0: never; ``method.recover.snapshot_every``, checked by :class:`.options.RecoverOptions`)."""

    def __init__(self, folder: Path, every: int, recipe: str):
        self.folder, self.every, self.recipe = Path(folder), int(every), recipe

    def due(self, done: int, iterations: int) -> bool:
        """Whether to save after ``done`` of a wave's ``iterations`` (never after the last: the units follow)."""
        return self.every > 0 and done % self.every == 0 and done < iterations

    def path(self, units: Sequence[Unit]) -> Path:
        return self.folder / f"group_{units[0].key}.pt"

    def save(self, group: GroupState, done: int) -> None:
        """``group``'s state after ``done`` iterations, written atomically (a kill keeps the previous snapshot)."""
        save_tensors(self.path(group.units), {"recipe": self.recipe, "iterations_done": done, **group.state()})

    def load(self, units: Sequence[Unit]) -> dict[str, Any] | None:
        """The snapshot of the group of ``units`` made by this recipe, or ``None`` (none, another recipe or group,
        or damaged: the group then starts from its first iteration)."""
        path = self.path(units)
        if not path.is_file():
            return None
        try:
            saved = load_tensors(path, "the group starts again from its first iteration")
        except ArtifactCorruptError:
            log.warning("recover snapshot %s is damaged; its group starts again", path)
            return None
        if saved.get("recipe") != self.recipe or saved.get("units") != [u.key for u in units]:
            return None
        return saved

    def drop(self, units: Sequence[Unit]) -> None:
        """Forget a finished group's snapshot (its unit files now hold the result)."""
        self.path(units).unlink(missing_ok=True)
