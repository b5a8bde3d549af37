"""A distilled set: ``<artifacts>/<dataset>/distilled/<set>/``, whichever method made it::

units/<ipc>_<block>.pt          committee voting: one finished unit (written atomically as it completes)
images.pt                       all images (normalised, full precision), labels, IPC indices
<class idx>_<class name>/<ipc idx>.png   the same images as PNG (ImageFolder layout)
grid.png                        one row per class
manifest.json                   written last: its presence means the set is complete
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
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
    sha256_hex,
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


PNG_FILE = re.compile(r"^(\d+)_[^/]+/(\d+)\.png$")


def png_files(recorded: dict[str, dict]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A set's PNGs in class-major, IPC-index order, with their classes and IPC indices, from the file list its
    manifest records: nothing but the manifest is read."""
    entries = sorted((int(m[1]), int(m[2]), name) for name in recorded if (m := PNG_FILE.match(name)))
    names = [name for _, _, name in entries]
    labels = torch.tensor([label for label, _, _ in entries], dtype=torch.long)
    ipc_index = torch.tensor([i for _, i, _ in entries], dtype=torch.long)
    return names, labels, ipc_index


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes → uint8 (C, H, W)."""
    with Image.open(io.BytesIO(data)) as image:
        array = torch.from_numpy(np.array(image))
    return array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)


def read_pngs(
    folder: Path,
    names: list[str],
    recorded: dict[str, dict],
    rebuild: str,
    check: Callable[[int], bool] = lambda _: True,
) -> torch.Tensor:
    """The PNGs ``names`` (relative to ``folder``) as one uint8 (N, C, H, W) tensor, filled in place: the peak is
    the pixels plus one file. File ``i`` is checked against its ``recorded`` digest when ``check(i)``: ranks that
    each read a whole set check a share of it each, so a job hashes every file once."""
    images: torch.Tensor | None = None
    for i, name in enumerate(names):
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise ArtifactCorruptError(f"{path} is missing from the distilled set; rebuild it: {rebuild}") from err
        digest = recorded.get(name)
        if check(i) and digest is not None and sha256_hex(data) != digest["sha256"]:
            raise ArtifactCorruptError(f"{path} differs from the PNG the manifest records; rebuild it: {rebuild}")
        pixels = decode_png(data)
        if images is None:
            images = torch.empty((len(names), *pixels.shape), dtype=torch.uint8)
        if pixels.shape != images.shape[1:]:
            raise ArtifactCorruptError(
                f"{path} is {tuple(pixels.shape)} (C, H, W), the set's first image {tuple(images.shape[1:])}; "
                f"rebuild it: {rebuild}"
            )
        images[i] = pixels
    if images is None:
        raise ArtifactCorruptError(f"the manifest of {folder} lists no PNG; rebuild the set: {rebuild}")
    return images


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


def rebuild_command(artifact: DistilledArtifact) -> str:
    return (
        f"python distill.py dataset={artifact.dataset} set={artifact.name} ... (with the settings that made it; "
        f"it repairs a set from its finished units)"
    )


def read_manifest(artifact: DistilledArtifact) -> dict:
    """A finished set's manifest, after checking every recorded file is there at its size (no file is read)."""
    rebuild = rebuild_command(artifact)
    if not artifact.complete():
        raise FileNotFoundError(
            f"distilled set {artifact.folder} is missing or incomplete (no manifest.json); produce it with: {rebuild}"
        )
    manifest = load_json(artifact.manifest)
    check_files(artifact.folder, manifest.get("files", {}), rebuild)
    return manifest


def read_images(artifact: DistilledArtifact, manifest: dict, image_format: str, check: Callable[[int], bool]):
    """The set's images as stored: ``png`` → the exported files as uint8 (N, C, H, W) (``images.pt`` is never
    opened); ``float`` → ``images.pt``'s normalised float32 images, digest-checked when ``check(0)``. Both in the
    class-major order of :func:`png_files`."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"distilled.format={image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    recorded, rebuild = manifest.get("files", {}), rebuild_command(artifact)
    names, labels, _ = png_files(recorded)
    if image_format == "png":
        return read_pngs(artifact.folder, names, recorded, rebuild, check)
    digest = recorded.get(artifact.tensors.name) if check(0) else None
    data = load_tensors(artifact.tensors, rebuild, digest)
    if not torch.equal(data["labels"], labels):
        raise ArtifactCorruptError(
            f"{artifact.tensors} holds other classes than the PNGs its manifest lists; rebuild it: {rebuild}"
        )
    return data["images"]
