"""A distilled set: ``<artifacts>/<dataset>/distilled/<set>/``, whichever method made it::

units/<ipc>_<block>.pt          committee voting: one finished unit (written atomically as it completes; dropped
                                after assembly with ``method.recover.keep_units=false``)
images.pt                       all images (normalised, full precision), labels, IPC indices; assembled in place,
                                one unit at a time
<class idx>_<class name>/<ipc idx>.png   the same images as PNG (ImageFolder layout)
grid.png                        one row per class
manifest.json                   written last: its presence means the set is complete
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cvdd.artifacts.grid import MAX_GRID_COLUMNS, distilled_grid, grid_rows, grid_tile, save_image_atomic
from cvdd.artifacts.io import (
    ArtifactCorruptError,
    NamedArtifact,
    atomic_write,
    check_files,
    file_digest,
    load_record,
    load_tensors,
    save_json,
    sha256_hex,
    streamed_tensors,
)
from cvdd.runtime.distributed import gather_objects, raise_together, rank_and_world
from cvdd.runtime.errors import ConfigError, MissingInputError


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


IMAGE_FORMATS = ("png", "float")


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (N, C, H, W) → uint8 pixels (rounded to the nearest level, not truncated)."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return ((images.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """Float pixels in [0, 1], (N, C, H, W) → normalised with the dataset's ``mean`` and ``std`` (float32)."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def from_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) → normalised float32, the inverse of :func:`to_pixels` up to rounding."""
    return normalise(pixels.float() / 255, mean, std)


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

    @property
    def static_labels(self) -> Path:
        """Soft labels that came with an imported set (one row of logits per image, the set's order), if any."""
        return self.folder / "static_soft_labels.pt"

    def unit_path(self, key: str) -> Path:
        return self.folder / "units" / f"{key}.pt"

    def complete(self) -> bool:
        return self.manifest.is_file() and self.tensors.is_file()


def write_pngs(
    folder: Path, pixels: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor, class_names: list[str]
) -> dict[str, dict]:
    """Images as ``<class idx>_<class name>/<ipc idx>.png`` (grey or RGB), each written atomically; returns each
    file's digest (relative name → bytes, sha256), taken from the bytes written rather than read back."""
    digests = {}
    for img, label, i in zip(pixels, labels.tolist(), ipc_index.tolist(), strict=True):
        path = png_path(folder, label, i, class_names)
        array = img.permute(1, 2, 0).numpy()
        encoded = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(encoded, format="PNG")
        data = encoded.getvalue()
        atomic_write(path, lambda fh, data=data: fh.write(data))
        digests[path.relative_to(folder).as_posix()] = {"bytes": len(data), "sha256": sha256_hex(data)}
    return digests


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


@dataclass(frozen=True)
class SetPiece:
    """Some images of a set, with their classes and IPC indices; ``load()`` gives them normalised (n, C, H, W) only
    when the writer gets to them, so a set larger than memory is written one piece at a time (a method's units)."""

    labels: torch.Tensor
    ipc_index: torch.Tensor
    load: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, images: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor) -> SetPiece:
        """A piece already in memory."""
        return cls(labels, ipc_index, lambda: images)


def class_major_positions(labels: torch.Tensor, ipc_index: torch.Tensor) -> torch.Tensor:
    """Where each image goes in the set's files: sorted by class, then IPC index."""
    order = torch.argsort(labels * (int(ipc_index.max()) + 1) + ipc_index)
    positions = torch.empty_like(order)
    positions[order] = torch.arange(len(order))
    return positions


