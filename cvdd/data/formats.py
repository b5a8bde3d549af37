"""One loader per on-disk format. Each returns a :class:`RawData` with a fixed class order.

Class order is the contract every artifact is checked against, so it is always explicit:
sorted WNIDs / folder names for ImageNet-style sets, the publisher's order otherwise.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cvdd.data.images import FileImages, ImageSplit, TensorImages
from cvdd.runtime.errors import DataError, MissingInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")

IMAGENETTE_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}
# ImageWoof (fastai's imagenette repository): ten dog breeds of ImageNet-1K, hard to tell apart
IMAGEWOOF_NAMES = {
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}

# ImageNet-100: the 100 ImageNet-1K classes listed by Tian, Krishnan & Isola, "Contrastive Multiview Coding"
# (ECCV 2020; imagenet100.txt of their release). Papers that pick their own 100 classes differ: read such a list with
# dataset=image_folder dataset.classes=[...]
_IMAGENET100 = """
    n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
    n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
    n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
    n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
    n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
    n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
    n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
    n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
    n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
    n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
"""
IMAGENET100_WNIDS = tuple(_IMAGENET100.split())


class DatasetNotFoundError(MissingInputError):
    """A dataset folder is missing or not in the expected layout (message says how to fix it)."""

    def __init__(self, dataset: str, folder: Path | str, problem: str, layout: str, how_to_get: str):
        super().__init__(
            f"dataset '{dataset}': {problem}\n  folder: {folder}\n  expected layout:\n{layout}\n"
            f"  how to get it: {how_to_get}"
        )


class RawData:
    """Untransformed train/test splits with their class order. A split may be given as a function that lists it:
    it is then listed on first use, so a stage that reads only the test split (evaluate) never walks the 1.28 M
    training files of ImageNet-1K."""

    def __init__(
        self,
        train: ImageSplit | Callable[[], ImageSplit],
        test: ImageSplit | Callable[[], ImageSplit],
        classes: list[str],
        class_names: list[str],
    ):
        self._splits = {"train": train, "test": test}
        self.classes, self.class_names = classes, class_names

    def split(self, name: str) -> ImageSplit:
        split = self._splits[name]
        if callable(split):  # a lister, not a split (splits are not callable)
            split = self._splits[name] = split()
        return split

    @property
    def train(self) -> ImageSplit:
        return self.split("train")

    @property
    def test(self) -> ImageSplit:
        return self.split("test")


# --------------------------------------------------------------------------- digits
def load_digits(image_size: int = 16, test_fraction: float = 0.2, split_seed: int = 0) -> RawData:
    """scikit-learn's 8×8 digits, split stratified by ``split_seed``, upsampled to ``image_size``.

    8×8 is too small for the stems and three pooling stages the model zoo uses (a depth-3
    ConvNet would end at 1×1), so images are upsampled bilinearly once at load time. The split
    seed is part of the dataset, not the run seed: every run sees the same test set.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(targets))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=bunch.target, random_state=split_seed)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    classes = [str(c) for c in range(10)]
    return RawData(
        TensorImages.by_class(images[train_idx], targets[train_idx]),
        TensorImages.by_class(images[test_idx], targets[test_idx]),
        classes,
        classes,
    )


# --------------------------------------------------------------------------- IDX (MNIST family)
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_LAYOUT = (
    "    <folder>/train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]\n"
    "    <folder>/t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]\n"
    "    (or torchvision's <folder>/FashionMNIST/raw/ with the same files)"
)


def check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Refuse a label file whose labels are not class indices ``0 … num_classes − 1`` (a damaged file, or another
    dataset's), naming the file, before any stage trains on it."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DataError(
            f"{path} holds label {bad}; the dataset has {num_classes} classes (labels 0 to {num_classes - 1}): the "
            "file is damaged or belongs to another dataset"
        )


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {payload.size} bytes")
    return payload.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for base in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def load_idx_folder(folder: Path, dataset: str, classes: list[str], how_to_get: str) -> RawData:
    """MNIST-family IDX files in ``folder`` (raw or gzipped)."""
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        img_path, lbl_path = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
        if img_path is None or lbl_path is None:
            missing = img_stem if img_path is None else lbl_stem
            raise DatasetNotFoundError(dataset, folder, f"{missing}[.gz] not found", IDX_LAYOUT, how_to_get)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or len(images) != len(labels):
            raise DatasetNotFoundError(
                dataset,
                folder,
                f"{img_path.name} / {lbl_path.name} disagree in shape ({images.shape} vs {labels.shape})",
                IDX_LAYOUT,
                how_to_get,
            )
        check_label_range(labels, len(classes), lbl_path)
        splits[split] = TensorImages.by_class(torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64))
    return RawData(splits["train"], splits["test"], list(classes), list(classes))


