"""The image set a student learns from: a distilled set found by name, described by its manifest.

Relabel and validate both go through :func:`student_set`, so every method's set (CV-DD, SRe2L++, RDED, random
real images, herding) gets exactly the same soft-label treatment. The set's IPC, classes and method come from its
manifest, not from this run's settings.

Finding a set reads its manifest only; the pixels are read by :meth:`StudentSet.read` in each process once the
process group exists (a LightningModule's ``setup``), and stay on the host as uint8 (:class:`SetImages`): a
batch is normalised on its device when it is taken. At ImageNet-1K IPC 50 that is 7.5 GB per process instead of
30 GB of float32 on the host and again on every device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from cvdd.artifacts import fingerprint
from cvdd.artifacts.distilled import (
    IMAGE_FORMATS,
    DistilledArtifact,
    png_files,
    read_images,
    read_manifest,
    set_method,
)
from cvdd.artifacts.identity import set_name
from cvdd.data import dataset_spec
from cvdd.report.summary import SET_KEYS, next_command
from cvdd.runtime import log
from cvdd.runtime.distributed import raise_together, rank_and_world
from cvdd.runtime.errors import ConfigError


class SetImages:
    """A set's images on the host (uint8 pixels, or normalised float32 for ``distilled.format=float``); indexing
    returns that batch as normalised float32 on ``device``. Normalising a batch on its device gives bit for bit
    what normalising the whole set first gives (the same elementwise float32 operations)."""

    def __init__(self, data: torch.Tensor, mean=None, std=None, device: torch.device | str = "cpu"):
        if data.dtype == torch.uint8 and (mean is None or std is None):
            raise ValueError("uint8 pixels need the dataset's mean and std to be normalised")
        self.data, self.mean, self.std, self.device = data, mean, std, torch.device(device)
        if data.dtype == torch.uint8:
            shape = (1, -1, 1, 1)
            self._mean = torch.tensor(mean, dtype=torch.float32).view(shape).to(self.device)
            self._std = torch.tensor(std, dtype=torch.float32).view(shape).to(self.device)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def to(self, device: torch.device | str) -> SetImages:
        """The same host images, handed out on ``device``."""
        return SetImages(self.data, self.mean, self.std, device)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        batch = self.data[indices].to(self.device, non_blocking=True)
        if batch.dtype != torch.uint8:
            return batch.float()
        return (batch.float() / 255 - self._mean) / self._std


def as_set_images(images: torch.Tensor | SetImages) -> SetImages:
    """A normalised float tensor (as tests and callers in memory hold one) or :class:`SetImages` as the latter."""
    return images if isinstance(images, SetImages) else SetImages(images)


def read_on_every_rank(reader: Callable[[int, int], SetImages]) -> SetImages:
    """``reader(rank, world)`` in this process; if it fails on any rank it fails on all (a rank that failed alone
    would leave the others waiting at their next collective)."""
    rank, world = rank_and_world()
    error, images = None, None
    try:
        images = reader(rank, world)
    except Exception as err:
        error = err
    raise_together(error, "reading the distilled set")
    return images


@dataclass
class StudentSet:
    name: str
    labels: torch.Tensor  # class of every image, class-major (the order of the set's files)
    classes: list[str]
    fingerprint: str  # identifies the images (set and format); label files record it
    image_format: str  # png (uint8 pixels, as shipped) or float (full precision)
    ipc: int
    method: str
    artifact: DistilledArtifact
    manifest: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rank: int = 0, world: int = 1) -> SetImages:
        """The images as :class:`SetImages` on the host. Every rank reads all of them; rank ``r`` of ``world`` checks
        the digests of files ``r, r + world, …`` (and ``images.pt`` on rank 0), so a job hashes each file once."""
        started = time.perf_counter()
        data = read_images(self.artifact, self.manifest, self.image_format, lambda i: i % world == rank)
        log.info(
            "read %d images of %s (%s, %.1f MB on the host) in %.1f s",
            len(data),
            self.name,
            self.image_format,
            data.numel() * data.element_size() / 1e6,
            time.perf_counter() - started,
        )
        return SetImages(data, self.mean, self.std)


def student_set(cfg: DictConfig, root: Path) -> StudentSet:
    """The set named by ``set=`` (or the method's default name) in ``cfg.distilled.format``: ``png`` (uint8
    pixels, what a shipped set holds) or ``float`` (``images.pt`` as the method left it). Reads the manifest and
    checks every file's size; no image is read here."""
    image_format = cfg.distilled.format
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"distilled.format={image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    spec = dataset_spec(cfg.dataset)
    name = set_name(cfg)
    artifact = DistilledArtifact(root, cfg.dataset.name, name)
    manifest = read_manifest(artifact, next_command("distill.py", SET_KEYS))
    _, labels, _ = png_files(manifest.get("files", {}))
    identity = fingerprint({"set": manifest["fingerprint"], "format": image_format})
    return StudentSet(
        name,
        labels,
        manifest["classes"],
        identity,
        image_format,
        int(manifest["ipc"]),
        set_method(manifest),
        artifact,
        manifest,
        tuple(spec.mean),
        tuple(spec.std),
    )
