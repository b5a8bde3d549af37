"""Where each stage reads and writes, and how: atomic writes, manifests, recipe fingerprints.

Every artifact lives under ``<paths.artifacts>/<dataset>/``. Files are written to a temporary
name in the same folder and renamed into place, so a killed run never leaves a half-written
artifact that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import torch


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(fileobj)`` into a temp file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; artifacts are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_json(path: Path | str, obj: Any) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(data))


def load_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: Path | str, obj: Any) -> Path:
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def fingerprint(obj: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able recipe (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ArtifactConflictError(RuntimeError):
    """An artifact exists but was made by a different recipe."""


class ArtifactNotWritableError(RuntimeError):
    """A stage's output folder cannot take new files (read-only, not a folder, disk full)."""


def ensure_writable(*folders: Path | str) -> None:
    """Create ``folders`` and write (then remove) a probe file in each, so a stage fails before its work, not
    after it. A probe rather than ``os.access``: that says yes to root on a read-only mount."""
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ArtifactNotWritableError(
                f"cannot write to {folder} ({err.strerror or err}); make it writable, or point paths.artifacts "
                f"(paths.logs for run folders) at a writable folder"
            ) from err


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


@dataclass(frozen=True)
class NamedArtifact:
    """``<root>/<dataset>/<stage>/<name>/`` with a ``manifest.json`` that is written last."""

    stage: ClassVar[str]
    root: Path
    dataset: str
    name: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.dataset / self.stage / self.name

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"
