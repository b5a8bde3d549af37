"""The distilled-image grid: one row per class, so a person can see what was distilled."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from cvdd.artifacts import atomic_write

MAX_GRID_CLASSES = 100
MAX_GRID_COLUMNS = 10
MAX_TILE = 112  # larger images are shown at this size: a 224 px set's grid stays 11k px tall, not 23k
LABEL_WIDTH = 110  # pixels left of the images for the class names


def grid_rows(num_classes: int, seed: int = 0) -> list[int]:
    """All classes up to 100; beyond that a seeded sample of 100, in class order."""
    if num_classes <= MAX_GRID_CLASSES:
        return list(range(num_classes))
    picked = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:MAX_GRID_CLASSES]
    return sorted(picked.tolist())


def grid_tile(pixels: torch.Tensor) -> torch.Tensor:
    """One uint8 (C, H, W) image as the grid shows it: area-downscaled to :data:`MAX_TILE` pixels when larger (each
    tile on its own, so a 100 × 10 grid of 224 px images never exists at full size)."""
    h, w = pixels.shape[1:]
    if max(h, w) <= MAX_TILE:
        return pixels
    size = (h * MAX_TILE // max(h, w), w * MAX_TILE // max(h, w))
    return F.interpolate(pixels[None].float(), size=size, mode="area")[0].round().to(torch.uint8)


def distilled_grid(
    pixels: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor, class_names: list[str], seed: int = 0
) -> Image.Image:
    """One row per class (up to 100), one column per IPC index (up to 10), class names on the left; images larger
    than :data:`MAX_TILE` pixels are shown downscaled to it (area-averaged)."""
    rows = grid_rows(len(class_names), seed)
    columns = min(int(ipc_index.max()) + 1, MAX_GRID_COLUMNS)
    c, h, w = grid_tile(pixels[0]).shape
    tiles = torch.zeros(len(rows) * columns, c, h, w, dtype=torch.uint8)
    for r, cls in enumerate(rows):
        for i in range(columns):
            match = torch.nonzero((labels == cls) & (ipc_index == i)).flatten()
            if len(match):
                tiles[r * columns + i] = grid_tile(pixels[match[0]])
    scale = max(1, 64 // h)  # small images are upscaled so a person can see them
    grid = make_grid(tiles, nrow=columns, padding=2, pad_value=255)  # grey tiles come back as RGB
    image = Image.fromarray(grid.permute(1, 2, 0).numpy()).resize(
        (grid.shape[2] * scale, grid.shape[1] * scale), Image.NEAREST
    )
    canvas = Image.new("RGB", (image.width + LABEL_WIDTH, image.height), "white")
    canvas.paste(image, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = (h + 2) * scale
    for r, cls in enumerate(rows):
        draw.text((4, r * row_height + row_height // 2 - 5), f"{cls}: {class_names[cls]}"[:18], fill="black")
    return canvas


def save_image_atomic(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda fh: image.save(fh, format="PNG"))
