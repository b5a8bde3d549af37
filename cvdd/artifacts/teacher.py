"""A teacher: ``<root>/<dataset>/teachers/<model>.{ckpt,json}`` plus a resumable work folder per recipe."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from cvdd.artifacts.io import load_record


@dataclass(frozen=True)
class TeacherArtifact:
    """``<root>/<dataset>/teachers/<model>.{ckpt,json}`` plus a resumable work folder per recipe."""

    root: Path
    dataset: str
    model: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.dataset / "teachers"

    @property
    def weights(self) -> Path:
        return self.folder / f"{self.model}.ckpt"

    @property
    def record(self) -> Path:
        return self.folder / f"{self.model}.json"

    def work_dir(self, recipe_hash: str) -> Path:
        return self.folder / ".work" / f"{self.model}-{recipe_hash}"

    def remove_work_dir(self, recipe_hash: str) -> None:
        shutil.rmtree(self.work_dir(recipe_hash), ignore_errors=True)
        with contextlib.suppress(OSError):  # only when no other model's run is in progress
            self.work_dir(recipe_hash).parent.rmdir()

    def exists(self) -> bool:
        return self.weights.is_file() and self.record.is_file()

    def train_command(self) -> str:
        return f"python train.py dataset={self.dataset} model={self.model}"

    def read_record(self) -> dict:
        """The teacher's record; a damaged one names the command that squeezes the teacher again (it retrains a
        teacher whose record is damaged)."""
        repair = f"squeeze the teacher again: {self.train_command()}"
        return load_record(self.record, ("classes", "num_classes"), repair, "a teacher's record")
