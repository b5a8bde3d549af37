"""Batch-specific soft labels (BSSL): teacher logits with BatchNorm normalising by each batch's own
statistics, while the teacher's running statistics and weights stay bit-for-bit unchanged.

Several planned batches of one size can share a forward pass (``sizes``): every BatchNorm then
normalises each batch (or half batch) by its own statistics, exactly the maths of forwarding them one
by one, while the convolutions run at the stacked batch size (5× fewer, larger calls at the paper's
batch 16). BatchNorm layers are switched to a forward that never touches their buffers, so nothing has
to be saved and restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from cvdd.committee.passes import MemberPasses
from cvdd.runtime.precision import FP32, Numerics

PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
FUSED_BATCH_NORMS = (BatchNormAct2d,)  # timm: normalisation, then its own dropout and activation


def _grouped_batch_norm(bn: nn.modules.batchnorm._BatchNorm, sizes: Sequence[int] | None):
    """A forward for ``bn`` that normalises each group of ``sizes`` samples by that group's own batch statistics
    and leaves ``bn``'s buffers alone.

    ``G`` equal groups of a ``(G·b, C, H, W)`` activation are laid side by side as ``(b, G·C, H, W)``, so one
    call of the native batch-norm kernel (with the affine parameters repeated ``G`` times) normalises every
    group by its own statistics; both rearrangements keep channels-last tensors channels-last. Unequal groups
    (an odd batch split into halves) run one call per group. timm's ``BatchNormAct2d`` (DenseNet) applies its
    fused dropout and activation afterwards, as its own forward does.
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        groups = list(sizes) if sizes else [len(x)]
        if len(set(groups)) > 1:
            y = torch.cat([normalise(part, 1) for part in x.split(groups)])
        else:
            y = normalise(x, len(groups))
        return bn.act(bn.drop(y)) if fused else y

    if type(bn) not in PLAIN_BATCH_NORMS + FUSED_BATCH_NORMS:
        raise TypeError(
            f"BSSL does not know what {type(bn).__name__} does besides normalising; supported: "
            f"{', '.join(t.__name__ for t in PLAIN_BATCH_NORMS + FUSED_BATCH_NORMS)}"
        )
    fused = type(bn) in FUSED_BATCH_NORMS

    def normalise(x: torch.Tensor, groups: int) -> torch.Tensor:
        weight = bn.weight.repeat(groups) if bn.affine else None
        bias = bn.bias.repeat(groups) if bn.affine else None
        if groups == 1:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn.eps)
        channels = x.shape[1]
        last = x.permute(0, *range(2, x.dim()), 1)  # channels last in index order: (G·b, ..., C)
        spatial = last.shape[1:-1]
        side = last.unflatten(0, (groups, -1)).movedim(0, -2).reshape(-1, *spatial, groups * channels)
        out = F.batch_norm(side.movedim(-1, 1), None, None, weight, bias, True, 0.0, bn.eps)
        back = out.movedim(1, -1).unflatten(-1, (groups, channels)).movedim(-2, 0).reshape(-1, *spatial, channels)
        return back.movedim(-1, 1)

    return forward


@contextmanager
def batch_statistics(net: nn.Module, sizes: Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Within the block every BatchNorm of ``net`` normalises by batch statistics — of each group of ``sizes``
    consecutive samples, or of the whole batch — and leaves its buffers alone; afterwards all is as before."""
    forwards = {
        m: _grouped_batch_norm(m, sizes) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    try:
        for module, forward in forwards.items():
            module.forward = forward
        yield net
    finally:
        for module in forwards:
            module.__dict__.pop("forward", None)


def stat_groups(batch_sizes: Sequence[int], halves: bool) -> list[int]:
    """The groups BatchNorm takes statistics over for stacked batches: each batch, or each half of it (the first
    half ``n // 2`` images, as the released relabel code splits an odd batch)."""
    if not halves:
        return list(batch_sizes)
    return [part for size in batch_sizes for part in (size // 2, size - size // 2) if part]


@torch.no_grad()
def soft_label_logits(
    teachers: Mapping[str, nn.Module],
    weights: Mapping[str, float],
    images: torch.Tensor,
    bssl: bool = True,
    halves: bool = False,
    numerics: Mapping[str, Numerics] | None = None,
    batch_sizes: Sequence[int] | None = None,
    passes: MemberPasses | None = None,
) -> torch.Tensor:
    """``Σ_t w_t · logits_t`` in fp32 on ``images`` — consecutive planned batches of ``batch_sizes`` (default:
    one batch). With ``bssl`` BN uses each batch's own statistics (each half's with ``halves``, as the
    released SRe2L/CV-DD code forwards a batch as two halves). Teacher ``t`` runs in ``numerics[t]``; the
    teachers' passes run as ``passes`` schedules them (default one after another) and sum in teacher order."""
    groups = stat_groups(batch_sizes or [len(images)], halves)
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def logits_of(name: str) -> torch.Tensor:
        net, run = teachers[name], (numerics or {}).get(name, FP32).forward
        # grad mode and inference mode are per thread: a worker takes the caller's
        statistics = batch_statistics(net, groups) if bssl else contextlib.nullcontext()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled), statistics:
            return run(net, images)

    names = list(teachers)
    logits = (passes or MemberPasses(1, 1)).run(names, logits_of, kind=lambda name: name)
    total = None
    for name, teacher_logits in zip(names, logits, strict=True):
        term = weights[name] * teacher_logits
        total = term if total is None else total + term
    return total
