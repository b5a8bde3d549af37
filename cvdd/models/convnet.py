"""The dataset-distillation ConvNet (Gidaris & Komodakis style, as used by DC/DSA/MTT), with BatchNorm.

``depth`` blocks of conv3×3 → BatchNorm → ReLU → 2×2 average pool, then one linear layer.
BatchNorm (rather than the instance norm of the DC papers) because recover matches BN statistics.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int, in_chans: int = 3, width: int = 128, depth: int = 3):
        super().__init__()
        if image_size >> depth < 1:
            raise ValueError(f"ConvNet depth {depth} pools a {image_size}px image below 1px; lower model.depth")
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        feat = image_size >> depth
        self.classifier = nn.Linear(width * feat * feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