def load_fashion_mnist(root: str | Path, download: bool) -> RawData:
    """Fashion-MNIST from IDX files in ``root``; torchvision's downloader fills ``root`` if asked."""
    folder = Path(root)
    how = (
        "apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), "
        "or set dataset.download=true to fetch it with torchvision into this folder"
    )
    if download and _find_idx(folder, IDX_FILES["train"][0]) is None:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(folder), train=train, download=True)
    return load_idx_folder(folder, "fashion_mnist", FASHION_MNIST_CLASSES, how)


# --------------------------------------------------------------------------- CIFAR
CIFAR_FORMAT = {  # folder, train batches, test batch, meta file, label key, names key
    10: (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    100: ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    import pickle

    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(
            f"{path} cannot be read ({type(err).__name__}: {err}): it is truncated or not a python-version CIFAR "
            "batch; extract the archive again (or delete the folder and set dataset.download=true)"
        ) from err


def load_cifar(root: str | Path, download: bool, num_classes: int) -> RawData:
    """CIFAR-10/100 from the python-version pickle batches (torchvision's downloader fetches them).

    The batches are read here rather than through ``torchvision.datasets.CIFAR*`` because those
    refuse any copy whose checksum differs from the published archive (tests use miniatures).
    """
    folder_name, train_files, test_file, meta_file, label_key, names_key = CIFAR_FORMAT[num_classes]
    name, root = f"cifar{num_classes}", Path(root)
    folder = root / folder_name
    layout = (
        f"    <folder>/{folder_name}/{{{', '.join(train_files[:2])}{', ...' if len(train_files) > 2 else ''}, "
        f"{test_file}, {meta_file}}}"
    )
    if download and not folder.is_dir():
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if num_classes == 10 else CIFAR100)(str(root), train=True, download=True)
    how = "set dataset.download=true on a machine with internet, or extract the python-version archive into it"

    def read(files: list[str]) -> TensorImages:
        images, labels = [], []
        for fname in files:
            path = folder / fname
            if not path.is_file():
                raise DatasetNotFoundError(name, root, f"missing {folder_name}/{fname}", layout, how)
            batch = _unpickle(path)
            if b"data" not in batch or label_key not in batch:
                raise DatasetNotFoundError(name, root, f"{path} has no {label_key!r}/b'data' entries", layout, how)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            check_label_range(np.asarray(batch[label_key]), num_classes, path)
            labels += list(batch[label_key])
        return TensorImages.by_class(torch.from_numpy(np.concatenate(images)), labels)

    train, test = read(train_files), read([test_file])
    meta_path = folder / meta_file
    if not meta_path.is_file():
        raise DatasetNotFoundError(name, root, f"missing {folder_name}/{meta_file}", layout, how)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(meta_path)[names_key]]
    return RawData(train, test, classes, classes)


# --------------------------------------------------------------------------- ImageFolder family
def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_class_names(root: Path, classes: list[str]) -> list[str]:
    """Human-readable names from ``words.txt`` / ``LOC_synset_mapping.txt`` when shipped, else the ids."""
    names: dict[str, str] = {**IMAGENETTE_NAMES, **IMAGEWOOF_NAMES}
    for fname in ("words.txt", "LOC_synset_mapping.txt"):
        path = root / fname
        if path.is_file():
            for line in path.read_text().splitlines():
                parts = line.replace("\t", " ").split(" ", 1)
                if len(parts) == 2:
                    names[parts[0]] = parts[1].split(",")[0].strip()
    return [names.get(c, c) for c in classes]


