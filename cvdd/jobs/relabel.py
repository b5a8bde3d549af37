"""The relabel job: a distilled set + teachers + epoch plan → one soft-label file per epoch.

Epochs are sharded across ranks and written atomically as they finish; a restarted run
skips finished epochs. The plan itself is not stored: its seed and checksum are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cvdd.artifacts import (
    ArtifactConflictError,
    NamedArtifact,
    TeacherArtifact,
    damaged_files,
    ensure_writable,
    file_digest,
    fingerprint,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)
from cvdd.augment import EpochPlan
from cvdd.committee import Committee, load_committee, voting_weights
from cvdd.compose import model_config
from cvdd.data import get_spec
from cvdd.distributed import HydraDDPStrategy
from cvdd.hardware import check_same_threads, cpu_threads, numerics_for
from cvdd.jobs.common import build_trainer, finish_loggers, log
from cvdd.jobs.sets import StudentSet, student_set
from cvdd.label_store import check_storage, pack_logits, payload_bytes, unpack_logits
from cvdd.relabel import RelabelModule


@dataclass(frozen=True)
class LabelArtifact(NamedArtifact):
    stage = "labels"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:04d}.pt"

    def read_epoch(self, epoch: int, recorded: dict[str, dict], rebuild: str) -> torch.Tensor:
        """Dense float32 logits of one epoch, whatever the stored format, checked against its recorded digest."""
        path = self.epoch_path(epoch)
        return unpack_logits(load_tensors(path, rebuild, recorded.get(path.name)))


def label_artifact(cfg: DictConfig, root: Path, set_name: str) -> LabelArtifact:
    """Labels live under the set's name; labels of the full-precision images (``<set>_float``) and top-k
    storage (``<set>_top<k>``) get their own folders beside the default ones."""
    name = set_name + ("_float" if cfg.distilled.format == "float" else "")
    topk = cfg.relabel.get("topk")
    return LabelArtifact(root, cfg.dataset.name, f"{name}_top{topk}" if topk else name)


def relabel_teachers(cfg: DictConfig) -> list[str]:
    choice = cfg.relabel.teachers
    return list(cfg.committee.members) if choice == "committee" else [str(choice)]


def teacher_weights(cfg: DictConfig, root: Path) -> dict[str, float]:
    """The relabelling teachers and their weights ``softmax(prior / relabel.temperature)``; priors from the
    config (paper presets) or each teacher's recorded test top-1. Reads records only, no weights."""
    members = relabel_teachers(cfg)
    priors = cfg.committee.get("priors") or {}
    scores = {}
    for member in members:
        model_config(member, "relabel.teachers ('committee' or a model id)")
        artifact = TeacherArtifact(root, cfg.dataset.name, member)
        if not artifact.exists():
            raise FileNotFoundError(
                f"teacher {member} for relabelling is missing from {artifact.folder}; squeeze it: "
                f"{artifact.train_command()}"
            )
        scores[member] = float(priors[member]) if member in priors else float(load_json(artifact.record)["test_top1"])
    weights = voting_weights(members, scores, "prior", float(cfg.relabel.temperature), ())
    return dict(zip(members, weights, strict=True))


def relabel_committee(cfg: DictConfig, root: Path, classes: list[str]) -> tuple[Committee, dict[str, float]]:
    """The relabelling teachers, loaded and checked against the class order, each in its relabelling numerics,
    with their weights."""
    weights = teacher_weights(cfg, root)
    committee = load_committee(
        root,
        cfg.dataset.name,
        list(weights),
        classes,
        None,
        first_bn_multiplier=1.0,
        numerics=lambda arch: numerics_for(cfg, arch, "relabel"),
    )
    return committee, weights


def label_settings(cfg: DictConfig, weights: dict[str, float], plan: EpochPlan, chosen: StudentSet) -> dict[str, Any]:
    """Everything that defines a label set: relabel records it in the manifest, evaluate refuses labels whose
    record differs from what it is asked for."""
    return {
        "teachers": weights,
        "bssl": bool(cfg.relabel.bssl),
        "halves": bool(cfg.relabel.halves),
        "temperature": float(cfg.relabel.temperature),
        "plan_seed": int(cfg.seed),
        "plan_checksum": plan.checksum(),
        "dtype": str(cfg.relabel.dtype),
        "topk": cfg.relabel.get("topk"),
        "images_format": chosen.image_format,
        "images_fingerprint": chosen.fingerprint,
    }


def build_plan(cfg: DictConfig, num_images: int) -> EpochPlan:
    spec = get_spec(cfg.dataset.name)
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


