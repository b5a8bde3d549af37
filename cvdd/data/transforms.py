"""Per-sample transforms for training and evaluating classifiers on real data.

Small images (≤ 64 px) use the CIFAR recipe (padded random crop + flip); 224 px sets use the
ImageNet recipe (random-resized-crop + flip, resize-256 / centre-crop for evaluation). Flip is
only used where ``spec.hflip`` says a mirror image keeps its class (not for digits).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cvdd.data.spec import DatasetSpec
from cvdd.models.registry import SMALL_INPUT_MAX  # the models' small-input stems and these crops change together


def normalize(spec: DatasetSpec) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])


def train_transform(spec: DatasetSpec, from_files: bool) -> v2.Transform:
    """Augmentation used when squeezing teachers."""
    size = spec.image_size
    steps: list[v2.Transform] = []
    if size <= SMALL_INPUT_MAX:
        if from_files:
            steps.append(v2.Resize((size, size), antialias=True))
        steps.append(v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
    else:
        steps.append(v2.RandomResizedCrop(size, antialias=True))
    if spec.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, normalize(spec)])


def eval_transform(spec: DatasetSpec, from_files: bool) -> v2.Transform:
    """Deterministic view: the image at the dataset's size, normalised."""
    size = spec.image_size
    steps: list[v2.Transform] = []
    if size <= SMALL_INPUT_MAX:
        if from_files:
            steps.append(v2.Resize((size, size), antialias=True))
    else:
        steps += [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, normalize(spec)])
