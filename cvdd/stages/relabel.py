"""The relabel job: a distilled set + teachers + epoch plan → one soft-label file per epoch.

Epochs are sharded across ranks and written atomically as they finish; a restarted run
skips finished epochs. The plan itself is not stored: its seed and checksum are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cvdd.artifacts import (
    ArtifactConflictError,
    ensure_writable,
    file_digest,
    fingerprint,
    load_json,
    load_json_if_intact,
    save_json,
    save_tensors,
)
from cvdd.artifacts.labels import PLAN_KEY, LabelArtifact, check_storage, pack_logits, payload_bytes
from cvdd.artifacts.ownership import exclusive, set_aside
from cvdd.committee.passes import plan_passes
from cvdd.config.checks import check_settings
from cvdd.labels.module import RelabelModule
from cvdd.labels.plan import EpochPlan
from cvdd.labels.protocol import (
    build_plan,
    label_settings,
    labels_of,
    relabel_committee,
    relabel_numerics,
    teacher_weights,
)
from cvdd.labels.student_set import StudentSet, student_set
from cvdd.report.summary import LABEL_KEYS, next_command, size_on_disk, stage_summary
from cvdd.runtime.distributed import HydraDDPStrategy
from cvdd.runtime.finite import require_finite
from cvdd.runtime.hardware import check_same_threads, cpu_threads
from cvdd.runtime.trainer import log_final, stage_trainer
from cvdd.stages.outline import finished_artifact, stamped
from cvdd.stages.priors import measure_member


def relabel(cfg: DictConfig) -> dict[str, Any]:
    """Write the soft labels of ``cfg``'s distilled set; returns the manifest on rank 0."""
    check_settings(cfg)
    root = Path(cfg.paths.artifacts)
    chosen = student_set(cfg, root)
    check_storage(cfg.relabel.dtype, cfg.relabel.get("topk"))
    artifact = labels_of(cfg, root, chosen)
    with exclusive(artifact.folder, "labels"):
        return write_labels(cfg, root, chosen, artifact)


def write_labels(cfg: DictConfig, root: Path, chosen: StudentSet, artifact: LabelArtifact) -> dict[str, Any]:
    """The labels of ``chosen`` into ``artifact`` (its lock held), unless finished labels of this recipe are
    there."""
    ensure_writable(artifact.folder)
    weights = teacher_weights(cfg, root, "reuse", measure_member)  # records only: weights load when there is work
    plan = build_plan(cfg, len(chosen))
    recipe = {
        "distilled": chosen.fingerprint,
        "plan": plan.identity(),
        "teachers": weights,
        "seed": int(cfg.seed),
        "relabel": OmegaConf.to_container(cfg.relabel, resolve=True),
        "numerics": relabel_numerics(cfg, root, list(weights)),
    }
    recipe_hash = fingerprint(recipe)
    # sizes only: a finished run is recognised without reading its labels (30 GB at ImageNet-1K IPC 50); validate
    # checks each epoch's digest when it reads the epoch
    overwrite = bool(cfg.overwrite)
    manifest = finished_artifact(
        artifact.manifest, recipe_hash, overwrite=overwrite, what="labels", hashes=False, folder=artifact.folder
    )
    if manifest is not None:
        return manifest
    check_partial_labels(artifact, recipe_hash)
    started = time.time()
    with stage_trainer(cfg) as (trainer, loggers):
        threads = write_epochs(cfg, trainer, artifact, chosen, weights, plan, recipe_hash)
        if trainer.global_rank != 0:
            return {}
        fields = {
            **label_settings(cfg, weights, plan, chosen),
            "epochs": plan.epochs,
            "batch_size": plan.batch_size,
            "mix": plan.mix,
            "fingerprint": recipe_hash,
            "cpu_threads": threads,
            "numerics": recipe["numerics"],
        }
        manifest = stamped(
            {**set_fields(cfg, chosen), **fields, **storage_fields(artifact, plan, chosen)}, cfg, started
        )
        save_json(artifact.manifest, manifest)
        report_labels(loggers, artifact, manifest, chosen, weights)
        return manifest


def check_partial_labels(artifact: LabelArtifact, recipe_hash: str) -> None:
    """Epochs a stopped run left are resumed only under their recipe's stamp: another recipe's are refused, and
    epochs whose stamp is damaged (of an unknown recipe) are set aside to be labelled again."""
    stamp = artifact.stamp
    redo = "the epochs beside it are of an unknown recipe: labelling every epoch again"
    recorded = load_json_if_intact(stamp, redo, keys=("fingerprint",))
    if recorded is None and stamp.is_file():
        set_aside(artifact.folder)
        ensure_writable(artifact.folder)
    elif recorded is not None and recorded["fingerprint"] != recipe_hash:
        raise ArtifactConflictError(f"{artifact.folder} holds partial labels of another recipe; add overwrite=true")


