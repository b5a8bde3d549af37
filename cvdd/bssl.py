"""Batch-specific soft labels (BSSL): teacher logits with BatchNorm normalising by each batch's own
statistics, while the teacher's running statistics and weights stay bit-for-bit unchanged.

BatchNorm in train mode updates ``running_mean``/``running_var`` even under ``torch.no_grad()``,
so the buffers are saved and restored around the forward pass rather than trusted to stay put.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from cvdd.precision import FP32, Numerics


@contextmanager
def batch_statistics(net: nn.Module) -> Iterator[nn.Module]:
    """Within the block every BatchNorm of ``net`` uses batch statistics; afterwards all is as before."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    try:
        for m in bns:
            m.train()
        yield net
    finally:
        for m, (training, buffers) in zip(bns, saved, strict=True):
            m.train(training)
            for name, value in buffers.items():
                getattr(m, name).copy_(value)


@torch.no_grad()
def soft_label_logits(
    teachers: Mapping[str, nn.Module],
    weights: Mapping[str, float],
    images: torch.Tensor,
    bssl: bool = True,
    halves: bool = False,
    numerics: Mapping[str, Numerics] | None = None,
) -> torch.Tensor:
    """``Σ_t w_t · logits_t`` in fp32 on ``images``; with ``bssl`` BN uses batch statistics (of each half with
    ``halves``, as the released SRe2L/CV-DD code forwards a batch as two halves). Teacher ``t`` runs in
    ``numerics[t]`` (default fp32)."""
    chunks: Sequence[torch.Tensor] = images.chunk(2) if halves and len(images) > 1 else (images,)
    total = None
    for name, net in teachers.items():
        run = (numerics or {}).get(name, FP32).forward
        if bssl:
            with batch_statistics(net):
                logits = torch.cat([run(net, chunk) for chunk in chunks])
        else:
            logits = run(net, images)
        term = weights[name] * logits
        total = term if total is None else total + term
    return total
