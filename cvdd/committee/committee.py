"""The committee: frozen teachers, their BN-statistic hooks, member selection and voting weights.

Notation follows CV-DD: a pool of ``n`` members, ``k`` chosen per synthetic unit, voting
weights ``w = softmax(α / T)`` over the chosen members' prior scores ``α``.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from cvdd.artifacts import TeacherArtifact, load_tensors
from cvdd.committee.moments import group_moments
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError
from cvdd.runtime.precision import FP32, Numerics

SCHEDULES = ("fixed", "cycle", "random", "auto")
WEIGHTINGS = ("prior", "equal", "random")


class ClassOrderMismatchError(ValueError):
    """A teacher was trained with another class order or class count than the dataset has now."""


def load_teacher(artifact: TeacherArtifact, classes: Sequence[str]) -> tuple[nn.Module, dict]:
    """Rebuild a squeezed teacher from its record, load its weights, and check its class order."""
    record = artifact.read_record()
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
        raise ConfigError(f"committee.k={k} must be between 1 and the pool size {len(pool)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"committee.schedule={schedule!r}; choose from {SCHEDULES}")
    combos = list(itertools.combinations(pool, k))
    if schedule == "auto":
        schedule = "fixed" if ipc == 1 else "cycle" if ipc <= len(combos) else "random"
    if schedule == "fixed":
        chosen = list(fixed) if fixed else sorted(pool, key=lambda m: (-priors[m], pool.index(m)))[:k]
        unknown = set(chosen) - set(pool)
        if unknown or len(chosen) != k:
            raise ConfigError(f"committee.fixed={chosen} must name {k} members of the pool {pool}")
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
        raise ConfigError(f"committee.weighting={weighting!r}; choose from {WEIGHTINGS}")
    if weighting == "equal":
        return [1.0 / len(members)] * len(members)
    if weighting == "prior":
        alpha = torch.tensor([float(priors[m]) for m in members], dtype=torch.float64)
    else:
        alpha = torch.from_numpy(np.random.default_rng([*seed_parts, 0xA1FA]).uniform(0, 100, len(members)))
    return torch.softmax(alpha / temperature, dim=0).tolist()


NEARLY_EQUAL = 1.5  # largest / smallest pool weight below which prior weighting is in effect equal voting
_warned: set[tuple] = set()


def warn_if_nearly_equal(scores: Mapping[str, float], temperature: float, key: str) -> None:
    """Warn once per process when teacher accuracies (no priors given) make ``softmax(α / T)`` over the pool nearly
    uniform: CV-DD's prior weighting then degrades to the ``equal`` voting the paper reports as weaker.

    (Fashion-MNIST's pool at 91.0–92.6 % gives 1.38 at T = 5 and 1.17 at T = 10; the paper's CIFAR-10 priors give
    a pair up to 0.75 / 0.25 at T = 5: 68.5 against 63.)"""
    if len(scores) < 2:
        return
    weights = voting_weights(list(scores), dict(scores), "prior", temperature, ())
    spread = max(weights) / min(weights) if min(weights) > 0 else math.inf
    seen = (key, tuple(sorted(scores.items())), temperature)
    if spread >= NEARLY_EQUAL or seen in _warned:
        return
    _warned.add(seen)
    log.warning(
        "%s: no priors given, so the teachers' test accuracies (%s) weight the votes; at T = %g the largest pool "
        "weight is only %.2f× the smallest, nearly equal voting. Measure the paper's priors (a student per member "
        "on the set it distilled alone) with committee.priors=measured",
        key,
        ", ".join(f"{m} {s:.1f}" for m, s in scores.items()),
        temperature,
        spread,
    )


class UnitMoments(torch.autograd.Function):
    """Per-unit, per-channel mean and biased variance of a ``(U·B, C, H, W)`` activation, in fp32 whatever the
    activation's dtype or memory format.

    Written out because this is a third of a recover step done naively: the forward is
    :func:`~cvdd.committee.moments.group_moments` (sums along memory order, not a strided ``var_mean``), and autograd's
    graph for ``((x − μ)²).mean()`` would make five elementwise passes in the backward where one fused pass
    does: ``∂/∂x = a·x + b`` with ``a = 2·g_var / n`` and ``b = g_mean / n − a·μ`` per unit and channel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = group_moments(x, units)
        ctx.save_for_backward(x, mean)
        ctx.units = units
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, mean = ctx.saved_tensors
        per_unit = x.unflatten(0, (ctx.units, -1))
        n = per_unit.shape[1] * per_unit.shape[3] * per_unit.shape[4]
        a = 2.0 * grad_var / n
        b = grad_mean / n - a * mean
        shape = (ctx.units, 1, -1, 1, 1)
        grad = torch.addcmul(b.view(shape), a.view(shape), per_unit)
        return grad.to(x.dtype).flatten(0, 1), None


class _BNCapture(threading.local):
    """Per-forward state the BN hooks write into: units in the batch and the per-unit losses. Thread-local, so
    passes of one member in several threads at once (:mod:`cvdd.committee.passes`) keep their own."""

    def __init__(self) -> None:
        self.units = 1
        self.active = False  # hooks record only inside Committee.losses, not on other forwards
        self.losses: list[torch.Tensor] = []


class Committee(nn.Module):
    """Frozen members with BN-statistic hooks; :meth:`losses` gives per-unit CE and BN terms.

    A forward pass of a stacked batch of ``U`` units (unit-major) computes, in every
    ``_BatchNorm`` layer ``l``, the mean and biased variance of its input over each unit and
    accumulates ``s_l (‖μ_l − μ_l^run‖₂ + ‖σ²_l − σ²_l^run‖₂)`` per unit, ``s_1`` = first-BN multiplier.
    Members stay in eval mode, so a unit's outputs do not depend on the other units in the batch. Each member
    runs in its own ``numerics`` (:mod:`cvdd.runtime.precision`); statistics and losses are fp32.
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
            net.eval()
            net.requires_grad_(False)
            bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if not bns:
                raise ConfigError(f"committee member {name} has no BatchNorm layer to match statistics with")
            capture = self._capture[name] = _BNCapture()
            for i, bn in enumerate(bns):
                scale = first_bn_multiplier if i == 0 else 1.0
                bn.register_forward_hook(self._bn_hook(capture, scale))

    @property
    def numerics_tags(self) -> dict[str, str]:
        """Each member's numerics as a recipe records them (``bf16_cl``, ``fp32``)."""
        return {name: n.tag for name, n in self.numerics.items()}

    @staticmethod
    def _bn_hook(capture: _BNCapture, scale: float):
        def hook(module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            if not capture.active:
                return
            mean, var = UnitMoments.apply(inputs[0], capture.units)
            loss = torch.linalg.vector_norm(mean - module.running_mean, dim=1) + torch.linalg.vector_norm(
                var - module.running_var, dim=1
            )
            capture.losses.append(scale * loss)

        return hook

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
