"""Teachers: train one and publish it as ``teachers/<model>.{ckpt,json}`` (the squeeze stage,
``python train.py``), and squeeze a committee's missing members before a stage needs them.

Idempotent and resumable: an artifact made by the same recipe is a no-op (``overwrite=true``
retrains); an interrupted run continues from the ``last.ckpt`` in a work folder keyed by the
recipe's fingerprint, so a changed recipe never resumes a stale run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import TeacherArtifact, ensure_writable, file_digest, fingerprint, save_json, save_tensors
from cvdd.artifacts.identity import dataset_identity
from cvdd.artifacts.ownership import exclusive
from cvdd.config.checks import check_settings
from cvdd.config.compose import compose_stage, select_overrides
from cvdd.models.pretrained import load_imagenet_weights
from cvdd.report.summary import TEACHER_KEYS, next_command, size_on_disk, stage_summary
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError, MissingInputError
from cvdd.runtime.hardware import numerics_for
from cvdd.runtime.precision import Numerics
from cvdd.runtime.quiet import quiet_libraries
from cvdd.runtime.trainer import stage_trainer, task_overrides
from cvdd.stages.outline import finished_artifact, stamped
from cvdd.training.metrics import evaluate_classifier


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


def without_code_paths(node: Any) -> Any:
    """``node`` with every ``_target_`` cut to the name of what it builds: a recipe says what runs, not where its
    code lives, so moving a module changes no fingerprint."""
    if isinstance(node, dict):
        return {
            k: v.rsplit(".", 1)[-1] if k == "_target_" and isinstance(v, str) else without_code_paths(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [without_code_paths(v) for v in node]
    return node


def same_recipe(record: dict, recipe_hash: str) -> bool:
    """``record`` was trained by the recipe of ``recipe_hash`` (:func:`without_code_paths` of it); a record written
    when fingerprints still held code paths (``cvdd.squeeze.TeacherModule``) is compared by the recipe it stores."""
    if record.get("fingerprint") == recipe_hash:
        return True
    return "recipe" in record and fingerprint(without_code_paths(record["recipe"])) == recipe_hash


def squeeze_teacher(cfg: DictConfig, title: str | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and write the teacher artifact (rank 0 returns its record); ``title``
    names the run on the progress bar (default: the model id)."""
    check_settings(cfg)
    artifact = TeacherArtifact(Path(cfg.paths.artifacts), cfg.dataset.name, cfg.model.id)
    with exclusive(artifact.record, f"teacher {artifact.model}"):
        return train_teacher(cfg, artifact, title)


def train_teacher(cfg: DictConfig, artifact: TeacherArtifact, title: str | None) -> dict[str, Any]:
    """``squeeze_teacher`` with the teacher's lock held."""
    numerics = numerics_for(cfg, cfg.model.net.name, "squeeze")
    recipe = squeeze_recipe(cfg, numerics)
    recipe_hash = fingerprint(without_code_paths(recipe))
    overwrite = bool(cfg.get("overwrite", False))
    existing = finished_artifact(
        artifact.record, recipe_hash, overwrite=overwrite, what=f"teacher {artifact.model}", matches=same_recipe
    )
    if existing is not None:
        return existing
    epochs = int(cfg.squeeze.epochs)
    if epochs == 0 and not recipe["pretrained"]:  # a negative count is refused by check_settings
        raise ConfigError(
            f"squeeze.epochs={epochs} trains nothing; give squeeze.epochs > 0, or model.pretrained=true to "
            f"publish torchvision's ImageNet weights as they are"
        )
    ensure_writable(artifact.folder)
    quiet_libraries(bool(cfg.get("verbose", False)))  # before Lightning's first message (the seed)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module, pretrained = teacher_module(cfg, datamodule.spec, numerics, title)
    work_dir = artifact.work_dir(recipe_hash)
    # monitor=None, save_top_k=1: one rolling checkpoint of the latest epoch, named last.ckpt
    checkpoint = ModelCheckpoint(dirpath=work_dir, filename="last", save_top_k=1, enable_version_counter=False)
    last = work_dir / "last.ckpt"
    if last.is_file():
        log.info("resuming %s from %s", cfg.model.id, last)
    started = time.time()
    with stage_trainer(cfg, extra_callbacks=[checkpoint]) as (trainer, _):
        if epochs > 0:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        if trainer.interrupted:
            raise RuntimeError(f"training of {cfg.model.id} was interrupted; run the same command to resume")
        if not trainer.is_global_zero:
            return {}
        datamodule.setup("test")
        test = evaluate_classifier(
            module.net, datamodule.test_dataloader(), datamodule.spec.num_classes, device=trainer.strategy.root_device
        )
        fields = {
            **teacher_fields(cfg, datamodule, recipe, test),
            "epochs": int(trainer.current_epoch),
            "pretrained": pretrained,
            "fingerprint": recipe_hash,
        }
        record = publish_teacher(artifact, module, stamped(fields, cfg, started))
        artifact.remove_work_dir(recipe_hash)
        summarise_teacher(artifact, record, title)
        return record


