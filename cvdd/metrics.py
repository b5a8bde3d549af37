"""Classification metrics as the papers report them: micro-averaged top-k accuracy."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy


def topk_accuracy(num_classes: int, k: int, sync: bool = True) -> MulticlassAccuracy:
    """Fraction of samples whose label is in the top ``k`` (``average="micro"``: not torchmetrics' macro default)."""
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro", sync_on_compute=sync)


@torch.no_grad()
def evaluate_classifier(
    net: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device | str = "cpu",
    distributed: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 of ``net`` over every sample of ``loader``. With ``distributed`` each rank passes its own shard
    (:class:`cvdd.distributed.ShardSampler`: no padding, no repeats) and the counts are summed over ranks, so the
    result is exactly the one-device pass."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, samples
    k = min(5, num_classes)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        top = net(images).float().topk(k, dim=1).indices
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)])
    net.train(was_training)
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, seen = counts.tolist()
    return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "samples": seen}
