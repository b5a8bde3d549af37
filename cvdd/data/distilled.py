"""The distilled-set artifact: per-unit results while recovering, then the assembled set.

Layout of ``<artifacts>/<dataset>/distilled/<name>/``::

    units/<ipc>_<block>.pt          one finished unit (written atomically as it completes)
    images.pt                       all images (normalised, full precision), labels, IPC indices
    <class idx>_<class name>/<ipc idx>.png   the same images as PNG (ImageFolder layout)
    grid.png                        one row per class
    manifest.json                   written last: its presence means the set is complete
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cvdd.artifacts import NamedArtifact, load_json, save_tensors


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (N, C, H, W) → uint8 pixels."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return ((images.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


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
    """Images as ``<class idx>_<class name>/<ipc idx>.png`` (grey or RGB)."""
    for img, label, i in zip(pixels, labels.tolist(), ipc_index.tolist(), strict=False):
        sub = folder / f"{label:04d}_{safe_name(class_names[label])}"
        sub.mkdir(parents=True, exist_ok=True)
        array = img.permute(1, 2, 0).numpy()
        mode_image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        tmp = sub / f".{i:04d}.png.tmp"
        mode_image.save(tmp, format="PNG")
        tmp.replace(sub / f"{i:04d}.png")


def save_set(artifact: DistilledArtifact, images: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor) -> None:
    save_tensors(artifact.tensors, {"images": images.float().cpu(), "labels": labels, "ipc_index": ipc_index})


@dataclass
class DistilledSet:
    images: torch.Tensor  # normalised (N, C, H, W)
    labels: torch.Tensor
    ipc_index: torch.Tensor
    manifest: dict


def read_distilled(artifact: DistilledArtifact) -> DistilledSet:
    if not artifact.complete():
        raise FileNotFoundError(
            f"distilled set {artifact.folder} is missing or incomplete (no manifest.json); produce it with: "
            f"python distill.py dataset={artifact.dataset} name={artifact.name} ..."
        )
    data = torch.load(artifact.tensors, weights_only=True)
    return DistilledSet(data["images"], data["labels"], data["ipc_index"], load_json(artifact.manifest))
