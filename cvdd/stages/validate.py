"""The validate stage (``python evaluate.py``): a distilled set + its soft labels + the label plan → a student trained
from scratch on them, and its accuracy on the real test set."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cvdd.artifacts import check_files, ensure_writable, fingerprint, load_json, save_json
from cvdd.artifacts.ownership import exclusive
from cvdd.artifacts.results import result_path, results_folder
from cvdd.config.checks import check_settings
from cvdd.config.compose import model_config
from cvdd.data import load_dataset
from cvdd.labels.bssl import soft_label_logits
from cvdd.labels.plan import EpochPlan
from cvdd.labels.protocol import build_plan, label_settings, labels_of, relabel_committee, teacher_weights
from cvdd.labels.static import read_static_labels, static_labels
from cvdd.labels.student_set import StudentSet, student_set
from cvdd.report.summary import command_with, stage_summary
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError, MissingInputError
from cvdd.runtime.hardware import numerics_for
from cvdd.runtime.precision import Numerics
from cvdd.runtime.trainer import log_final, stage_trainer
from cvdd.stages.outline import stamped
from cvdd.training.metrics import evaluate_classifier
from cvdd.training.student import StudentModule

LABEL_SETTING_KEYS = {  # label manifest field → the setting a user changes
    "teachers": "relabel.teachers and their weights (committee.priors, relabel.temperature)",
    "bssl": "relabel.bssl",
    "halves": "relabel.halves",
    "temperature": "relabel.temperature",
    "plan_seed": "seed (of the epoch plan)",
    "plan": "the epoch plan (seed, relabel.epochs, relabel.batch_size, relabel.mix, relabel.crop_scale)",
    "dtype": "relabel.dtype",
    "topk": "relabel.topk",
    "images_format": "distilled.format",
    "images_fingerprint": "the images (the set was distilled again, or read in another format)",
}
EVALUATE_ONLY = ("validate", "student", "labels", "method_label", "trainer")


def relabel_command(overwrite: bool) -> str:
    """``python relabel.py`` with this run's overrides that relabel understands (validate's own left out)."""
    command = command_with("relabel.py", lambda key: not key.startswith(EVALUATE_ONLY))
    return f"{command} overwrite=true" if overwrite else command


def check_label_settings(manifest: dict, expected: dict, folder: Path) -> None:
    """Refuse labels whose recorded settings differ from what this run asks for, naming both sides."""
    differ = [key for key, value in expected.items() if manifest.get(key) != value]
    if not differ:
        return
    lines = [
        f"  {LABEL_SETTING_KEYS[key]}: {manifest.get(key)!r} in the labels, {expected[key]!r} asked here"
        for key in differ
    ]
    raise ConfigError(
        f"the soft labels in {folder} were made with other settings than this run asks for:\n"
        + "\n".join(lines)
        + f"\nMake matching labels: {relabel_command(overwrite=True)}\nor validate with the settings the labels record."
    )


def offline_labels(cfg: DictConfig, root: Path, chosen: StudentSet, expected: dict, plan: EpochPlan):
    """Reader of the stored labels of set ``chosen``, after checking every label-defining setting and every epoch
    file's size; an epoch's file is read (and its digest and plan checked) when training reaches it."""
    artifact = labels_of(cfg, root, chosen)
    if not artifact.manifest.is_file():
        raise MissingInputError(
            f"no soft labels at {artifact.folder}; make them with:\n  {relabel_command(overwrite=False)}\n"
            f"or use labels=online"
        )
    manifest = load_json(artifact.manifest, f"make the labels again with {relabel_command(overwrite=False)}")
    check_label_settings(manifest, expected, artifact.folder)
    recorded = manifest.get("files", {})
    rebuild = f"{relabel_command(overwrite=False)} (it recomputes damaged epochs)"
    check_files(artifact.folder, recorded, rebuild)  # every epoch there at its size, before training starts
    epochs = [d["bytes"] for name, d in recorded.items() if name.startswith("epoch_")]
    log.info(
        "labels %s: %d epochs, %.1f MB per epoch, %.2f GB in all (%s); every rank reads and checks the epoch it "
        "trains on",
        artifact.folder,
        len(epochs),
        max(epochs, default=0) / 1e6,
        sum(epochs) / 1e9,
        f"top-{manifest['topk']}" if manifest.get("topk") else "dense: relabel.topk=<k> stores far less",
    )
    cache: dict[int, torch.Tensor] = {}
    batch_size = int(cfg.relabel.batch_size)

    def labels(epoch: int, b: int, batch, _whole) -> torch.Tensor:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = artifact.read_epoch(epoch, recorded, rebuild, EpochPlan.epoch_digest(plan.epoch(epoch)))
        return cache[epoch][b * batch_size : b * batch_size + len(batch.indices)]

    return labels, manifest


def online_labels(cfg: DictConfig, root: Path, classes: list[str]):
    weights = teacher_weights(cfg, root)
    committee = relabel_committee(cfg, root, classes, weights)

    def labels(_epoch: int, _b: int, _plan, whole_batch) -> torch.Tensor:
        x = whole_batch()
        committee.to(x.device)
        return soft_label_logits(
            committee.members, weights, x, bool(cfg.relabel.bssl), bool(cfg.relabel.halves), committee.numerics
        )

    return labels, {"teachers": weights}


def method_label(cfg: DictConfig, chosen: StudentSet) -> str:
    """What reports group by: ``method_label`` if given, else the method that made the set (its manifest)."""
    return str(cfg.method_label) if cfg.get("method_label") else chosen.method


def result_file(cfg: DictConfig, root: Path, chosen: StudentSet, topk: int | None, numerics: Numerics) -> Path:
    """Runs that differ in any training or label setting get their own file (a rerun of the same recipe replaces
    its own)."""
    labels_tag = f"{cfg.labels}_top{topk}" if topk else cfg.labels
    recipe = {
        "validate": OmegaConf.to_container(cfg.validate, resolve=True),
        "relabel": OmegaConf.to_container(cfg.relabel, resolve=True),
        "images": chosen.fingerprint,
        "student": cfg.student,
        "labels": cfg.labels,
        "seed": int(cfg.seed),
        "numerics": numerics.tag,
    }
    method = method_label(cfg, chosen)
    return result_path(root, cfg.dataset.name, chosen.name, cfg.student, labels_tag, method, fingerprint(recipe))


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.student`` on the set ``cfg`` names and record its test accuracy (rank 0 returns the result)."""
    check_settings(cfg)
    model_cfg = OmegaConf.load(model_config(str(cfg.student), "student"))  # an unknown student first: no work yet
    root = Path(cfg.paths.artifacts)
    data = load_dataset(cfg.dataset)
    chosen = student_set(cfg, root)  # the manifest; each process reads the pixels once training starts
    plan = build_plan(cfg, len(chosen))
    if cfg.validate.epochs > plan.epochs:
        raise ConfigError(
            f"validate.epochs={cfg.validate.epochs} exceeds the label plan's relabel.epochs={plan.epochs}"
        )
    soft, label_info = soft_labels(cfg, root, chosen, plan, data.classes)
    results = results_folder(root, cfg.dataset.name)
    ensure_writable(results, cfg.paths.output_dir)
    net, module = student_module(cfg, model_cfg, data, chosen, plan, soft)
    out = result_file(cfg, root, chosen, label_info.get("topk"), module.numerics)
    started = time.time()
    with stage_trainer(cfg) as (trainer, loggers), exclusive(out, "result"):
        trainer.fit(module)  # its steps: StudentModule.train_dataloader (every rank walks the same step count)
        # the recorded pass: each rank its shard of the test set, counts summed (exact, nothing padded)
        test = evaluate_classifier(
            net, module.test_loader(), data.spec.num_classes, trainer.strategy.root_device, distributed=True
        )
        if not trainer.is_global_zero:
            return {}
        result = stamped(result_fields(cfg, chosen, module, test, label_info), cfg, started)
        save_json(out, result)
        save_json(Path(cfg.paths.output_dir) / "result.json", result)  # this run's (and sweep's) record
        report_result(cfg, loggers, chosen, result, out)
        return {**result, "path": str(out)}