def write_epochs(
    cfg: DictConfig,
    trainer,
    artifact: LabelArtifact,
    chosen: StudentSet,
    weights: dict[str, float],
    plan: EpochPlan,
    recipe_hash: str,
) -> int | None:
    """Every planned epoch not yet on disk, sharded across ranks (rank r takes epochs r, r + W, …), each written
    atomically as it finishes; returns the teacher passes' CPU thread count (a resume at another is refused)."""
    root, stamp, overwrite = Path(cfg.paths.artifacts), artifact.stamp, bool(cfg.overwrite)
    if isinstance(trainer.strategy, HydraDDPStrategy):
        trainer.strategy.wrap_model = False
    workers, threads = plan_passes(cfg.hardware.get("member_threads"), cpu_threads(trainer), len(weights))
    todo = [e for e in range(plan.epochs) if overwrite or not (artifact.epoch_path(e).is_file() and stamp.is_file())]
    if len(todo) < plan.epochs:
        check_same_threads(
            load_json(stamp).get("cpu_threads"), threads, f"labels {artifact.folder} (their teacher passes)"
        )
    if trainer.global_rank == 0:
        save_json(stamp, {"fingerprint": recipe_hash, "cpu_threads": threads})
    topk = cfg.relabel.get("topk")

    def save_epoch(epoch: int, logits: torch.Tensor, plan_digest: bytes) -> None:
        require_finite(
            logits,
            f"the soft labels of epoch {epoch}",
            str(artifact.folder),
            "relabel.temperature (> 0), committee.priors and the teachers (their checkpoints' test top-1)",
        )
        payload = pack_logits(logits, cfg.relabel.dtype, topk)
        payload[PLAN_KEY] = torch.frombuffer(bytearray(plan_digest), dtype=torch.uint8)
        save_tensors(artifact.epoch_path(epoch), payload)

    if todo:
        committee = relabel_committee(cfg, root, chosen.classes, weights)
        module = RelabelModule(
            committee.members,
            weights,
            images=chosen.read,
            plan=plan,
            on_epoch_done=save_epoch,
            bssl=bool(cfg.relabel.bssl),
            halves=bool(cfg.relabel.halves),
            numerics=committee.numerics,
            stack_images=int(cfg.relabel.stack_images),
            member_workers=workers,
        )
        mine = todo[trainer.global_rank :: trainer.world_size]
        trainer.predict(module, DataLoader(mine, batch_size=None), return_predictions=False)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return threads


def set_fields(cfg: DictConfig, chosen: StudentSet) -> dict[str, Any]:
    return {
        "name": chosen.name,
        "method": chosen.method,
        "ipc": chosen.ipc,
        "dataset": cfg.dataset.name,
        "classes": chosen.classes,
    }


def storage_fields(artifact: LabelArtifact, plan: EpochPlan, chosen: StudentSet) -> dict[str, Any]:
    """Every epoch file's digest, and what an image's labels cost per epoch on disk and as label payload."""
    files = {artifact.epoch_path(e).name: file_digest(artifact.epoch_path(e)) for e in range(plan.epochs)}
    payload = payload_bytes(torch.load(artifact.epoch_path(0), weights_only=True))
    return {
        "files": files,
        "bytes_per_image_per_epoch": artifact.epoch_path(0).stat().st_size / len(chosen),
        "payload_bytes_per_image_per_epoch": payload / len(chosen),
    }


def report_labels(
    loggers: list, artifact: LabelArtifact, manifest: dict[str, Any], chosen: StudentSet, weights: dict[str, float]
) -> None:
    """The labels' size to the loggers and the stage summary."""
    log_final(
        loggers,
        {
            "labels/epochs": manifest["epochs"],
            "labels/bytes_on_disk": sum(d["bytes"] for d in manifest["files"].values()),
            "labels/bytes_per_image_per_epoch": manifest["bytes_per_image_per_epoch"],
            "labels/payload_bytes_per_image_per_epoch": manifest["payload_bytes_per_image_per_epoch"],
        },
    )
    stage_summary(
        "relabel",
        [
            ("labels", f"{artifact.folder} ({size_on_disk(artifact.folder)})"),
            ("epochs", f"{manifest['epochs']} of {len(chosen)} images ({chosen.method}, IPC {chosen.ipc})"),
            ("teachers", ", ".join(f"{t} {w:.2f}" for t, w in weights.items())),
            (
                "storage",
                f"{manifest['bytes_per_image_per_epoch']:.1f} bytes per image per epoch on disk, "
                f"{manifest['payload_bytes_per_image_per_epoch']:.1f} of them labels",
            ),
        ],
        manifest["wall_seconds"],
        next_command("evaluate.py", LABEL_KEYS),
    )
