"""Replayable, batched augmentation on tensors.

Random draws come from an explicit ``torch.Generator`` so an augmentation can be reproduced
exactly from a seed — per synthetic unit in recover (independent of how units are grouped or
sharded across ranks), and per epoch plan in relabel/validate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crop_box(
    generator: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)`` (the Inception-style sampler, 10 tries then centre)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_flip_theta(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine matrices (N, 2, 3) for ``F.affine_grid``: crop ``boxes`` (top, left, h, w), mirror where ``flips``."""
    boxes = boxes.to(torch.float64)
    top, left, h, w = boxes.unbind(-1)
    sx = w / width
    sy = h / height
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    sign = torch.where(flips, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    return theta


def resized_crop(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop-resize-flip a batch (N, C, H, W) with per-image affine ``theta`` (bilinear, one kernel call)."""
    grid = F.affine_grid(
        theta.to(images.dtype).to(images.device), [len(images), images.shape[1], *size], align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
