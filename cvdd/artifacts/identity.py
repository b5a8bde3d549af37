"""What names artifacts: the dataset's identity (what a teacher or a set was made from) and a set's name.

A distilled set is named once, here: ``set=<name>`` when given, else its method's default name
(``method.set_name`` in ``conf/method/<method>.yaml``, e.g. ``small_ipc10_patches_s0`` for ``cvdd``).
Relabel and evaluate then read everything else about the set (IPC, classes, method) from its manifest.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvdd.runtime.errors import ConfigError

LOCATION_KEYS = ("root", "download", "download_root")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def dataset_identity(dataset: DictConfig) -> dict[str, Any]:
    """The dataset keys that change what is trained on (not where it lives, not stage recipes)."""
    node = OmegaConf.to_container(dataset, resolve=True)
    return {k: v for k, v in node.items() if k not in LOCATION_KEYS and not isinstance(v, dict | list)}


def set_name(cfg: DictConfig) -> str:
    """The distilled set this run means: ``set=<name>``, or the method's default name (``ipc`` checked: it names
    the set and, in distill, sizes it).

    A name is one folder name (letters, digits, ``._-``), so a set never lands outside ``distilled/``."""
    if int(cfg.ipc) < 1:
        raise ConfigError(f"ipc={cfg.ipc} must be at least 1 (images per class)")
    name = cfg.get("set") or cfg.method.set_name
    if not SET_NAME.fullmatch(str(name)):
        raise ConfigError(
            f"set={name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or leading '.')"
        )
    return str(name)