def soft_labels(cfg: DictConfig, root: Path, chosen: StudentSet, plan: EpochPlan, classes: list[str]):
    """The student's targets per batch (``labels=offline|online|hard|static``) and what the labels' record says."""
    if cfg.labels == "offline":
        expected = label_settings(cfg, teacher_weights(cfg, root), plan, chosen)
        return offline_labels(cfg, root, chosen, expected, plan)
    if cfg.labels == "online":
        return online_labels(cfg, root, classes)
    if cfg.labels == "hard":
        return None, {}
    if cfg.labels == "static":
        soft = read_static_labels(chosen)
        return static_labels(soft, float(cfg.validate.temperature)), {
            "static_soft_labels": chosen.manifest["static_soft_labels"]["sha256"]
        }
    raise ConfigError(f"labels={cfg.labels!r}; choose offline, online, hard or static")


def student_module(
    cfg: DictConfig, model_cfg: DictConfig, data, chosen: StudentSet, plan: EpochPlan, soft
) -> tuple[Any, StudentModule]:
    """A fresh ``cfg.student`` (``model_cfg``, seeded) and the LightningModule that trains it with ``cfg.validate``'s
    settings."""
    spec = data.spec
    torch.manual_seed(cfg.seed)
    net = instantiate(model_cfg.net, num_classes=spec.num_classes, image_size=spec.image_size, in_chans=spec.channels)
    v = cfg.validate
    module = StudentModule(
        net,
        images=chosen.read,
        targets=chosen.labels,
        plan=plan,
        soft_labels=soft,
        temperature=v.temperature,
        lr=v.lr,
        weight_decay=v.weight_decay,
        stretch=v.stretch,
        micro_batches=int(v.micro_batches),
        decay_all=bool(v.decay_all),
        numerics=numerics_for(cfg, model_cfg.net.name, "student"),  # trains in these; tested in fp32
        test_set=data.view("test"),
        loader={
            "num_workers": cfg.hardware.num_workers,
            "pin_memory": cfg.hardware.get("pin_memory", False),
            "batch_size": cfg.hardware.get("eval_batch_size", 256),
        },
        ddp_split=str(v.get("ddp_split", "slices")),
    )
    return net, module


