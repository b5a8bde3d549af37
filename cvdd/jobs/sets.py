"""The image set a student learns from: a distilled set by name, or the random-real baseline.

Relabel and evaluate both go through :func:`student_set`, so the random-real baseline gets exactly the
same soft-label treatment (offline files, plan, teachers) as a distilled set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from cvdd.artifacts import fingerprint
from cvdd.data import get_spec, load_dataset
from cvdd.data.distilled import IMAGE_FORMATS, DistilledArtifact, from_pixels, read_distilled, to_pixels
from cvdd.jobs.recover import check_ipc, distilled_name
from cvdd.jobs.squeeze import dataset_identity
from cvdd.seeding import derive_seed

KINDS = ("synthetic", "random_real")


@dataclass
class StudentSet:
    name: str
    images: torch.Tensor  # normalised (N, C, H, W), class-major
    labels: torch.Tensor
    classes: list[str]
    fingerprint: str  # identifies the images (set and format); label files record it
    image_format: str  # png (uint8 pixels, as shipped) or float (full precision)


def random_real_images(cfg: DictConfig, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` seeded random real training images per class (normalised), class-major."""
    split = data.view("train")
    images, labels = [], []
    for c in range(data.spec.num_classes):
        idx = torch.nonzero(split.targets == c).flatten()
        if len(idx) < cfg.ipc:
            raise ValueError(f"class {c} has {len(idx)} training images, fewer than ipc={cfg.ipc}")
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, c, 0x4EA1))
        for i in idx[torch.randperm(len(idx), generator=gen)[: cfg.ipc]].tolist():
            images.append(split[i][0])
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def student_set(cfg: DictConfig, root: Path, data=None) -> StudentSet:
    """``cfg.distilled.kind``: ``synthetic`` (the set named as distill.py names it) or ``random_real``, in
    ``cfg.distilled.format``: ``png`` (uint8 pixels, what a shipped set holds) or ``float``."""
    check_ipc(cfg)
    kind, image_format = cfg.distilled.kind, cfg.distilled.format
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"distilled.format={image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    spec = get_spec(cfg.dataset.name)
    if kind == "synthetic":
        name = distilled_name(cfg)
        found = read_distilled(DistilledArtifact(root, cfg.dataset.name, name), image_format, spec.mean, spec.std)
        manifest = found.manifest
        identity = fingerprint({"set": manifest["fingerprint"], "format": image_format})
        return StudentSet(name, found.images, found.labels, manifest["classes"], identity, image_format)
    if kind == "random_real":
        data = data if data is not None else load_dataset(cfg.dataset)
        images, labels = random_real_images(cfg, data)
        if image_format == "png":
            images = from_pixels(to_pixels(images, spec.mean, spec.std), spec.mean, spec.std)
        recipe = {
            "random_real": int(cfg.ipc),
            "seed": int(cfg.seed),
            "dataset": dataset_identity(cfg.dataset),
            "format": image_format,
        }
        name = f"random_real_ipc{cfg.ipc}_s{cfg.seed}"
        return StudentSet(name, images, labels, data.classes, fingerprint(recipe), image_format)
    raise ValueError(f"distilled={kind!r}; choose one of {', '.join(KINDS)} (conf/distilled/)")
