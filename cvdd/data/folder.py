"""``dataset=image_folder``: the user's own images, ImageFolder ``train/<class>/`` and ``val/<class>/``.

What the built-in datasets register as constants is read from the folder instead: the classes (the ``train/``
folder names, sorted, or ``dataset.classes`` in the order given: those folders only), the channels (the first
training image's mode, unless ``dataset.channels`` says), and the per-channel mean and std (computed once over the
training images at their own size and cached in ``<root>/.cvdd_stats.json``, unless ``dataset.mean`` / ``std``
give them). ``dataset.image_size`` is required: images are resized to it as the built-in file datasets are
(below 64 px the models' small-input stems apply, as for CIFAR).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cvdd.artifacts.io import save_json
from cvdd.data import formats
from cvdd.data.images import eight_bit
from cvdd.data.spec import DatasetSpec
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError, DataError

KIND = "image_folder"
HOW = "arrange your images as train/<class>/ and val/<class>/ under one folder and set dataset.root to it"
STATS_FILE = ".cvdd_stats.json"


def is_image_folder(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("kind") == KIND


def folder_classes(root: Path, classes: Sequence[str] | None) -> list[str]:
    """The class folders read: ``classes`` as given, or every folder of ``train/`` sorted."""
    if classes:
        return [str(c) for c in classes]
    train = root / "train"
    if not train.is_dir():
        raise formats.DatasetNotFoundError(KIND, root, "missing folder train/", formats.IMAGEFOLDER_LAYOUT, HOW)
    return sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))


def num_classes_of(root: str | None, classes: Sequence[str] | None) -> int | None:
    """For the config (``dataset.num_classes``): ``None`` until ``dataset.root`` is set."""
    return None if root is None else len(folder_classes(Path(root).expanduser(), classes))


def folder_spec(cfg: Mapping[str, Any]) -> DatasetSpec:
    """The spec of ``cfg`` (a ``dataset=image_folder`` node), from the folder and the given settings; worked out once
    per process for the same settings (every stage asks for it several times)."""
    if not cfg.get("root"):
        raise ConfigError(f"dataset=image_folder needs dataset.root=<folder with train/ and val/>; {HOW}")
    if not cfg.get("image_size"):
        raise ConfigError("dataset=image_folder needs dataset.image_size=<pixels> (images are resized to it)")

    def given(key: str) -> tuple | None:
        value = cfg.get(key)
        return None if value is None else tuple(value)

    return settled_spec(
        str(cfg["name"]),
        str(Path(str(cfg["root"])).expanduser()),
        int(cfg["image_size"]),
        int(cfg["channels"]) if cfg.get("channels") else None,
        given("mean"),
        given("std"),
        given("classes"),
        bool(cfg.get("hflip", True)),
    )


@lru_cache(maxsize=16)
def settled_spec(
    name: str,
    root: str,
    image_size: int,
    channels: int | None,
    mean: tuple | None,
    std: tuple | None,
    classes: tuple | None,
    hflip: bool,
) -> DatasetSpec:
    folder = Path(root)
    listed = tuple(folder_classes(folder, classes))
    channels = channels or first_image_channels(folder, listed)
    if channels not in (1, 3):
        raise ConfigError(f"dataset.channels={channels}: 1 (grey) or 3 (colour)")
    if mean is None or std is None:
        mean, std = cached_stats(root, listed, channels)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"dataset.mean / dataset.std need {channels} value(s) each, one per channel")
    subset = list(listed) if classes else None
    return DatasetSpec(
        name,
        len(listed),
        image_size,
        channels,
        mean,
        std,
        hflip,
        lambda c: formats.load_image_folder(folder, str(c["name"]), channels, HOW, subset=subset),
    )


def first_image_channels(root: Path, classes: Sequence[str]) -> int:
    for c in classes:
        folder = root / "train" / c
        files = formats.image_files(folder) if folder.is_dir() else []
        if files:
            with Image.open(files[0]) as image:
                return 1 if image.mode in ("L", "I", "I;16", "1", "F") else 3
    raise formats.DatasetNotFoundError(KIND, root, "no training image found", formats.IMAGEFOLDER_LAYOUT, HOW)


@lru_cache(maxsize=8)
def cached_stats(root: str, classes: tuple[str, ...], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images (0–1 scale), read from ``<root>/.cvdd_stats.json`` when it
    holds them for these classes, channels and files, else computed (once) and stored there when writable."""
    files = [f for c in classes for f in formats.image_files(Path(root) / "train" / c)]
    key = f"{channels}:{len(files)}:{','.join(classes)}"
    path = Path(root) / STATS_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if key in stored:
        return stored[key]["mean"], stored[key]["std"]
    log.info("image_folder: computing the mean and std of %d training images of %s (once)", len(files), root)
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for f in files:
        try:
            with Image.open(f) as image:
                image = eight_bit(image, f).convert("L" if channels == 1 else "RGB")
                pixels = np.asarray(image, dtype=np.float64) / 255
        except OSError as err:
            raise DataError(f"{f} cannot be read as an image ({err})") from err
        pixels = pixels.reshape(-1, channels)
        total, squares, count = total + pixels.sum(0), squares + (pixels**2).sum(0), count + len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    result = [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]
    try:
        save_json(path, {**stored, key: {"mean": result[0], "std": result[1]}})
    except OSError:
        log.warning("image_folder: %s is not writable; the statistics are computed again next time", root)
    return result
