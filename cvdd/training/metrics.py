"""Classification metrics as the papers report them: micro-averaged top-k accuracy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from cvdd.runtime.errors import ConfigError
from cvdd.runtime.precision import FP32, Numerics


def topk_accuracy(num_classes: int, k: int, sync: bool = True) -> MulticlassAccuracy:
    """Fraction of samples whose label is in the top ``k`` (``average="micro"``: not torchmetrics' macro default)."""
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro", sync_on_compute=sync)


def hit_counts(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(top-1 hits, top-``k`` hits, samples) of one batch as an int64 tensor on ``logits``' device."""
    hits = logits.float().topk(k, dim=1).indices == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=logits.device)])


def percent(hits: int, samples: int) -> float:
    """An accuracy in % from counts, in float64 — one formula for every reported accuracy, so the same counts
    always give the same number (a float32 ratio such as torchmetrics' differs in the 7th digit)."""
    return 100.0 * hits / samples


class TopOneCounts(Metric):
    """Top-1 hits and samples, summed over batches and (at ``compute``) over ranks; :func:`percent` turns them into
    the accuracy, exactly as :func:`evaluate_classifier` reports its final pass."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("counts", torch.zeros(2, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        top1, _, samples = hit_counts(logits, labels, 1)
        self.counts += torch.stack([top1, samples])

    def compute(self) -> float:
        hits, samples = self.counts.tolist()
        return percent(hits, samples)


@torch.no_grad()
def evaluate_classifier(
    net: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device | str = "cpu",
    distributed: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 of ``net`` over every sample of ``loader``. With ``distributed`` each rank passes its own shard
    (:class:`~cvdd.runtime.distributed.ShardSampler`: no padding, no repeats) and the counts are summed over ranks,
    so the result is exactly the one-device pass.

    The pass runs on ``device`` and the net is put back where it was: after ``Trainer.fit`` on a GPU Lightning's
    teardown has moved the module to the CPU, while the batches go to ``device``."""
    weight = next(net.parameters(), None)
    home = device if weight is None else weight.device
    was_training = net.training
    net.to(device).eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, samples
    k = min(5, num_classes)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        counts += hit_counts(net(images), labels, k)
    net.to(home).train(was_training)
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, seen = counts.tolist()
    return {"top1": percent(top1, seen), "top5": percent(top5, seen), "samples": seen}


def within_class_distance(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Diversity of a set: the mean over classes of the mean Euclidean distance between two different rows of
    ``x`` (N, D) of that class (classes with one row are left out). Near-identical images per class give ≈ 0."""
    means = []
    for c in labels.unique():
        rows = x[labels == c].double()
        n = len(rows)
        if n < 2:
            continue
        means.append(float(torch.pdist(rows).sum() / (n * (n - 1) / 2)))
    if not means:
        raise ValueError("within-class distance needs a class with at least two images")
    return sum(means) / len(means)


def last_linear(net: nn.Module) -> nn.Linear:
    """The classifier of ``net``: its last ``nn.Linear`` (every registered architecture ends in one)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(net).__name__} has no nn.Linear classifier to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(
    net: nn.Module, batches: Iterable[torch.Tensor], numerics: Numerics = FP32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``net``'s input to its classifier for every image of ``batches`` (normalised N × C × H × W each), in eval
    mode and ``numerics``: (N, D) fp32 on the CPU."""
    captured: list[torch.Tensor] = []
    hook = last_linear(net).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].float().flatten(1).cpu())
    )
    was_training = net.training
    net.eval()
    try:
        for x in batches:
            numerics.forward(net, x.to(device))
    finally:
        hook.remove()
        net.train(was_training)
    return torch.cat(captured)


def set_diversity(
    pixels: torch.Tensor, labels: torch.Tensor, nets: dict[str, nn.Module], mean, std
) -> dict[str, float]:
    """Within-class diversity of a set of uint8 ``pixels``: ``pixels`` is the RMS per-pixel difference (0–1 scale)
    between two images of a class, averaged; ``features`` the distance between their L2-normalised penultimate
    features (0–2), averaged over classes and over the ``nets`` (the pool) — the second says how differently the
    models see them, the first how differently they look."""
    x = pixels.float() / 255.0
    flat = x.flatten(1)
    normalised = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    features = [
        within_class_distance(nn.functional.normalize(penultimate_features(net, normalised.split(256)), dim=1), labels)
        for net in nets.values()
    ]
    return {
        "pixels": within_class_distance(flat, labels) / flat.shape[1] ** 0.5,
        "features": sum(features) / len(features),
    }
