"""Dataset registry: name → loader + the constants every stage needs (classes, size, normalisation).

``load_dataset(cfg)`` is the single way data enters the framework; it returns the raw splits
together with their class order so artifacts can record and later verify it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvdd.data import formats
from cvdd.data.folder import folder_spec, is_image_folder
from cvdd.data.formats import RawData
from cvdd.data.images import FileImages
from cvdd.data.spec import DatasetSpec
from cvdd.data.transforms import eval_transform, train_transform
from cvdd.runtime.errors import ConfigError, DataError, UnknownNameError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEWOOF = tuple(formats.IMAGEWOOF_NAMES)


@dataclass
class ImageDataset:
    """A loaded dataset: raw splits, class order and the spec (at the configured image size)."""

    spec: DatasetSpec
    raw: RawData

    @property
    def classes(self) -> list[str]:
        return self.raw.classes

    @property
    def class_names(self) -> list[str]:
        return self.raw.class_names

    def view(self, split: str, augment: bool = False):
        """``train``/``test`` split with the squeeze augmentation or the plain normalised view."""
        raw = getattr(self.raw, split)
        make = train_transform if augment else eval_transform
        return raw.with_transform(make(self.spec, from_files=isinstance(raw, FileImages)))


def _root(cfg: Mapping[str, Any]) -> Path:
    if not cfg.get("root"):
        raise ConfigError(f"dataset '{cfg['name']}' needs dataset.root (the folder that holds it)")
    return Path(cfg["root"]).expanduser()


def _fashion_mnist(cfg: Mapping[str, Any]) -> RawData:
    root = cfg.get("root")
    if not root:  # prefer the Debian package; else torchvision's download folder
        root = DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.is_dir() else Path(cfg["download_root"])
    return formats.load_fashion_mnist(Path(root).expanduser(), bool(cfg.get("download", False)))


def _imagenet_subset(name: str, wnids: Sequence[str]) -> Callable[[Mapping[str, Any]], RawData]:
    """Loader of an ImageNet subset read from an ImageNet-1K folder by its class list (sorted WNIDs), the way the
    field builds them; a folder holding just those classes (fastai's imagewoof2) reads the same."""
    how = f"set dataset.root to an ImageNet-1K folder (train/<wnid>/, val/<wnid>/) or to one holding {name}'s classes"
    return lambda cfg: formats.load_image_folder(_root(cfg), name, 3, how, subset=sorted(wnids))


def _imagefolder(name: str) -> Callable[[Mapping[str, Any]], RawData]:
    how = f"arrange {name} as ImageFolder train/ and val/ folders and set dataset.root to their parent"
    return lambda cfg: formats.load_image_folder(_root(cfg), name, 3, how)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        # digits: mean/std of the 16×16 upsampled train split (checked in tests/test_data.py)
        DatasetSpec(
            "digits",
            10,
            16,
            1,
            (0.3054,),
            (0.3186,),
            False,
            lambda c: formats.load_digits(16, float(c.get("test_fraction", 0.2)), int(c.get("split_seed", 0))),
        ),
        DatasetSpec("fashion_mnist", 10, 28, 1, (0.2860,), (0.3530,), True, _fashion_mnist),
        DatasetSpec(
            "cifar10",
            10,
            32,
            3,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            True,
            lambda c: formats.load_cifar(_root(c), bool(c.get("download", False)), 10),
        ),
        DatasetSpec(
            "cifar100",
            100,
            32,
            3,
            (0.5071, 0.4867, 0.4408),
            (0.2675, 0.2565, 0.2761),
            True,
            lambda c: formats.load_cifar(_root(c), bool(c.get("download", False)), 100),
        ),
        DatasetSpec(
            "tiny_imagenet",
            200,
            64,
            3,
            IMAGENET_MEAN,
            IMAGENET_STD,
            True,
            lambda c: formats.load_tiny_imagenet(_root(c)),
        ),
        DatasetSpec(
            "imagenette",
            10,
            224,
            3,
            IMAGENET_MEAN,
            IMAGENET_STD,
            True,
            lambda c: formats.load_imagenette(_root(c), bool(c.get("download", False))),
        ),
        DatasetSpec("imagenet1k", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD, True, _imagefolder("imagenet1k")),
        # ImageWoof (fastai's ten dog breeds) and ImageNet-100 (CMC's list): read from an ImageNet-1K folder
        DatasetSpec(
            "imagewoof", 10, 224, 3, IMAGENET_MEAN, IMAGENET_STD, True, _imagenet_subset("imagewoof", IMAGEWOOF)
        ),
        DatasetSpec(
            "imagenet100",
            100,
            224,
            3,
            IMAGENET_MEAN,
            IMAGENET_STD,
            True,
            _imagenet_subset("imagenet100", formats.IMAGENET100_WNIDS),
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    """The registered spec for ``name`` (clear error listing the choices otherwise)."""
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset '{name}'; registered: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def dataset_spec(cfg: Mapping[str, Any]) -> DatasetSpec:
    """The spec of a ``dataset`` config node: the registered one for its name, or for ``dataset=image_folder`` the
    one its folder and settings give (:mod:`cvdd.data.folder`)."""
    return folder_spec(cfg) if is_image_folder(cfg) else get_spec(cfg["name"])


def load_dataset(cfg: Mapping[str, Any]) -> ImageDataset:
    """Load the dataset described by a ``dataset`` config node (name, root, download, ...)."""
    spec = dataset_spec(cfg)
    raw = spec.loader(cfg)
    if len(raw.classes) != spec.num_classes:
        raise DataError(
            f"dataset '{spec.name}' at {cfg.get('root')}: found {len(raw.classes)} classes, expected "
            f"{spec.num_classes}; check that dataset.root points at the full dataset"
        )
    return ImageDataset(spec, raw)
