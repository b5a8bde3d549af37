"""What names artifacts: the dataset's identity (what a teacher or a set was made from) and a set's name.

A distilled set is named once, here: ``set=<name>`` when given, else its method's default name
(``method.set_name`` in ``conf/method/<method>.yaml``, e.g. ``small_ipc10_patches_s0`` for ``cvdd``).
Relabel and evaluate then read everything else about the set (IPC, classes, method) from its manifest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvdd.data.folder import folder_classes, folder_spec, is_image_folder
from cvdd.runtime.errors import ConfigError

LOCATION_KEYS = ("root", "download", "download_root")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def dataset_identity(dataset: DictConfig) -> dict[str, Any]:
    """The dataset keys that change what is trained on (not where it lives, not stage recipes); for
    ``dataset=image_folder`` also what its folder gives (classes, channels, mean, std), so another folder under the
    same name is not taken for it."""
    node = OmegaConf.to_container(dataset, resolve=True)
    identity = {k: v for k, v in node.items() if k not in LOCATION_KEYS and not isinstance(v, dict | list)}
    if is_image_folder(node):
        spec = folder_spec(node)
        root = Path(str(node["root"])).expanduser()
        classes = folder_classes(root, node.get("classes"))
        identity.update(classes=classes, channels=spec.channels, mean=list(spec.mean), std=list(spec.std))
    return identity


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
