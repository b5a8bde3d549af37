"""BatchNorm running statistics of a step whose slices ran on several ranks, as one process would have them.

The student forwards each planned batch as slices, one after another, and every slice's forward moves each
BatchNorm layer's running statistics: ``r ← (1 − m) r + m s`` with ``s`` the slice's statistics. When rank ``k``
forwards a contiguous block of ``n_k`` of those slices (rank 0 the first block), its buffers end as
``(1 − m)^{n_k} r₀ + Δ_k``; one process forwarding every block in order ends as
``(1 − m)^{N} r₀ + Σ_k (1 − m)^{n_{k+1} + … } Δ_k``. :class:`BatchNormMerge` gathers the ``Δ_k`` (the size of
the network's BatchNorm buffers, never of the data) and writes that on every rank, so the ranks stay identical
and the running statistics are the one-process ones up to float rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cvdd.runtime.distributed import rank_and_world
from cvdd.runtime.errors import ConfigError


class BatchNormMerge:
    def __init__(self, net: nn.Module):
        self.layers = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
        cumulative = [type(m).__name__ for m in self.layers if m.momentum is None]
        if cumulative:
            raise ConfigError(
                f"BatchNorm with momentum=None (a cumulative average; {cumulative[0]}) cannot be merged across ranks; "
                "train this student on one device or give its BatchNorm layers a momentum"
            )
        self._decay = (
            torch.cat(  # 1 − momentum for every running_mean and running_var entry, in _flat's order
                [torch.full((2 * m.running_mean.numel(),), 1.0 - m.momentum, dtype=torch.float64) for m in self.layers]
            )
            if self.layers
            else torch.zeros(0, dtype=torch.float64)
        )
        self._start: torch.Tensor | None = None
        self._tracked: list[torch.Tensor] = []
        self.bytes_sent = 0  # per merge, for bench/scale.py

    def _flat(self) -> torch.Tensor:
        return torch.cat([t.double().flatten() for m in self.layers for t in (m.running_mean, m.running_var)])

    def snapshot(self) -> None:
        """Remember the buffers before this step's forwards (every rank holds the same)."""
        if self.layers and rank_and_world()[1] > 1:
            self._start = self._flat()
            self._tracked = [m.num_batches_tracked.clone() for m in self.layers]

    def merge(self, forwards: int) -> None:
        """After a step in which this rank forwarded ``forwards`` slices (its block of the step, in rank order):
        every rank's buffers become the one-process ones."""
        _, world = rank_and_world()
        if world == 1 or not self.layers:
            return
        if self._start is None:
            raise RuntimeError("BatchNormMerge.merge() without snapshot() before the step's forwards")
        start = self._start
        decay = self._decay.to(start.device)
        delta = self._flat() - decay.pow(forwards) * start
        payload = torch.cat([delta, torch.tensor([float(forwards)], dtype=torch.float64, device=start.device)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(gathered, payload)
        self.bytes_sent = payload.numel() * payload.element_size()
        counts = [int(g[-1].item()) for g in gathered]
        later = sum(counts)
        merged = decay.pow(later) * start
        for k in range(world):
            later -= counts[k]
            merged += decay.pow(later) * gathered[k][:-1]
        offset = 0
        with torch.no_grad():
            for m, tracked in zip(self.layers, self._tracked, strict=True):
                for buffer in (m.running_mean, m.running_var):
                    size = buffer.numel()
                    buffer.copy_(merged[offset : offset + size].view_as(buffer).to(buffer.dtype))
                    offset += size
                m.num_batches_tracked.copy_(tracked + sum(counts))
        self._start = None
