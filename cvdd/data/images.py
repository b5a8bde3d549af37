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

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from cvdd.runtime.errors import DataError

Transform = Callable[[torch.Tensor], torch.Tensor]


class DatasetImageError(DataError):
    """An image file of a dataset cannot be decoded (truncated, not an image)."""


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(img: Image.Image, path: Path | str) -> Image.Image:
    """``img`` with 8-bit channels. PIL's ``convert`` clips 16- and 32-bit grey images to 255 (a 16-bit PNG of
    value 32768 would read as white): they are scaled by their value range instead (16-bit types by 65535; a
    32-bit one by 65535 when a value exceeds 255), and float or out-of-range images are refused."""
    if img.mode not in (*SIXTEEN_BIT, "I", "F"):
        return img
    if img.mode == "F":
        raise DatasetImageError(f"{path} holds floating-point pixels; save it as an 8- or 16-bit image")
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DatasetImageError(
            f"{path} holds values from {values.min()} to {values.max()}; save it as an 8- or 16-bit image"
        )
    if img.mode == "I" and (not values.size or values.max() <= 255):
        return Image.fromarray(values.astype(np.uint8), "L")
    return Image.fromarray(np.round(values / 257).astype(np.uint8), "L")


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

    @classmethod
    def by_class(cls, images: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> TensorImages:
        """The samples stored class by class, each class in its source order: the order an ImageFolder of the same
        images lists them in. The order decides a seeded shuffle's batches, so a built-in dataset and its export as a
        folder (``dataset=image_folder``) squeeze the same teachers only when both are stored this way."""
        targets = torch.as_tensor(targets, dtype=torch.long)
        order = torch.sort(targets, stable=True).indices
        return cls(images[order], targets[order])

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
                image = TF.pil_to_tensor(eight_bit(img, path).convert(self.mode))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or foreign files
            raise DatasetImageError(f"cannot read image {path} ({err}); replace the file or delete it") from err
        return self._apply(image), int(self.targets[index])


ImageSplit = TensorImages | FileImages