def result_fields(
    cfg: DictConfig, chosen: StudentSet, module: StudentModule, test: dict[str, Any], label_info: dict[str, Any]
) -> dict[str, Any]:
    """What a result records: the set, the protocol, the final and best test top-1 and the curve between."""
    epochs = int(cfg.validate.epochs)
    best_epoch, best = max([*module.evaluations, (epochs, test["top1"])], key=lambda point: point[1])
    return {
        "name": chosen.name,
        "method": method_label(cfg, chosen),
        "dataset": cfg.dataset.name,
        "images_format": chosen.image_format,
        "ipc": chosen.ipc,
        "student": cfg.student,
        "labels": cfg.labels,
        "seed": int(cfg.seed),
        "student_numerics": module.numerics.tag,
        "test_top1": test["top1"],
        "test_top1_best": best,
        "test_top1_best_epoch": best_epoch,
        "eval_every": int(cfg.validate.eval_every),
        "test_top1_curve": [[epoch, top1] for epoch, top1 in module.evaluations],
        "test_top5": test["top5"],
        "test_samples": test["samples"],
        "epochs": epochs,
        "label_bytes": label_info.get("bytes_per_image_per_epoch"),
        "label_payload_bytes": label_info.get("payload_bytes_per_image_per_epoch"),
        "label_topk": label_info.get("topk"),
    }


def report_result(cfg: DictConfig, loggers: list, chosen: StudentSet, result: dict[str, Any], out: Path) -> None:
    """The result to the loggers (metrics and a one-row table) and the stage summary."""
    columns = ["set", "method", "ipc", "seed", "student", "labels", "epochs", "test_top1", "test_top1_best"]
    log_final(
        loggers,
        {
            "test/top1": result["test_top1"],
            "test/top1_best": result["test_top1_best"],
            "test/top5": result["test_top5"],
        },
        ("results", columns, [[result[c] if c != "set" else chosen.name for c in columns]]),
    )
    stage_summary(
        "validate",
        [
            ("result", str(out)),
            (
                "student",
                f"{cfg.student} on {chosen.name} ({chosen.method}, IPC {chosen.ipc}, {cfg.labels} labels, "
                f"{chosen.image_format} images), {result['epochs']} epochs",
            ),
            (
                "test top-1",
                f"{result['test_top1']:.2f} % final, {result['test_top1_best']:.2f} % best "
                f"(after {result['test_top1_best_epoch']} epochs)",
            ),
        ],
        result["wall_seconds"],
        f"python -m cvdd.report {shlex.quote(str(out.parent))}",
    )