def teacher_module(cfg: DictConfig, spec, numerics: Numerics, title: str | None) -> tuple[Any, dict | None]:
    """The LightningModule that trains ``cfg.model`` (from torchvision's ImageNet weights with
    ``model.pretrained=true``, their provenance returned with it)."""
    net = instantiate(cfg.model.net, num_classes=spec.num_classes, image_size=spec.image_size, in_chans=spec.channels)
    pretrained = None
    if cfg.model.get("pretrained", False):
        pretrained = load_imagenet_weights(
            net, cfg.model.net.name, spec.image_size, spec.channels, cfg.model.net.get("width")
        )
        log.info("%s starts from %s (%s)", cfg.model.id, pretrained["weights"], pretrained["file"])
    # a partial, so the numerics reach the module as they are rather than as a config node
    module = instantiate(cfg.module, _partial_=True)(net=net, numerics=numerics)
    module.title = title or cfg.model.id
    return module, pretrained


def teacher_fields(cfg: DictConfig, datamodule, recipe: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """What a teacher's record says of it: the model, the data it knows, its test accuracy and its recipe."""
    spec = datamodule.spec
    return {
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
        "seed": int(cfg.seed),
        "recipe": recipe,
    }


def publish_teacher(artifact: TeacherArtifact, module, record: dict[str, Any]) -> dict[str, Any]:
    """Write the weights, then the record that lists their digest (last: a teacher without one is unfinished)."""
    save_tensors(artifact.weights, {k: v.detach().cpu() for k, v in module.net.state_dict().items()})
    record = {
        **record,
        "weights": artifact.weights.name,
        "files": {artifact.weights.name: file_digest(artifact.weights)},
    }
    save_json(artifact.record, record)
    return record


def summarise_teacher(artifact: TeacherArtifact, record: dict[str, Any], title: str | None) -> None:
    test = f"top-1 {record['test_top1']:.2f} %, top-5 {record['test_top5']:.2f} % after {record['epochs']} epochs"
    if title:  # a member squeezed for another stage: one line, that stage ends with the summary
        log.info("%s: %s, %.1f s -> %s", title, test, record["wall_seconds"], artifact.weights)
        return
    rows = [("teacher", f"{artifact.weights} ({size_on_disk(artifact.weights)})"), ("test", test)]
    stage_summary("squeeze", rows, record["wall_seconds"], next_command("distill.py", TEACHER_KEYS))


def train_command(dataset: str, members: list[str]) -> str:
    return f"python train.py -m dataset={dataset} model={','.join(members)}"


def ensure_teachers(cfg: DictConfig, members: list[str]) -> None:
    """Squeeze the missing ``members`` of ``cfg.committee`` first (``committee.train_missing``) or say how to."""
    root = Path(cfg.paths.artifacts)
    missing = [m for m in members if not TeacherArtifact(root, cfg.dataset.name, m).exists()]
    if not missing:
        return
    if not cfg.committee.train_missing:
        raise MissingInputError(
            f"committee '{cfg.committee.name}' lacks teachers {missing} in {root / cfg.dataset.name / 'teachers'}; "
            f"squeeze them first:\n  {train_command(cfg.dataset.name, missing)}\n"
            f"or add committee.train_missing=true"
        )
    for place, member in enumerate(missing, start=1):
        squeeze_teacher(compose_train_config(cfg, member), title=f"[{place}/{len(missing)}] {member}")


SQUEEZE_KEYS = ("dataset", "paths", "hardware", "seed", "experiment", "trainer.accelerator", "trainer.precision")
SINGLE_DEVICE = {"ddp": "gpu", "ddp_cpu": "cpu"}  # members are squeezed one at a time, on one device


def squeeze_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides of this run that ``train.py`` understands: dataset, paths, hardware (on one
    device), seed, the preset, precision. Recover's own keys (ipc, method.*, committee.*) are left out."""
    kept = []
    for text in select_overrides(overrides, SQUEEZE_KEYS):
        key, _, value = text.partition("=")
        kept.append(f"hardware={SINGLE_DEVICE.get(value, value)}" if key == "hardware" else text)
    return kept


def compose_train_config(cfg: DictConfig, member: str) -> DictConfig:
    """The ``train.py`` config for one member: this run's dataset, paths, hardware, seed and preset as the
    user gave them, then ``committee.train_overrides``."""
    task = task_overrides()
    if task is None:  # a config built without Hydra's command line: what names the data and the device
        task = [f"dataset={cfg.dataset.name}", f"hardware={cfg.hardware.name}", f"paths.root={cfg.paths.root}"]
    overrides = [
        *squeeze_overrides(task),
        f"model={member}",
        "logger=none",
        *(cfg.committee.get("train_overrides") or []),
    ]
    return compose_stage("train", overrides)
