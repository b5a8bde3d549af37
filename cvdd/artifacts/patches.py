"""The patch cache: ``patches/<identity>.pt``, candidate crops of real images scored by a committee.

Scoring is the costly part of patch initialisation (and of RDED), and it depends only on the identity below,
so every set that shares it (another IPC, difficulty band or stitching factor) reuses the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvdd.artifacts.io import fingerprint


@dataclass(frozen=True)
class PatchCache:
    """Scored candidates of one dataset under ``<root>/<dataset>/patches``; ``identity`` is what every file of
    this cache shares (dataset identity, teachers' fingerprints, their numerics)."""

    root: Path
    dataset: str
    identity: dict[str, Any]

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.dataset / "patches"

    def path(self, candidates: dict[str, Any]) -> Path:
        """The file of one candidate draw (seed, number, crop scale) under this cache's identity."""
        return self.folder / f"{fingerprint({**self.identity, **candidates})}.pt"
