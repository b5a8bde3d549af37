"""Classification metrics as the papers report them: micro-averaged top-k accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy


def topk_accuracy(num_classes: int, k: int, sync: bool = True) -> MulticlassAccuracy:
    """Fraction of samples whose label is in the top ``k`` (``average="micro"``: not torchmetrics' macro default)."""
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro", sync_on_compute=sync)


@torch.no_grad()
def evaluate_classifier(
    net: nn.Module, loader: DataLoader, num_classes: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1/top-5 of ``net`` over every sample of ``loader`` on one device (no padding, no repeats)."""
    was_training = net.training
    net.eval()
    # sync=False: this pass runs on one rank only; the others must not be waited for
    top1, top5 = (topk_accuracy(num_classes, k, sync=False).to(device) for k in (1, 5))
    seen = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = net(images).float()
        top1.update(logits, labels)
        top5.update(logits, labels)
        seen += len(labels)
    net.train(was_training)
    return {"top1": 100.0 * top1.compute().item(), "top5": 100.0 * top5.compute().item(), "samples": seen}