def _scan_class_folders(
    split_dir: Path,
    dataset: str,
    root: Path,
    layout: str,
    how: str,
    classes: list[str] | None = None,
    images_subdir: str = "",
    subset: bool = False,
) -> tuple[list, list[str]]:
    """Every image of ``classes`` (default: every class folder) under ``split_dir``; the folders must be exactly
    ``classes``, or with ``subset`` include them."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(dataset, root, f"missing folder {split_dir.name}/", layout, how)
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif subset and not set(classes) <= set(found):
        missing = sorted(set(classes) - set(found))
        raise DatasetNotFoundError(
            dataset, root, f"{split_dir.name}/ lacks {len(missing)} class folder(s): {missing[:5]}", layout, how
        )
    elif not subset and sorted(found) != sorted(classes):
        extra, missing = set(found) - set(classes), set(classes) - set(found)
        raise DatasetNotFoundError(
            dataset,
            root,
            f"class folders in {split_dir.name}/ differ from the class list "
            f"(unexpected: {sorted(extra)[:5]}, missing: {sorted(missing)[:5]})",
            layout,
            how,
        )
    if not classes:
        raise DatasetNotFoundError(dataset, root, f"{split_dir.name}/ has no class folders", layout, how)
    samples = []
    for index, name in enumerate(classes):
        folder = split_dir / name / images_subdir if images_subdir else split_dir / name
        files = image_files(folder) if folder.is_dir() else []
        if not files:
            raise DatasetNotFoundError(dataset, root, f"no images in {folder}", layout, how)
        samples += [(f, index) for f in files]
    return samples, classes


IMAGEFOLDER_LAYOUT = "    <folder>/train/<class>/*.JPEG\n    <folder>/val/<class>/*.JPEG"


def load_image_folder(
    root: str | Path,
    dataset: str,
    channels: int,
    how_to_get: str,
    train_dir: str = "train",
    test_dir: str = "val",
    subset: Sequence[str] | None = None,
) -> RawData:
    """Plain ImageFolder ``train/<class>/`` and ``val/<class>/``; classes are the sorted folder names, or ``subset``
    of them in its order (an ImageNet subset read from an ImageNet-1K folder, the way the field builds them)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(dataset, root, "folder does not exist", IMAGEFOLDER_LAYOUT, how_to_get)
    train_folder = root / train_dir
    if not train_folder.is_dir():
        raise DatasetNotFoundError(dataset, root, f"missing folder {train_dir}/", IMAGEFOLDER_LAYOUT, how_to_get)
    only = subset is not None
    # folder names only: no file is listed
    classes = list(subset) if only else sorted(d.name for d in train_folder.iterdir() if d.is_dir())
    test, _ = _scan_class_folders(root / test_dir, dataset, root, IMAGEFOLDER_LAYOUT, how_to_get, classes, subset=only)

    def train() -> FileImages:  # listed when a stage first reads the training split
        samples, _ = _scan_class_folders(
            train_folder, dataset, root, IMAGEFOLDER_LAYOUT, how_to_get, classes, subset=only
        )
        return FileImages(samples, channels)

    return RawData(train, FileImages(test, channels), classes, _read_class_names(root, classes))


TINY_LAYOUT = (
    "    official archive: <folder>/wnids.txt, <folder>/train/<wnid>/images/*.JPEG,\n"
    "                      <folder>/val/images/*.JPEG + <folder>/val/val_annotations.txt\n"
    "    or ImageFolder:   <folder>/train/<wnid>/*.JPEG, <folder>/val/<wnid>/*.JPEG"
)
TINY_HOW = "download and unzip tiny-imagenet-200.zip (cs231n.stanford.edu) and set dataset.root to it"


def load_tiny_imagenet(root: str | Path) -> RawData:
    """Tiny-ImageNet in the official archive layout (labels of val/ from its annotations) or as ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError("tiny_imagenet", root, "folder does not exist", TINY_LAYOUT, TINY_HOW)
    if not (root / "wnids.txt").is_file():
        return load_image_folder(root, "tiny_imagenet", 3, TINY_HOW)
    classes = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())

    def train() -> FileImages:  # listed when a stage first reads the training split
        samples, _ = _scan_class_folders(
            root / "train", "tiny_imagenet", root, TINY_LAYOUT, TINY_HOW, classes, images_subdir="images"
        )
        return FileImages(samples, 3)

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetNotFoundError("tiny_imagenet", root, "missing val/val_annotations.txt", TINY_LAYOUT, TINY_HOW)
    index = {wnid: i for i, wnid in enumerate(classes)}
    test = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetNotFoundError(
                "tiny_imagenet",
                root,
                f"val_annotations.txt line {lineno} is malformed or names a WNID not in wnids.txt: {line!r}",
                TINY_LAYOUT,
                TINY_HOW,
            )
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise DatasetNotFoundError("tiny_imagenet", root, f"{path} listed but missing", TINY_LAYOUT, TINY_HOW)
        test.append((path, index[fields[1]]))
    return RawData(train, FileImages(test, 3), classes, _read_class_names(root, classes))


IMAGENETTE_HOW = "set dataset.download=true (torchvision Imagenette) or unpack imagenette2 and set dataset.root"


def load_imagenette(root: str | Path, download: bool) -> RawData:
    """ImageNette as ImageFolder; with ``download`` torchvision fetches ``imagenette2`` into ``root`` first."""
    root = Path(root)
    if download and not (root / "train").is_dir():
        from torchvision.datasets import Imagenette

        for split in ("train", "val"):  # a no-op when the archive is already extracted
            Imagenette(str(root), split=split, size="full", download=True)
    if not (root / "train").is_dir() and (root / "imagenette2" / "train").is_dir():
        root = root / "imagenette2"  # torchvision's extraction folder
    return load_image_folder(root, "imagenette", 3, IMAGENETTE_HOW)
