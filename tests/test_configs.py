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
from omegaconf import OmegaConf

from cvdd.data import ImageDataModule, get_spec
from cvdd.distributed import HydraDDPStrategy
from cvdd.jobs.common import instantiate_named
from cvdd.squeeze import TeacherModule

PRIMARY = ["train"]
GROUPS = ["dataset", "model", "hardware", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [(primary, group, option) for primary in PRIMARY for group in GROUPS for option in options(group)]


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("hardware"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))


@pytest.mark.parametrize(("primary", "group", "option"), CASES, ids=[f"{p}-{g}={o}" for p, g, o in CASES])
def test_compose_and_instantiate(make_cfg, primary: str, group: str, option: str):
    cfg = make_cfg(primary, f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation of the job's config resolves
    spec = get_spec(cfg.dataset.name)
    assert cfg.dataset.num_classes == spec.num_classes and list(cfg.dataset.mean) == list(spec.mean)

    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, ImageDataModule) and datamodule.batch_size == cfg.squeeze.batch_size
    size = min(spec.image_size, 32) if group != "model" else 32  # keep 224 px builds to the dataset group
    net = instantiate(cfg.model.net, num_classes=spec.num_classes, image_size=size, in_chans=spec.channels)
    module = instantiate(cfg.module, net=net)
    assert isinstance(module, TeacherModule)
    optimizer = module.optimizer_factory(params=net.parameters())
    assert optimizer.defaults["lr"] == cfg.squeeze.lr

    loggers = instantiate_named(cfg.logger)
    assert len(loggers) == (0 if cfg.get("logger") in (None, {}) else len(cfg.logger))

    strategy = cfg.trainer.strategy
    if not isinstance(strategy, str):
        assert isinstance(instantiate(strategy), HydraDDPStrategy)
    if cfg.trainer.accelerator == "cpu" or torch.cuda.is_available():
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, L.Trainer) and trainer.max_epochs == cfg.squeeze.epochs


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


def test_experiment_smoke_overrides_groups(make_cfg):
    cfg = make_cfg("train", "experiment=smoke")
    assert cfg.model.id == "convnet_small" and cfg.squeeze.epochs == 1
