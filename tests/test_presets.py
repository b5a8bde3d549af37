"""Paper presets: one ``experiment=<dataset>_ipc<n>`` drives all four stages with the published settings.

The expected values are written out here from the paper and the authors' released settings
(shared/reference.md, shared/fidelity.md), not read back from the YAML, so a preset that drifts fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from minidata import write_cifar

from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.stages.validate import validate

DATASETS = ["cifar10", "cifar100", "tiny_imagenet", "imagenette", "imagenet1k"]
IPCS = [1, 10, 50]
POOL = ["resnet18", "resnet50", "shufflenetv2", "mobilenetv2", "densenet121"]

PRIORS = {  # top-1 of a ResNet-18 student on IPC-10 data distilled by each member alone (R18, R50, SV2, MBV2, D121)
    "cifar10": (63, 65.3, 68.5, 67.6, 67.4),
    "cifar100": (64, 60.6, 51.6, 59.4, 56.4),
    "tiny_imagenet": (46.5, 28.3, 43.6, 44.8, 41.5),
    "imagenette": (62.4, 52, 57.2, 54, 60.8),
    "imagenet1k": (56.4, 42.3, 52.5, 44.2, 40.6),
}
SQUEEZE = {  # released teacher recipes
    "cifar10": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 200, "batch_size": 512},
    "cifar100": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 200, "batch_size": 512},
    "tiny_imagenet": {
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "epochs": 50,
        "batch_size": 128,
    },
    "imagenette": {
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "epochs": 300,
        "batch_size": 64,
        "cosine_period_epochs": 100,
    },
    "imagenet1k": {"epochs": 0},  # torchvision's IMAGENET1K_V1 weights, not trained
}
STUDENT_LR_ETA = {  # ResNet-18 student: lr, η by IPC
    "cifar10": (1e-3, {1: 1, 10: 1, 50: 1}),
    "cifar100": (1e-3, {1: 1, 10: 2, 50: 1}),
    "tiny_imagenet": (1e-3, {1: 2, 10: 1, 50: 2}),
    "imagenette": (5e-4, {1: 2, 10: 1, 50: 2}),
    "imagenet1k": (1e-3, {1: 2, 10: 2, 50: 1}),
}
RELABEL_BATCH = {("imagenette", 1): 10, ("imagenette", 10): 10, ("imagenette", 50): 10, ("cifar10", 1): 10}  # else 16


def preset(dataset: str, ipc: int) -> str:
    return f"experiment={dataset}_ipc{ipc}"


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("ipc", IPCS)
def test_every_stage_composes_the_paper_settings(make_cfg, dataset: str, ipc: int):
    for stage in ("train", "distill", "relabel", "evaluate"):
        cfg = make_cfg(stage, preset(dataset, ipc), *(["model=resnet18"] if stage == "train" else []))
        assert cfg.dataset.name == dataset and cfg.committee.name == "cvdd", stage
        assert list(cfg.committee.members) == POOL
        assert dict(cfg.committee.priors) == dict(zip(POOL, PRIORS[dataset], strict=True)), stage
        if stage == "train":
            expected = {"momentum": 0.9, "cosine_period_epochs": None, **SQUEEZE[dataset]}
            assert {key: cfg.squeeze[key] for key in expected} == expected
            assert cfg.model.pretrained is (dataset == "imagenet1k")
            assert cfg.module.optimizer.name == cfg.squeeze.optimizer
            assert cfg.module.scheduler.period_epochs == cfg.squeeze.cosine_period_epochs
        if stage == "distill":
            assert (
                cfg.ipc == ipc
                and cfg.method.recover.iterations == 4000
                and cfg.method.recover.init.difficulty == "medium"
            )
        if stage in ("relabel", "evaluate"):
            rel = cfg.relabel
            assert (rel.teachers, rel.temperature, rel.bssl, rel.halves) == ("committee", 10.0, True, True)
            assert (rel.batch_size, rel.epochs) == (RELABEL_BATCH.get((dataset, ipc), 16), 300)
            assert cfg.ipc == ipc and cfg.distilled.format == "png"
        if stage == "evaluate":
            lr, eta = STUDENT_LR_ETA[dataset]
            v = cfg.validate
            assert cfg.student == "resnet18" and v.epochs == 300
            assert v.lr == pytest.approx(lr) and v.stretch == eta[ipc]
            assert (v.micro_batches, v.weight_decay, v.decay_all, v.temperature) == (2, 0.01, False, 20.0)
            assert v.eval_every == 10


@pytest.mark.slow
def test_cifar10_preset_runs_all_four_stages_on_a_miniature_cifar10(make_cfg, tmp_path: Path):
    """Four commands with the same one override (plus the sizes that make it a smoke run)."""
    write_cifar(tmp_path / "data" / "cifar10", 10, per_class=2)
    tiny = ["logger=none", "relabel.epochs=1", "validate.epochs=1"]
    for member in POOL:
        squeeze_teacher(make_cfg("train", preset("cifar10", 10), f"model={member}", "squeeze.epochs=1", *tiny))
    teachers = tmp_path / "artifacts" / "cifar10" / "teachers"
    record = json.loads((teachers / "resnet18.json").read_text())
    assert record["recipe"]["squeeze"]["optimizer"] == "adam" and record["recipe"]["squeeze"]["batch_size"] == 512

    manifest = distill(
        make_cfg(
            "distill", preset("cifar10", 10), "method.recover.iterations=2", "method.recover.init.candidates=10", *tiny
        )
    )
    assert manifest["images"] == 100 and manifest["name"] == "cvdd_ipc10_patches_s0"
    assert [u["members"] for u in manifest["units"][:2]] == [["resnet18", "resnet50"], ["resnet18", "shufflenetv2"]]

    labels = relabel(make_cfg("relabel", preset("cifar10", 10), *tiny))
    expected = torch.softmax(torch.tensor(PRIORS["cifar10"], dtype=torch.float64) / 10, 0).tolist()
    assert list(labels["teachers"].values()) == pytest.approx(expected)
    assert labels["halves"] and labels["batch_size"] == 16 and labels["images_format"] == "png"

    result = validate(make_cfg("evaluate", preset("cifar10", 10), *tiny))
    assert result["student"] == "resnet18" and result["epochs"] == 1 and result["test_samples"] == 20
    config = result["config"]["validate"]
    assert config["micro_batches"] == 2 and config["lr"] == 1e-3 and config["stretch"] == 1.0
    assert result["test_top1_best"] >= result["test_top1"]
