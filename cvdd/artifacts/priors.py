"""Measured committee priors: ``priors/<committee>_ipc<n>_s<seed>.json`` (measured by
:mod:`cvdd.committee.priors`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PriorsArtifact:
    """One committee's measured priors at one IPC and seed, with what they were measured from."""

    root: Path
    dataset: str
    name: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.dataset / "priors"

    @property
    def record(self) -> Path:
        return self.folder / f"{self.name}.json"
