"""What every stage knows of a dataset before reading it: classes, size, channels, normalisation, mirroring."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cvdd.data.formats import RawData


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset; ``hflip`` says whether a mirror image keeps its class."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    loader: Callable[[Mapping[str, Any]], RawData]

    @property
    def pixel_range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (low, high) of a valid image in normalised space: recover clamps to this."""
        low = tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))
        high = tuple((1 - m) / s for m, s in zip(self.mean, self.std, strict=True))
        return low, high
