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
    damaged_files,
    ensure_writable,
    file_digest,
    fingerprint,
    load_json,
    save_json,
    save_tensors,
)
from cvdd.artifacts.label_store import PLAN_KEY, check_storage, pack_logits, payload_bytes
from cvdd.committee.passes import plan_passes
from cvdd.labels.module import RelabelModule
from cvdd.labels.protocol import (
    build_plan,
    label_settings,
    labels_of,
    relabel_committee,
    relabel_numerics,
    teacher_weights,
)
from cvdd.labels.student_set import student_set
from cvdd.report.summary import LABEL_KEYS, next_command, size_on_disk, stage_summary
from cvdd.runtime import log
from cvdd.runtime.distributed import HydraDDPStrategy
from cvdd.runtime.errors import ConfigError
from cvdd.runtime.hardware import check_same_threads, cpu_threads
from cvdd.runtime.trainer import log_final, stage_trainer
from cvdd.stages.priors import measure_member


def relabel(cfg: DictConfig) -> dict[str, Any]:
    """Write the soft labels of ``cfg``'s distilled set; returns the manifest on rank 0."""
    root = Path(cfg.paths.artifacts)
    chosen = student_set(cfg, root)
    name, classes = chosen.name, chosen.classes
    topk = cfg.relabel.get("topk")
    check_storage(cfg.relabel.dtype, topk)
    if int(cfg.relabel.stack_images) < 1:
        raise ConfigError(
            f"relabel.stack_images={cfg.relabel.stack_images} must be at least 1 (images per forward pass)"
        )
    artifact = labels_of(cfg, root, chosen)
    ensure_writable(artifact.folder)
    weights = teacher_weights(cfg, root, "reuse", measure_member)  # records only: weights load when there is work
    plan = build_plan(cfg, len(chosen))
    settings = label_settings(cfg, weights, plan, chosen)
    recipe = {
        "distilled": chosen.fingerprint,
        "plan": plan.identity(),
        "teachers": weights,
        "seed": int(cfg.seed),
        "relabel": OmegaConf.to_container(cfg.relabel, resolve=True),
        "numerics": relabel_numerics(cfg, root, list(weights)),
    }
    recipe_hash = fingerprint(recipe)
    if artifact.manifest.is_file() and not cfg.overwrite:
        manifest = load_json(artifact.manifest)
        if manifest["fingerprint"] != recipe_hash:
            raise ArtifactConflictError(f"{artifact.folder} holds labels of another recipe; add overwrite=true")
        # sizes only: a finished run is recognised without reading its labels (30 GB at ImageNet-1K IPC 50);
        # evaluate checks each epoch's digest when it reads the epoch
        damaged = damaged_files(artifact.folder, manifest.get("files", {}), hashes=False)
        if not damaged:
            log.info("labels %s exist with the same recipe; nothing to do", artifact.folder)
            return manifest
        log.warning(
            "labels %s: %d damaged file(s), %s first; recomputing them", artifact.folder, len(damaged), damaged[0]
        )
        for damaged_name in damaged:  # every rank, before any starts work: the others only find them gone
            (artifact.folder / damaged_name).unlink(missing_ok=True)
        artifact.manifest.unlink(missing_ok=True)
    stamp = artifact.stamp
    if stamp.is_file() and load_json(stamp)["fingerprint"] != recipe_hash and not cfg.overwrite:
        raise ArtifactConflictError(f"{artifact.folder} holds partial labels of another recipe; add overwrite=true")

    def done(epoch: int) -> bool:
        return artifact.epoch_path(epoch).is_file() and stamp.is_file() and not cfg.overwrite

    def save_epoch(epoch: int, logits: torch.Tensor, plan_digest: bytes) -> None:
        payload = pack_logits(logits, cfg.relabel.dtype, topk)
        payload[PLAN_KEY] = torch.frombuffer(bytearray(plan_digest), dtype=torch.uint8)
        save_tensors(artifact.epoch_path(epoch), payload)

    started = time.time()
    with stage_trainer(cfg) as (trainer, loggers):
        if isinstance(trainer.strategy, HydraDDPStrategy):
            trainer.strategy.wrap_model = False
        workers, threads = plan_passes(cfg.hardware.get("member_threads"), cpu_threads(trainer))
        todo = [e for e in range(plan.epochs) if not done(e)]
        if len(todo) < plan.epochs:
            check_same_threads(
                load_json(stamp).get("cpu_threads"), threads, f"labels {artifact.folder} (their teacher passes)"
            )
        if trainer.global_rank == 0:
            save_json(stamp, {"fingerprint": recipe_hash, "cpu_threads": threads})
        mine = todo[trainer.global_rank :: trainer.world_size]
        if todo:
            committee = relabel_committee(cfg, root, classes, weights)
            module = RelabelModule(
                committee.members,
                weights,
                chosen.read,
                plan,
                save_epoch,
                bssl=bool(cfg.relabel.bssl),
                halves=bool(cfg.relabel.halves),
                numerics=committee.numerics,
                stack_images=int(cfg.relabel.stack_images),
                member_workers=workers,
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
            "method": chosen.method,
            "ipc": chosen.ipc,
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
            "bytes_per_image_per_epoch": bytes_per_epoch / len(chosen),
            "payload_bytes_per_image_per_epoch": payload / len(chosen),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        save_json(artifact.manifest, manifest)
        log_final(
            loggers,
            {
                "labels/epochs": plan.epochs,
                "labels/bytes_on_disk": sum(d["bytes"] for d in files.values()),
                "labels/bytes_per_image_per_epoch": manifest["bytes_per_image_per_epoch"],
                "labels/payload_bytes_per_image_per_epoch": manifest["payload_bytes_per_image_per_epoch"],
            },
        )
        stage_summary(
            "relabel",
            [
                ("labels", f"{artifact.folder} ({size_on_disk(artifact.folder)})"),
                ("epochs", f"{plan.epochs} of {len(chosen)} images ({chosen.method}, IPC {chosen.ipc})"),
                ("teachers", ", ".join(f"{t} {w:.2f}" for t, w in weights.items())),
                (
                    "storage",
                    f"{manifest['bytes_per_image_per_epoch']:.1f} bytes per image per epoch on disk, "
                    f"{manifest['payload_bytes_per_image_per_epoch']:.1f} of them labels",
                ),
            ],
            time.time() - started,
            next_command("evaluate.py", LABEL_KEYS),
        )
        return manifest
