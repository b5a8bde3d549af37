"""The committee: frozen teachers, their BN-statistic taps, member selection and voting weights.

Notation follows CV-DD: a pool of ``n`` members, ``k`` chosen per synthetic unit, voting
weights ``w = softmax(α / T)`` over the chosen members' prior scores ``α``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.layers import BatchNormAct2d
from torch import nn

from cvdd.artifacts import TeacherArtifact, load_json, load_tensors
from cvdd.moments import BatchNormMoments
from cvdd.precision import FP32, Numerics

SCHEDULES = ("fixed", "cycle", "random", "auto")
WEIGHTINGS = ("prior", "equal", "random")


class ClassOrderMismatchError(ValueError):
    """A teacher was trained with another class order or class count than the dataset has now."""


def load_teacher(artifact: TeacherArtifact, classes: Sequence[str]) -> tuple[nn.Module, dict]:
    """Rebuild a squeezed teacher from its record, load its weights, and check its class order."""
    record = load_json(artifact.record)
    trained, now = list(record["classes"]), list(classes)
    if record["num_classes"] != len(classes) or trained != now:
        where = next(
            (i for i, (a, b) in enumerate(zip(trained, now, strict=False)) if a != b), min(len(trained), len(now))
        )
        raise ClassOrderMismatchError(
            f"teacher {artifact.weights} was trained on {len(trained)} classes and dataset '{artifact.dataset}' "
            f"now has {len(now)}; they first differ at class index {where}: the teacher's is "
            f"{trained[where] if where < len(trained) else '(none)'!r}, the dataset's "
            f"{now[where] if where < len(now) else '(none)'!r}. Retrain it: {artifact.train_command()} overwrite=true"
        )
    net = instantiate(
        record["net"], num_classes=record["num_classes"], image_size=record["image_size"], in_chans=record["in_chans"]
    )
    digest = record.get("files", {}).get(artifact.weights.name)
    net.load_state_dict(load_tensors(artifact.weights, f"{artifact.train_command()} (it retrains)", digest))
    return net, record


def select_members(
    pool: Sequence[str],
    k: int,
    schedule: str,
    ipc: int,
    seed: int,
    priors: dict[str, float],
    fixed: Sequence[str] | None = None,
) -> list[tuple[str, ...]]:
    """The chosen members for each IPC index (members kept in pool order).

    ``fixed``: one list for every index (config's ``fixed`` or the ``k`` highest priors);
    ``cycle``: index ``i`` takes the ``i``-th of the ``C(n, k)`` combinations in pool order;
    ``random``: a seeded sample per index; ``auto``: the paper's rule — fixed at IPC 1, cycle while
    the combinations last (IPC 10 with 5 members and k = 2), random beyond.
    """
    pool = list(pool)
    if not 1 <= k <= len(pool):
        raise ValueError(f"committee.k={k} must be between 1 and the pool size {len(pool)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"committee.schedule={schedule!r}; choose from {SCHEDULES}")
    combos = list(itertools.combinations(pool, k))
    if schedule == "auto":
        schedule = "fixed" if ipc == 1 else "cycle" if ipc <= len(combos) else "random"
    if schedule == "fixed":
        chosen = list(fixed) if fixed else sorted(pool, key=lambda m: (-priors[m], pool.index(m)))[:k]
        unknown = set(chosen) - set(pool)
        if unknown or len(chosen) != k:
            raise ValueError(f"committee.fixed={chosen} must name {k} members of the pool {pool}")
        return [tuple(sorted(chosen, key=pool.index))] * ipc
    if schedule == "cycle":
        return [combos[i % len(combos)] for i in range(ipc)]
    out = []
    for i in range(ipc):
        rng = np.random.default_rng([seed, i, 0x5E1EC7])
        picked = rng.choice(len(pool), size=k, replace=False)
        out.append(tuple(pool[j] for j in sorted(picked)))
    return out


def voting_weights(
    members: Sequence[str], priors: dict[str, float], weighting: str, temperature: float, seed_parts: Sequence[int]
) -> list[float]:
    """``softmax(α / T)`` over the chosen members: α = priors (``prior``), uniform random (``random``), or equal."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"committee.weighting={weighting!r}; choose from {WEIGHTINGS}")
    if weighting == "equal":
        return [1.0 / len(members)] * len(members)
    if weighting == "prior":
        alpha = torch.tensor([float(priors[m]) for m in members], dtype=torch.float64)
    else:
        alpha = torch.from_numpy(np.random.default_rng([*seed_parts, 0xA1FA]).uniform(0, 100, len(members)))
    return torch.softmax(alpha / temperature, dim=0).tolist()


@dataclass
class _BNCapture:
    """Per-forward state the BN taps write into: units in the batch and the per-unit losses."""

    units: int = 1
    active: bool = False  # taps record only inside Committee.losses, not on other forwards
    losses: list[torch.Tensor] = field(default_factory=list)


def _after_norm(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``bn``'s forward does after normalising: nothing for torch's layers, dropout and activation for
    timm's ``BatchNormAct2d`` (DenseNet). Other subclasses may do anything, so they are refused."""
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        return lambda out: out
    if type(bn) is BatchNormAct2d:
        return lambda out: bn.act(bn.drop(out))
    raise TypeError(
        f"committee members' BatchNorm layers must be torch's BatchNorm1d/2d/3d or timm's BatchNormAct2d, not "
        f"{type(bn).__qualname__}: recover replaces their forward to read the input statistics"
    )


class _BNTap(nn.Module):
    """Stands in for one of a member's BatchNorm layers: the same output, and inside :meth:`Committee.losses`
    also the layer's per-unit term ``scale (‖μ − μ^run‖₂ + ‖σ² − σ²^run‖₂)`` of its input, in one fused
    autograd step (:class:`~cvdd.moments.BatchNormMoments`)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, capture: _BNCapture, scale: float):
        super().__init__()
        self.bn = bn
        self.after = _after_norm(bn)
        self.capture = capture
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.capture.active:
            return self.bn(x)
        out, mean, var = BatchNormMoments.apply(x, self.bn, self.capture.units)
        loss = torch.linalg.vector_norm(mean - self.bn.running_mean, dim=1) + torch.linalg.vector_norm(
            var - self.bn.running_var, dim=1
        )
        self.capture.losses.append(self.scale * loss)
        return self.after(out)


class Committee(nn.Module):
    """Frozen members whose BatchNorm layers report their input statistics; :meth:`losses` gives per-unit CE and
    BN terms.

    A forward pass of a stacked batch of ``U`` units (unit-major) computes, in every
    ``_BatchNorm`` layer ``l``, the mean and biased variance of its input over each unit and
    accumulates ``s_l (‖μ_l − μ_l^run‖₂ + ‖σ²_l − σ²_l^run‖₂)`` per unit, ``s_1`` = first-BN multiplier.
    Members stay in eval mode, so a unit's outputs do not depend on the other units in the batch. Each member
    runs in its own ``numerics`` (:mod:`cvdd.precision`); statistics and losses are fp32.
    """

    def __init__(
        self,
        members: dict[str, nn.Module],
        priors: dict[str, float],
        first_bn_multiplier: float = 10.0,
        numerics: Mapping[str, Numerics] | None = None,
    ):
        super().__init__()
        self.numerics = {name: (numerics or {}).get(name, FP32) for name in members}
        self.members = nn.ModuleDict({name: self.numerics[name].prepare(net) for name, net in members.items()})
        self.priors = dict(priors)
        self.first_bn_multiplier = first_bn_multiplier
        self._capture: dict[str, _BNCapture] = {}
        for name, net in self.members.items():
            bns = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if not bns:
                raise ValueError(f"committee member {name} has no BatchNorm layer to match statistics with")
            capture = self._capture[name] = _BNCapture()
            for i, (path, bn) in enumerate(bns):
                parent, _, attr = path.rpartition(".")
                scale = first_bn_multiplier if i == 0 else 1.0
                setattr(net.get_submodule(parent), attr, _BNTap(bn, capture, scale))
            net.eval()
            net.requires_grad_(False)

    def train(self, mode: bool = True) -> Committee:
        # Frozen teachers are never put in train mode, whatever the training loop does.
        super().train(False)
        return self

    def assert_frozen(self) -> None:
        for name, net in self.members.items():
            if any(m.training for m in net.modules()):
                raise AssertionError(f"committee member {name} left eval mode")

    def losses(self, name: str, images: torch.Tensor, labels: torch.Tensor, units: int) -> tuple[torch.Tensor, ...]:
        """Per-unit ``(CE, R_bn)`` of member ``name`` on ``images`` (U·B, C, H, W), unit-major."""
        capture = self._capture[name]
        capture.units, capture.losses, capture.active = units, [], True
        try:
            logits = self.numerics[name].forward(self.members[name], images)
        finally:
            capture.active = False
        ce = F.cross_entropy(logits, labels, reduction="none").reshape(units, -1).mean(dim=1)
        bn = torch.stack(capture.losses).sum(dim=0)
        capture.losses = []
        return ce, bn


def load_committee(
    root: Path,
    dataset: str,
    members: Sequence[str],
    classes: Sequence[str],
    priors: dict[str, float] | None,
    first_bn_multiplier: float,
    numerics: Callable[[str], Numerics] | None = None,
) -> Committee:
    """The pool's teachers from ``<root>/<dataset>/teachers``; priors default to their test top-1; ``numerics``
    maps a member's architecture (its ``build_model`` name) to the numerics it runs in (default fp32)."""
    nets, scores, chosen = {}, {}, {}
    for name in members:
        net, record = load_teacher(TeacherArtifact(root, dataset, name), classes)
        nets[name] = net
        scores[name] = float(priors[name]) if priors and name in priors else float(record["test_top1"])
        chosen[name] = numerics(record["net"]["name"]) if numerics else FP32
    return Committee(nets, scores, first_bn_multiplier, chosen)
