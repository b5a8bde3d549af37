"""Shared fixtures: composed configs (compose API, no chdir), CLI runner, W&B disabled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")  # before anything imports wandb

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from cvdd.config.compose import compose_job
from cvdd.stages.squeeze import squeeze_teacher

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def _quiet_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))


def compose_config(config_name: str, overrides: list[str], root: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the CLI would, with every path under ``root``."""
    return compose_job(config_name, [f"paths.root={root}", *overrides], root / "run")


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(config_name: str = "train", *overrides: str) -> DictConfig:
        return compose_config(config_name, list(overrides), tmp_path)

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def random_real(make_cfg) -> Callable[..., dict]:
    """Distils the random-real baseline set (no teachers needed) with ``overrides``; returns its manifest."""
    from cvdd.stages.distill import distill

    return lambda *overrides: distill(make_cfg("distill", "method=random_real", "logger=none", *overrides))


def run_cli(script: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, from ``cwd``; fail with its output if it fails."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


MEMBERS = ["resnet18_small", "resnet50_small", "shufflenetv2_small", "mobilenetv2_small", "densenet_small"]


def squeeze_members(root: Path, members: list[str], epochs: int) -> Path:
    """``members`` squeezed for ``epochs`` on digits under ``root``; their teachers folder."""
    for member in members:
        squeeze_teacher(compose_config("train", [f"model={member}", f"squeeze.epochs={epochs}", "logger=none"], root))
    GlobalHydra.instance().clear()
    return root / "artifacts" / "digits" / "teachers"


def with_teachers(tmp_path: Path, teachers: Path) -> Path:
    """A test's work folder holding a copy of ``teachers``."""
    shutil.copytree(teachers, tmp_path / "artifacts" / "digits" / "teachers")
    return tmp_path


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> Path:
    """The small committee squeezed for one epoch on digits (shared, copied into each test)."""
    return squeeze_members(tmp_path_factory.mktemp("teachers"), MEMBERS, epochs=1)


@pytest.fixture
def workdir(tmp_path: Path, teachers: Path) -> Path:
    return with_teachers(tmp_path, teachers)
