"""OmegaConf resolvers the configs rely on (imported by every entry point and by the tests).

``${cwd:}`` is the launch folder: unlike ``${hydra:runtime.cwd}`` it also resolves while the
sweeper builds the multirun folder, before any job's HydraConfig exists.
``${dataset_spec:<name>,<field>}`` reads a fact (num_classes, image_size, channels, mean, std)
from the dataset registry, so the YAML never restates what the code already knows.
``${folder_num_classes:<root>,<classes>}`` counts the classes of ``dataset=image_folder``.
``${path_stem:<path>}`` names an imported set after its source (``method=external``).
``${run_group:}`` is what a run belongs to, the W&B group: the distilled set's name for distill, relabel and
validate (so the stages of one set sit together), ``teachers-<dataset>`` for squeeze.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cvdd.artifacts.distilled import safe_name
from cvdd.data.folder import num_classes_of
from cvdd.data.registry import get_spec
from cvdd.runtime.errors import UnknownNameError

SPEC_FIELDS = ("num_classes", "image_size", "channels", "mean", "std", "hflip")


def _dataset_spec(name: str, field: str) -> Any:
    if field not in SPEC_FIELDS:
        raise UnknownNameError(f"dataset_spec: unknown field '{field}'; choose from {SPEC_FIELDS}")
    value = getattr(get_spec(name), field)
    return ListConfig(list(value)) if isinstance(value, tuple) else value


def _run_group(*, _root_: DictConfig) -> str:
    from cvdd.artifacts.identity import set_name

    return set_name(_root_) if "method" in _root_ else f"teachers-{_root_.dataset.name}"


def _path_stem(path: str | None) -> str:
    """A folder-name-safe name for ``path``: its last part without suffix (``none`` when unset)."""
    if path is None:
        return "none"
    return safe_name(Path(str(path).rstrip("/")).stem)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("dataset_spec", _dataset_spec, replace=True)
    OmegaConf.register_new_resolver("run_group", _run_group, replace=True)
    OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)
    OmegaConf.register_new_resolver("path_stem", _path_stem, replace=True)
    OmegaConf.register_new_resolver("folder_num_classes", num_classes_of, replace=True)


register_resolvers()
