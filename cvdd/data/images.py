"""The two storage backends every dataset in the registry reduces to.

Both yield ``(image, label)`` with the image as a ``uint8`` tensor (C, H, W) or, after a
transform, whatever the transform returns. Keeping the raw split free of transforms lets each
stage choose its own view of the same data (augmented for squeeze, plain for recover's
real-image initialisation) without reloading it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

Transform = Callable[[torch.Tensor], torch.Tensor]


class DatasetImageError(ValueError):
    """An image file of a dataset cannot be decoded (truncated, not an image)."""


class _TransformableImages(Dataset):
    """Shared behaviour: a transform slot and a cheap copy with another transform."""

    transform: Transform | None
    targets: torch.Tensor

    def with_transform(self, transform: Transform | None):
        view = copy.copy(self)
        view.transform = transform
        return view

    def _apply(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.transform is None else self.transform(image)


class TensorImages(_TransformableImages):
    """Images held in memory as one ``uint8`` tensor (N, C, H, W): digits, Fashion-MNIST, CIFAR."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor, transform=None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"TensorImages expects uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._apply(self.images[index]), int(self.targets[index])


class FileImages(_TransformableImages):
    """Images decoded from files on access: ImageFolder-style sets (Tiny-ImageNet, ImageNet...)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], channels: int, transform=None):
        self.paths = [Path(p) for p, _ in samples]
        self.targets = torch.as_tensor([t for _, t in samples], dtype=torch.long)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                image = TF.pil_to_tensor(img.convert(self.mode))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or foreign files
            raise DatasetImageError(f"cannot read image {path} ({err}); replace the file or delete it") from err
        return self._apply(image), int(self.targets[index])


ImageSplit = TensorImages | FileImages
