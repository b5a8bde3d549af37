"""Compose a stage's config in-process, as its command line would, for drivers and tests.

``compose`` alone leaves ``${hydra:runtime.output_dir}`` unresolvable; this fills in what Hydra's
``run_job`` would (output folder, cwd, job name) and hands the task the config without its ``hydra`` node.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import cvdd.config.resolvers  # noqa: F401  (registers the config resolvers)
from cvdd.runtime.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_job(config_name: str, overrides: Sequence[str], output_dir: Path | str) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``; the job's output folder is ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(Path.cwd())
        cfg.hydra.job.name = config_name
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_stage(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, composed from inside a running job (within its Hydra
    context when it has one): the config of a stage that job runs itself, e.g. a missing teacher's squeeze."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def select_overrides(overrides: Sequence[str], keys: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The ``overrides`` whose key is one of ``keys`` or below one, and neither one of ``exclude`` nor below one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def under(key: str, names: Sequence[str]) -> bool:
        return any(key == name or key.startswith(name + ".") for name in names)

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        text
        for text, override in zip(overrides, parsed, strict=True)
        if under(override.key_or_group, keys) and not under(override.key_or_group, exclude)
    ]


def model_config(model_id: str, key: str) -> Path:
    """``conf/model/<model_id>.yaml``; an unknown id is an error naming ``key`` and listing the ids."""
    path = CONF / "model" / f"{model_id}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ConfigError(f"{key}={model_id!r} is not a model id; choose from {', '.join(known)}")
    return path