def stream_tensors_file(
    artifact: DistilledArtifact,
    pieces: list[SetPiece],
    labels: torch.Tensor,
    ipc_index: torch.Tensor,
    grid_cells: set[tuple[int, int]],
    mean,
    std,
) -> dict[tuple[int, int], torch.Tensor]:
    """``images.pt`` (fp32 images, labels, IPC indices, class-major) filled piece by piece in place: one piece in
    memory at a time. Returns the grid tiles of ``grid_cells`` ((class, IPC index) pairs) on the way: at most the
    grid's 100 × 10 tiles of at most 112 px, whatever the set's size. ``labels`` and ``ipc_index`` are the pieces'
    own, concatenated."""
    positions = class_major_positions(labels, ipc_index)
    shape = pieces[0].load().shape[1:]  # the first piece is read twice: the file's shape comes before its data
    shapes = {
        "images": ((len(labels), *shape), torch.float32),
        "labels": ((len(labels),), labels.dtype),
        "ipc_index": ((len(labels),), ipc_index.dtype),
    }
    cells: dict[tuple[int, int], torch.Tensor] = {}
    with streamed_tensors(artifact.tensors, shapes) as out:
        out.mapped["labels"][positions] = labels
        out.mapped["ipc_index"][positions] = ipc_index
        start = 0
        for piece in pieces:
            images = piece.load().float().cpu()
            out.write_rows("images", positions[start : start + len(images)], images)
            for j, cell in enumerate(zip(piece.labels.tolist(), piece.ipc_index.tolist(), strict=True)):
                if cell in grid_cells:
                    cells[cell] = grid_tile(to_pixels(images[j : j + 1], mean, std)[0])
            start += len(images)
            del images  # before the next piece is read: one piece in memory at a time
    return cells


def write_set(
    artifact: DistilledArtifact,
    pieces: list[SetPiece],
    *,
    class_names: list[str],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    fields: dict,
) -> dict:
    """A finished set's files: the PNGs, ``images.pt``, ``grid.png`` and last ``manifest.json`` (the recorded
    ``fields`` plus every file's digest). Returns the manifest on rank 0 and ``{}`` on the others.

    Every rank of a distributed run calls it with the same pieces: rank ``r`` encodes the PNGs of pieces ``r, r + W,
    …``; rank 0 then streams every piece into ``images.pt`` (bounded memory), draws the grid and writes the
    manifest. Only the files written here are listed, each hashed once, as it is written (``images.pt`` in
    chunks)."""
    rank, world = rank_and_world()
    error, digests = None, {}
    try:
        for piece in pieces[rank::world]:
            pixels = to_pixels(piece.load(), mean, std)
            digests.update(write_pngs(artifact.folder, pixels, piece.labels, piece.ipc_index, class_names))
    except Exception as err:  # a full disk on one rank must not leave the others waiting at the gather
        error = err
    raise_together(error, "writing the distilled set's PNGs")
    digests = {name: d for part in gather_objects(digests) for name, d in part.items()}
    if rank != 0:
        return {}
    labels = torch.cat([p.labels for p in pieces])
    ipc_index = torch.cat([p.ipc_index for p in pieces])
    rows, columns = grid_rows(len(class_names), seed), min(int(ipc_index.max()) + 1, MAX_GRID_COLUMNS)
    wanted = {(c, i) for c in rows for i in range(columns)}
    cells = stream_tensors_file(artifact, pieces, labels, ipc_index, wanted, mean, std)
    tiles = sorted(cells)
    save_image_atomic(
        distilled_grid(
            torch.stack([cells[t] for t in tiles]),
            torch.tensor([c for c, _ in tiles]),
            torch.tensor([i for _, i in tiles]),
            class_names,
            seed,
        ),
        artifact.grid,
    )
    files = {
        artifact.tensors.name: file_digest(artifact.tensors),
        artifact.grid.name: file_digest(artifact.grid),
        **dict(sorted(digests.items())),
    }
    manifest = {"files": files, "name": artifact.name, "images": len(labels), **fields}
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


MANIFEST_KEYS = ("fingerprint", "files", "classes", "ipc")


def read_manifest(artifact: DistilledArtifact, rebuild: str | None = None) -> dict:
    """A finished set's manifest, after checking every recorded file is there at its size (no file is read);
    ``rebuild``: the command that makes the set (a missing or damaged one), default a generic one."""
    rebuild = rebuild or rebuild_command(artifact)
    if not artifact.complete():
        raise MissingInputError(
            f"distilled set {artifact.folder} is missing or incomplete (no manifest.json); produce it with: {rebuild}"
        )
    repair = f"repair it with {rebuild} (it remakes a set whose manifest is damaged)"
    manifest = load_record(artifact.manifest, MANIFEST_KEYS, repair, "a set's manifest")
    check_files(artifact.folder, manifest["files"], rebuild)
    return manifest


def read_images(artifact: DistilledArtifact, manifest: dict, image_format: str, check: Callable[[int], bool]):
    """The set's images as stored: ``png`` → the exported files as uint8 (N, C, H, W) (``images.pt`` is never
    opened); ``float`` → ``images.pt``'s normalised float32 images, digest-checked when ``check(0)``. Both in the
    class-major order of :func:`png_files`."""
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"distilled.format={image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
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
