"""A distilled set: ``<artifacts>/<dataset>/distilled/<set>/``, whichever method made it::

units/<ipc>_<block>.pt          committee voting: one finished unit (written atomically as it completes)
images.pt                       all images (normalised, full precision), labels, IPC indices
<class idx>_<class name>/<ipc idx>.png   the same images as PNG (ImageFolder layout)
grid.png                        one row per class
manifest.json                   written last: its presence means the set is complete
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cvdd.artifacts.io import (
    ArtifactCorruptError,
    NamedArtifact,
    check_files,
    file_digest,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)
from cvdd.grid import distilled_grid, save_image_atomic


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


IMAGE_FORMATS = ("png", "float")


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (N, C, H, W) → uint8 pixels (rounded to the nearest level, not truncated)."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return ((images.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def from_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) → normalised float32, the inverse of :func:`to_pixels` up to rounding."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.float() / 255 - mean) / std


def png_path(folder: Path, label: int, ipc_index: int, class_names: list[str]) -> Path:
    """``<class idx>_<class name>/<ipc idx>.png``: the ImageFolder layout of an exported set."""
    return folder / f"{label:04d}_{safe_name(class_names[label])}" / f"{ipc_index:04d}.png"


@dataclass(frozen=True)
class DistilledArtifact(NamedArtifact):
    stage = "distilled"

    @property
    def tensors(self) -> Path:
        return self.folder / "images.pt"

    @property
    def grid(self) -> Path:
        return self.folder / "grid.png"

    def unit_path(self, key: str) -> Path:
        return self.folder / "units" / f"{key}.pt"

    def complete(self) -> bool:
        return self.manifest.is_file() and self.tensors.is_file()


def write_pngs(
    folder: Path, pixels: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor, class_names: list[str]
) -> None:
    """Images as ``<class idx>_<class name>/<ipc idx>.png`` (grey or RGB), each written atomically."""
    for img, label, i in zip(pixels, labels.tolist(), ipc_index.tolist(), strict=True):
        path = png_path(folder, label, i, class_names)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = img.permute(1, 2, 0).numpy()
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")
        tmp.replace(path)


def read_pngs(
    folder: Path,
    labels: torch.Tensor,
    ipc_index: torch.Tensor,
    class_names: list[str],
    recorded: dict[str, dict],
    rebuild: str,
) -> torch.Tensor:
    """The exported PNGs of a set as uint8 (N, C, H, W), in the order of ``labels``/``ipc_index``; each file is
    checked against its ``recorded`` digest as it is read (one read per file)."""
    images = []
    for label, i in zip(labels.tolist(), ipc_index.tolist(), strict=True):
        path = png_path(folder, label, i, class_names)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise ArtifactCorruptError(f"{path} is missing from the distilled set; rebuild it: {rebuild}") from err
        digest = recorded.get(path.relative_to(folder).as_posix())
        if digest is not None and hashlib.sha256(data).hexdigest() != digest["sha256"]:
            raise ArtifactCorruptError(f"{path} differs from the PNG the manifest records; rebuild it: {rebuild}")
        with Image.open(io.BytesIO(data)) as image:
            array = torch.from_numpy(np.array(image))
        images.append(array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1))
    return torch.stack(images)


def set_files(artifact: DistilledArtifact) -> dict[str, dict]:
    """Digests of every file a finished set is read from (``images.pt``, the PNGs, the grid)."""
    paths = [artifact.tensors, artifact.grid, *sorted(artifact.folder.glob("[0-9]*_*/*.png"))]
    return {path.relative_to(artifact.folder).as_posix(): file_digest(path) for path in paths}


def save_set(artifact: DistilledArtifact, images: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor) -> None:
    save_tensors(artifact.tensors, {"images": images.float().cpu(), "labels": labels, "ipc_index": ipc_index})


def write_set(
    artifact: DistilledArtifact,
    images: torch.Tensor,
    labels: torch.Tensor,
    ipc_index: torch.Tensor,
    class_names: list[str],
    mean,
    std,
    seed: int,
    fields: dict,
) -> dict:
    """A finished set's files, class-major: ``images.pt``, the PNGs, ``grid.png`` and last ``manifest.json`` (the
    recorded ``fields`` plus every file's digest). Returns the manifest."""
    order = torch.argsort(labels * (int(ipc_index.max()) + 1) + ipc_index)  # class-major, then IPC index
    images, labels, ipc_index = images[order], labels[order], ipc_index[order]
    save_set(artifact, images, labels, ipc_index)
    pixels = to_pixels(images, mean, std)
    write_pngs(artifact.folder, pixels, labels, ipc_index, class_names)
    save_image_atomic(distilled_grid(pixels, labels, ipc_index, class_names, seed), artifact.grid)
    manifest = {"files": set_files(artifact), "name": artifact.name, "images": len(images), **fields}
    save_json(artifact.manifest, manifest)
    return manifest


def set_method(manifest: dict) -> str:
    """The method that made a set; sets written before methods existed were all committee voting (``cvdd``)."""
    return str(manifest.get("method", "cvdd"))


@dataclass
class DistilledSet:
    images: torch.Tensor  # normalised (N, C, H, W)
    labels: torch.Tensor
    ipc_index: torch.Tensor
    manifest: dict


def read_distilled(artifact: DistilledArtifact, image_format: str, mean, std) -> DistilledSet:
    """The set's images as a student will see them: ``png`` = the exported uint8 files, normalised with
    ``mean``/``std``; ``float`` = ``images.pt`` exactly as recover left it."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"distilled.format={image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    rebuild = (
        f"python distill.py dataset={artifact.dataset} set={artifact.name} ... (with the settings that made it; "
        f"it repairs a set from its finished units)"
    )
    if not artifact.complete():
        raise FileNotFoundError(
            f"distilled set {artifact.folder} is missing or incomplete (no manifest.json); produce it with: {rebuild}"
        )
    manifest = load_json(artifact.manifest)
    recorded = manifest.get("files", {})
    check_files(artifact.folder, recorded, rebuild)  # every file there, at its size, before anything is read
    data = load_tensors(artifact.tensors, rebuild, recorded.get(artifact.tensors.name))
    images = data["images"]
    if image_format == "png":
        pixels = read_pngs(
            artifact.folder, data["labels"], data["ipc_index"], manifest["class_names"], recorded, rebuild
        )
        images = from_pixels(pixels, mean, std)
    return DistilledSet(images, data["labels"], data["ipc_index"], manifest)
