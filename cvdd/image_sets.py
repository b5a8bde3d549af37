"""The image set a student learns from: a distilled set found by name, described by its manifest.

Relabel and evaluate both go through :func:`student_set`, so every method's set (CV-DD, SRe2L++, RDED, random
real images, herding) gets exactly the same soft-label treatment. The set's IPC, classes and method come from its
manifest, not from this run's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from cvdd.artifacts import fingerprint
from cvdd.artifacts.distilled import IMAGE_FORMATS, DistilledArtifact, read_distilled, set_method
from cvdd.artifacts.identity import set_name
from cvdd.data import get_spec


@dataclass
class StudentSet:
    name: str
    images: torch.Tensor  # normalised (N, C, H, W), class-major
    labels: torch.Tensor
    classes: list[str]
    fingerprint: str  # identifies the images (set and format); label files record it
    image_format: str  # png (uint8 pixels, as shipped) or float (full precision)
    ipc: int
    method: str


def student_set(cfg: DictConfig, root: Path) -> StudentSet:
    """The set named by ``set=`` (or the method's default name) in ``cfg.distilled.format``: ``png`` (uint8
    pixels, what a shipped set holds) or ``float`` (``images.pt`` as the method left it)."""
    replaced = cfg.distilled.get("replaced_by")
    if replaced:
        raise ValueError(
            f"distilled=random_real is replaced by {replaced}: random real images are now a distilled set like any "
            f"other. Make it once with `python distill.py {replaced} ipc={cfg.ipc} seed={cfg.seed}`, then relabel "
            f"and evaluate with {replaced} (its labels are made again: the images now come from the set's files)"
        )
    image_format = cfg.distilled.format
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"distilled.format={image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    spec = get_spec(cfg.dataset.name)
    name = set_name(cfg)
    found = read_distilled(DistilledArtifact(root, cfg.dataset.name, name), image_format, spec.mean, spec.std)
    manifest = found.manifest
    identity = fingerprint({"set": manifest["fingerprint"], "format": image_format})
    return StudentSet(
        name,
        found.images,
        found.labels,
        manifest["classes"],
        identity,
        image_format,
        int(manifest["ipc"]),
        set_method(manifest),
    )
