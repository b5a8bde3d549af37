"""The dataset-distillation ConvNet (Gidaris & Komodakis style, as used by DC/DSA/MTT).

``depth`` blocks of conv3×3 → norm → ReLU → 2×2 average pool, then one linear layer. ``norm="batch"`` by
default, because a committee member must have BatchNorm for recover to match its statistics; ``"instance"``
is the DC papers' choice (a student only), ``"none"`` drops the norm layer.
"""

from __future__ import annotations

import torch
from torch import nn

from cvdd.runtime.errors import ConfigError

NORMS = {
    "batch": nn.BatchNorm2d,
    "instance": lambda width: nn.GroupNorm(width, width, affine=True),  # per-sample, per-channel, as in DC
    "none": lambda width: nn.Identity(),
}


class ConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        image_size: int,
        in_chans: int = 3,
        width: int = 128,
        depth: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.norm={norm!r}; choose from {', '.join(NORMS)}")
        if image_size >> depth < 1:
            raise ConfigError(f"ConvNet depth {depth} pools a {image_size}px image below 1px; lower model.depth")
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                NORMS[norm](width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        feat = image_size >> depth
        self.classifier = nn.Linear(width * feat * feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
