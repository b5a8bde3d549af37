"""Static soft labels (``evaluate.py labels=static``): one row of logits per image that came with an imported set
(DD-Ranking's soft-label mode ``S``), instead of this framework's labels per epoch and crop.

A planned batch mixes image ``i`` with its partner ``π(i)`` (CutMix/MixUp weight ``λ``), so its target is the same
mixture of the two images' distributions at the loss's temperature τ: the logits ``τ · log(λ · softmax(z_i / τ) +
(1 − λ) · softmax(z_π(i) / τ))``, whose softmax at τ is exactly that mixture.
"""

from __future__ import annotations

import math

import torch

from cvdd.artifacts import check_files, load_tensors
from cvdd.labels.plan import BatchPlan
from cvdd.labels.student_set import StudentSet
from cvdd.runtime.errors import MissingInputError


def read_static_labels(chosen: StudentSet) -> torch.Tensor:
    """The soft labels recorded with ``chosen`` (its manifest's ``static_soft_labels``), checked against their
    digest; a set without them is refused, naming what makes them."""
    recorded = chosen.manifest.get("static_soft_labels")
    if not recorded:
        raise MissingInputError(
            f"set {chosen.name} has no static soft labels: only a set imported from a tensor file with soft labels "
            "(method=external, 'soft_labels' (N, classes)) carries them; use labels=offline (after relabel.py), "
            "labels=online or labels=hard"
        )
    rebuild = f"import the set again (python distill.py method=external … set={chosen.name} overwrite=true)"
    files = {recorded["file"]: {"bytes": recorded["bytes"], "sha256": recorded["sha256"]}}
    check_files(chosen.artifact.folder, files, rebuild)
    soft = load_tensors(chosen.artifact.folder / recorded["file"], rebuild, files[recorded["file"]])["soft_labels"]
    if soft.shape != (len(chosen), len(chosen.classes)):
        raise MissingInputError(f"{recorded['file']} of set {chosen.name} holds {tuple(soft.shape)}; {rebuild}")
    return soft


def mixed_targets(soft: torch.Tensor, plan: BatchPlan, temperature: float) -> torch.Tensor:
    """The logits whose softmax at ``temperature`` is the batch's mixture of its images' static soft labels."""
    z = soft[plan.indices] / temperature
    own, partner = torch.log_softmax(z, 1), torch.log_softmax(z[plan.permutation], 1)
    if plan.lam >= 1.0 or plan.lam <= 0.0:  # one image's label only
        return (own if plan.lam >= 1.0 else partner) * temperature
    weights = torch.tensor([math.log(plan.lam), math.log1p(-plan.lam)]).view(2, 1, 1)
    return torch.logsumexp(torch.stack([own, partner]) + weights, 0) * temperature


def static_labels(soft: torch.Tensor, temperature: float):
    """The student's target reader (:data:`cvdd.training.student.SoftLabels`) over static soft labels."""

    def labels(_epoch: int, _b: int, plan: BatchPlan, _whole) -> torch.Tensor:
        return mixed_targets(soft, plan, temperature)

    return labels