def relabel(cfg: DictConfig) -> dict[str, Any]:
    """Write the soft labels of ``cfg``'s distilled set; returns the manifest on rank 0."""
    root = Path(cfg.paths.artifacts)
    chosen = student_set(cfg, root)
    name, classes = chosen.name, chosen.classes
    topk = cfg.relabel.get("topk")
    check_storage(cfg.relabel.dtype, topk)
    if int(cfg.relabel.stack_images) < 1:
        raise ValueError(
            f"relabel.stack_images={cfg.relabel.stack_images} must be at least 1 (images per forward pass)"
        )
    artifact = label_artifact(cfg, root, name)
    ensure_writable(artifact.folder)
    committee, weights = relabel_committee(cfg, root, classes)
    plan = build_plan(cfg, len(chosen.images))
    settings = label_settings(cfg, weights, plan, chosen)
    recipe = {
        "distilled": chosen.fingerprint,
        "teachers": weights,
        "seed": int(cfg.seed),
        "relabel": OmegaConf.to_container(cfg.relabel, resolve=True),
        "numerics": {name: n.tag for name, n in committee.numerics.items()},
    }
    recipe_hash = fingerprint(recipe)
    if artifact.manifest.is_file() and not cfg.overwrite:
        manifest = load_json(artifact.manifest)
        if manifest["fingerprint"] != recipe_hash:
            raise ArtifactConflictError(f"{artifact.folder} holds labels of another recipe; add overwrite=true")
        damaged = damaged_files(artifact.folder, manifest.get("files", {}))
        if not damaged:
            log.info("labels %s exist with the same recipe; nothing to do", artifact.folder)
            return manifest
        log.warning(
            "labels %s: %d damaged file(s), %s first; recomputing them", artifact.folder, len(damaged), damaged[0]
        )
        for damaged_name in damaged:  # every rank, before any starts work: the others only find them gone
            (artifact.folder / damaged_name).unlink(missing_ok=True)
        artifact.manifest.unlink(missing_ok=True)
    stamp = artifact.folder / "recipe.json"
    if stamp.is_file() and load_json(stamp)["fingerprint"] != recipe_hash and not cfg.overwrite:
        raise ArtifactConflictError(f"{artifact.folder} holds partial labels of another recipe; add overwrite=true")

    def done(epoch: int) -> bool:
        return artifact.epoch_path(epoch).is_file() and stamp.is_file() and not cfg.overwrite

    def save_epoch(epoch: int, logits: torch.Tensor) -> None:
        save_tensors(artifact.epoch_path(epoch), pack_logits(logits, cfg.relabel.dtype, topk))

    trainer, loggers = build_trainer(cfg)
    try:
        if isinstance(trainer.strategy, HydraDDPStrategy):
            trainer.strategy.wrap_model = False
        threads = cpu_threads(trainer)
        todo = [e for e in range(plan.epochs) if not done(e)]
        if len(todo) < plan.epochs:
            check_same_threads(load_json(stamp).get("cpu_threads"), threads, f"labels {artifact.folder}")
        if trainer.global_rank == 0:
            save_json(stamp, {"fingerprint": recipe_hash, "cpu_threads": threads})
        mine = todo[trainer.global_rank :: trainer.world_size]
        if todo:
            module = RelabelModule(
                committee.members,
                weights,
                chosen.images,
                plan,
                save_epoch,
                bool(cfg.relabel.bssl),
                bool(cfg.relabel.halves),
                committee.numerics,
                int(cfg.relabel.stack_images),
            )
            trainer.predict(module, DataLoader(mine, batch_size=None), return_predictions=False)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if trainer.global_rank != 0:
            return {}
        files = {artifact.epoch_path(e).name: file_digest(artifact.epoch_path(e)) for e in range(plan.epochs)}
        bytes_per_epoch = artifact.epoch_path(0).stat().st_size
        payload = payload_bytes(torch.load(artifact.epoch_path(0), weights_only=True))
        manifest = {
            "name": name,
            "dataset": cfg.dataset.name,
            "classes": classes,
            **settings,
            "epochs": plan.epochs,
            "batch_size": plan.batch_size,
            "mix": plan.mix,
            "fingerprint": recipe_hash,
            "cpu_threads": threads,
            "numerics": recipe["numerics"],
            "files": files,
            "bytes_per_image_per_epoch": bytes_per_epoch / len(chosen.images),
            "payload_bytes_per_image_per_epoch": payload / len(chosen.images),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        save_json(artifact.manifest, manifest)
        log.info(
            "soft labels for %d epochs -> %s (%.1f bytes per image per epoch on disk, %.1f of them labels)",
            plan.epochs,
            artifact.folder,
            manifest["bytes_per_image_per_epoch"],
            manifest["payload_bytes_per_image_per_epoch"],
        )
        return manifest
    finally:
        finish_loggers(loggers)
