"""Compose every primary config with every option of every group (compose API) and instantiate it."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from minidata import write_image_folder
from omegaconf import OmegaConf

from cvdd.data import ImageDataModule, dataset_spec
from cvdd.runtime.distributed import HydraDDPStrategy
from cvdd.runtime.trainer import instantiate_named
from cvdd.training.teacher import TeacherModule

GROUPS = {
    "train": ["dataset", "model", "hardware", "logger", "experiment"],
    "distill": ["dataset", "committee", "hardware", "logger", "experiment"],
    "relabel": ["dataset", "committee", "hardware", "logger", "distilled", "experiment"],
    "evaluate": ["dataset", "committee", "hardware", "logger", "distilled", "experiment"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [
    (primary, group, option) for primary, groups in GROUPS.items() for group in groups for option in options(group)
]


def test_every_group_has_options():
    assert all(options(g) for groups in GROUPS.values() for g in groups)
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("hardware"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))


@pytest.mark.parametrize(("primary", "group", "option"), CASES, ids=[f"{p}-{g}={o}" for p, g, o in CASES])
def test_compose_and_instantiate(make_cfg, tmp_path: Path, primary: str, group: str, option: str):
    extra = []
    if option == "image_folder":  # the user's folder: the spec comes from it
        write_image_folder(tmp_path / "mine", ["cat", "dog", "owl"], per_class=1, ext=".png")
        extra = [f"dataset.root={tmp_path / 'mine'}", "dataset.image_size=32"]
    cfg = make_cfg(primary, f"{group}={option}", *extra)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation of the job's config resolves
    spec = dataset_spec(cfg.dataset)
    assert cfg.dataset.num_classes == spec.num_classes
    assert list(cfg.dataset.mean or spec.mean) == list(spec.mean), "registered sets state it; a folder computes it"

    if primary == "train":
        datamodule = instantiate(cfg.data)
        assert isinstance(datamodule, ImageDataModule) and datamodule.batch_size == cfg.squeeze.batch_size
        size = min(spec.image_size, 32) if group != "model" else 32  # keep 224 px builds to the dataset group
        net = instantiate(cfg.model.net, num_classes=spec.num_classes, image_size=size, in_chans=spec.channels)
        module = instantiate(cfg.module, net=net)
        assert isinstance(module, TeacherModule)
        optimizer = module.optimizer_factory(params=net.parameters())
        assert optimizer.defaults["lr"] == cfg.squeeze.lr
    elif primary in ("relabel", "evaluate"):
        assert cfg.relabel.teachers == "committee" and cfg.relabel.temperature == 10.0 and cfg.relabel.bssl
        if primary == "evaluate":
            assert (CONF / "model" / f"{cfg.student}.yaml").is_file() and cfg.validate.temperature == 20.0
    else:
        assert 1 <= cfg.committee.k <= len(cfg.committee.members)
        assert cfg.method.recover.class_block in (10, 100) and cfg.method.recover.iterations > 0
        for member in cfg.committee.members:
            assert (CONF / "model" / f"{member}.yaml").is_file(), f"committee member {member} has no model config"

    loggers = instantiate_named(cfg.logger)
    assert len(loggers) == (0 if cfg.get("logger") in (None, {}) else len(cfg.logger))

    strategy = cfg.trainer.strategy
    if not isinstance(strategy, str):
        assert isinstance(instantiate(strategy), HydraDDPStrategy)
    if cfg.trainer.accelerator == "cpu" or torch.cuda.is_available():
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, L.Trainer)
        if primary in ("train", "distill"):
            assert trainer.max_epochs == (cfg.squeeze.epochs if primary == "train" else 1)


def test_paths_follow_the_launch_folder_and_never_chdir(make_cfg, tmp_path: Path):
    cfg = make_cfg("train")
    assert cfg.paths.artifacts == f"{tmp_path}/artifacts"
    hydra_cfg = HydraConfig.get()
    assert hydra_cfg.job.chdir is False
    # microseconds in run folders: sweep jobs started in the same second never collide
    assert re.search(r"_\d{2}-\d{2}-\d{2}-\d{6}$", hydra_cfg.sweep.dir), hydra_cfg.sweep.dir


def test_dataset_recipe_flows_into_the_squeeze_settings(make_cfg):
    cfg = make_cfg("train", "dataset=cifar100", "squeeze.epochs=7")
    assert cfg.squeeze.batch_size == 512 and cfg.squeeze.epochs == 7
    assert cfg.trainer.max_epochs == 7


PAPER_PAIRS_IPC1 = {
    "cifar10": ["mobilenetv2", "densenet121"],
    "imagenette": ["mobilenetv2", "densenet121"],
    "cifar100": ["shufflenetv2", "mobilenetv2"],
}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tiny_imagenet", "imagenette", "imagenet1k"])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_paper_presets(make_cfg, dataset: str, ipc: int):
    cfg = make_cfg("distill", f"experiment={dataset}_ipc{ipc}")
    assert cfg.dataset.name == dataset and cfg.ipc == ipc and cfg.committee.name == "cvdd"
    assert cfg.committee.schedule == {1: "fixed", 10: "cycle", 50: "random"}[ipc]
    assert cfg.method.recover.iterations == 4000 and cfg.method.recover.lr == 0.25 and cfg.method.recover.r_bn == 0.01
    assert cfg.method.recover.jitter == (32 if dataset in ("imagenette", "imagenet1k") else 4)
    assert cfg.method.recover.class_block == (10 if dataset in ("cifar10", "imagenette") else 100)
    assert cfg.method.recover.init.mode == "patches" and cfg.method.recover.init.difficulty == "medium"
    assert set(cfg.committee.priors) == set(cfg.committee.members)
    if ipc == 1:
        assert (list(cfg.committee.fixed) if cfg.committee.fixed else None) == PAPER_PAIRS_IPC1.get(dataset)
    if dataset == "tiny_imagenet":
        assert cfg.committee.priors.resnet18 == 46.5 and cfg.committee.priors.resnet50 == 28.3
