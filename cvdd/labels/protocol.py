"""The soft-label protocol relabel writes and validate checks: the labelling teachers and their weights, the
epoch plan, and the settings that define a label set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cvdd.artifacts import TeacherArtifact
from cvdd.artifacts.labels import LabelArtifact, label_artifact
from cvdd.committee.committee import Committee, load_committee, voting_weights, warn_if_nearly_equal
from cvdd.committee.priors import MeasureMember, Use, configured_priors
from cvdd.config.compose import model_config
from cvdd.data import dataset_spec
from cvdd.labels.plan import EpochPlan
from cvdd.labels.student_set import StudentSet
from cvdd.runtime.errors import MissingInputError
from cvdd.runtime.hardware import numerics_for


def labels_of(cfg: DictConfig, root: Path, chosen: StudentSet) -> LabelArtifact:
    """Where the labels of ``chosen`` under this run's storage settings live (relabel writes, validate reads)."""
    return label_artifact(root, cfg.dataset.name, chosen.name, chosen.image_format, cfg.relabel.get("topk"))


def relabel_teachers(cfg: DictConfig) -> list[str]:
    choice = cfg.relabel.teachers
    return list(cfg.committee.members) if choice == "committee" else [str(choice)]


def teacher_weights(
    cfg: DictConfig, root: Path, use: Use = "read", measure: MeasureMember | None = None
) -> dict[str, float]:
    """The relabelling teachers and their weights ``softmax(prior / relabel.temperature)``; priors from the
    config (paper presets), measured (``committee.priors=measured``: ``use`` as in :mod:`cvdd.committee.priors`; only
    relabel measures) or each teacher's recorded test top-1. Reads records only, no weights."""
    members = relabel_teachers(cfg)
    priors = configured_priors(cfg, root, use, measure) if len(members) > 1 else None
    scores = {}
    for member in members:
        model_config(member, "relabel.teachers ('committee' or a model id)")
        artifact = TeacherArtifact(root, cfg.dataset.name, member)
        if not artifact.exists():
            raise MissingInputError(
                f"teacher {member} for relabelling is missing from {artifact.folder}; squeeze it: "
                f"{artifact.train_command()}"
            )
        recorded = priors[member] if priors and member in priors else artifact.read_record()["test_top1"]
        scores[member] = float(recorded)
    if not priors:
        warn_if_nearly_equal(scores, float(cfg.relabel.temperature), "relabel.teachers=committee")
    weights = voting_weights(members, scores, "prior", float(cfg.relabel.temperature), ())
    return dict(zip(members, weights, strict=True))


def relabel_numerics(cfg: DictConfig, root: Path, members: list[str]) -> dict[str, str]:
    """The numerics tag each labelling teacher runs in, from its record alone (no weights are read)."""
    return {
        member: numerics_for(
            cfg, TeacherArtifact(root, cfg.dataset.name, member).read_record()["net"]["name"], "relabel"
        ).tag
        for member in members
    }


def relabel_committee(cfg: DictConfig, root: Path, classes: list[str], weights: dict[str, float]) -> Committee:
    """The relabelling teachers of ``weights`` (:func:`teacher_weights`), loaded and checked against the class
    order, each in its relabelling numerics."""
    return load_committee(
        root,
        cfg.dataset.name,
        list(weights),
        classes,
        None,
        first_bn_multiplier=1.0,
        numerics=lambda arch: numerics_for(cfg, arch, "relabel"),
    )


def label_settings(cfg: DictConfig, weights: dict[str, float], plan: EpochPlan, chosen: StudentSet) -> dict[str, Any]:
    """Everything that defines a label set: relabel records it in the manifest, validate refuses labels whose
    record differs from what it is asked for."""
    return {
        "teachers": weights,
        "bssl": bool(cfg.relabel.bssl),
        "halves": bool(cfg.relabel.halves),
        "temperature": float(cfg.relabel.temperature),
        "plan_seed": int(cfg.seed),
        "plan": plan.identity(),  # each epoch's own digest is stored with its labels and checked on use
        "dtype": str(cfg.relabel.dtype),
        "topk": cfg.relabel.get("topk"),
        "images_format": chosen.image_format,
        "images_fingerprint": chosen.fingerprint,
    }


def build_plan(cfg: DictConfig, num_images: int) -> EpochPlan:
    spec = dataset_spec(cfg.dataset)
    rel = cfg.relabel
    return EpochPlan(
        int(cfg.seed),
        num_images,
        int(rel.epochs),
        int(rel.batch_size),
        (spec.image_size, spec.image_size),
        rel.mix,
        tuple(rel.crop_scale),
        spec.hflip,
    )
