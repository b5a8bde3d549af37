"""The squeeze job: train one teacher and publish it as ``teachers/<model>.{ckpt,json}``.

Idempotent and resumable: an artifact made by the same recipe is a no-op (``overwrite=true``
retrains); an interrupted run continues from the ``last.ckpt`` in a work folder keyed by the
recipe's fingerprint, so a changed recipe never resumes a stale run.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import (
    ArtifactConflictError,
    ArtifactCorruptError,
    TeacherArtifact,
    damaged_files,
    ensure_writable,
    file_digest,
    fingerprint,
    load_json,
    save_json,
    save_tensors,
)
from cvdd.hardware import numerics_for
from cvdd.jobs.common import build_trainer, finish_loggers, log
from cvdd.metrics import evaluate_classifier
from cvdd.models.pretrained import load_imagenet_weights
from cvdd.precision import Numerics

LOCATION_KEYS = ("root", "download", "download_root")


def dataset_identity(dataset: DictConfig) -> dict[str, Any]:
    """The dataset keys that change what is trained on (not where it lives, not stage recipes)."""
    node = OmegaConf.to_container(dataset, resolve=True)
    return {k: v for k, v in node.items() if k not in LOCATION_KEYS and not isinstance(v, dict | list)}


def squeeze_recipe(cfg: DictConfig, numerics: Numerics) -> dict[str, Any]:
    """Everything that determines the trained weights, including the numerics the hardware settings resolve to
    (bf16 or fp32, memory format); logging, paths and device counts excluded."""
    module = OmegaConf.to_container(cfg.module, resolve=True)
    return {
        "dataset": dataset_identity(cfg.dataset),
        "model": OmegaConf.to_container(cfg.model.net, resolve=True),
        "pretrained": bool(cfg.model.get("pretrained", False)),
        "squeeze": OmegaConf.to_container(cfg.squeeze, resolve=True),
        "module": module,
        "numerics": numerics.tag,
        "seed": int(cfg.seed),
    }


def _existing_record(artifact: TeacherArtifact, recipe_hash: str, overwrite: bool) -> dict | None:
    """The finished teacher of this recipe, or ``None`` to train (none yet, ``overwrite``, or damaged files)."""
    if overwrite or not artifact.exists():
        return None
    try:
        record = load_json(artifact.record)
    except ArtifactCorruptError:
        log.warning("teacher record %s is damaged; training %s again", artifact.record, artifact.model)
        return None
    if record.get("fingerprint") == recipe_hash:
        if damaged_files(artifact.folder, record.get("files", {})):
            log.warning("teacher weights %s are damaged; training %s again", artifact.weights, artifact.model)
            return None
        return record
    raise ArtifactConflictError(
        f"{artifact.weights} exists but was trained with a different recipe "
        f"(fingerprint {record.get('fingerprint')} vs {recipe_hash} now).\n"
        f"  Keep it: run with the recipe recorded in {artifact.record}\n"
        f"  Replace it: add overwrite=true"
    )


def squeeze_teacher(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and write the teacher artifact (rank 0 returns its record)."""
    artifact = TeacherArtifact(Path(cfg.paths.artifacts), cfg.dataset.name, cfg.model.id)
    numerics = numerics_for(cfg, cfg.model.net.name, "squeeze")
    recipe = squeeze_recipe(cfg, numerics)
    recipe_hash = fingerprint(recipe)
    existing = _existing_record(artifact, recipe_hash, bool(cfg.get("overwrite", False)))
    if existing is not None:
        log.info(
            "teacher %s exists with the same recipe (test top-1 %.2f%%); nothing to do. "
            "Pass overwrite=true to retrain.",
            artifact.weights,
            existing["test_top1"],
        )
        return existing

    epochs = int(cfg.squeeze.epochs)
    if epochs < 0 or (epochs == 0 and not recipe["pretrained"]):
        raise ValueError(
            f"squeeze.epochs={epochs} trains nothing; give squeeze.epochs > 0, or model.pretrained=true to "
            f"publish torchvision's ImageNet weights as they are"
        )
    ensure_writable(artifact.folder)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    spec = datamodule.spec
    net = instantiate(cfg.model.net, num_classes=spec.num_classes, image_size=spec.image_size, in_chans=spec.channels)
    pretrained = None
    if recipe["pretrained"]:
        pretrained = load_imagenet_weights(
            net, cfg.model.net.name, spec.image_size, spec.channels, cfg.model.net.get("width")
        )
        log.info("%s starts from %s (%s)", cfg.model.id, pretrained["weights"], pretrained["file"])
    # a partial, so the numerics reach the module as they are rather than as a config node
    module = instantiate(cfg.module, _partial_=True)(net=net, numerics=numerics)
    work_dir = artifact.work_dir(recipe_hash)
    # monitor=None, save_top_k=1: one rolling checkpoint of the latest epoch, named last.ckpt
    checkpoint = ModelCheckpoint(dirpath=work_dir, filename="last", save_top_k=1, enable_version_counter=False)
    trainer, loggers = build_trainer(cfg, extra_callbacks=[checkpoint])
    last = work_dir / "last.ckpt"
    if last.is_file():
        log.info("resuming %s from %s", cfg.model.id, last)

    started = time.time()
    try:
        if epochs > 0:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        if trainer.interrupted:
            raise RuntimeError(f"training of {cfg.model.id} was interrupted; run the same command to resume")
        if not trainer.is_global_zero:
            return {}
        datamodule.setup("test")
        test = evaluate_classifier(
            module.net, datamodule.test_dataloader(), spec.num_classes, device=trainer.strategy.root_device
        )
        record = {
            "model": cfg.model.id,
            "net": recipe["model"],
            "dataset": cfg.dataset.name,
            "classes": datamodule.classes,
            "class_names": datamodule.data.class_names,
            "num_classes": spec.num_classes,
            "image_size": spec.image_size,
            "in_chans": spec.channels,
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "test_samples": test["samples"],
            "epochs": int(trainer.current_epoch),
            "pretrained": pretrained,
            "seed": int(cfg.seed),
            "wall_seconds": round(time.time() - started, 2),
            "fingerprint": recipe_hash,
            "recipe": recipe,
            "weights": artifact.weights.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        state = {k: v.detach().cpu() for k, v in module.net.state_dict().items()}
        save_tensors(artifact.weights, state)
        record["files"] = {artifact.weights.name: file_digest(artifact.weights)}
        save_json(artifact.record, record)
        artifact.remove_work_dir(recipe_hash)
        log.info(
            "teacher %s on %s: test top-1 %.2f%%, top-5 %.2f%% after %d epochs in %.1fs -> %s",
            cfg.model.id,
            cfg.dataset.name,
            test["top1"],
            test["top5"],
            record["epochs"],
            record["wall_seconds"],
            artifact.weights,
        )
        return record
    finally:
        finish_loggers(loggers)
