"""Miniature copies of every on-disk dataset format, written byte-for-byte like the real ones.

Each image is a flat colour that encodes its class, so a test can check that a loader put
every file under the right label.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def class_value(label: int) -> int:
    """The grey level / channel value that marks class ``label``."""
    return (label * 37 + 11) % 256


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def write_fashion_mnist(folder: Path, per_class: int = 3, gz: bool = True) -> None:
    for prefix in ("train", "t10k"):
        labels = np.tile(np.arange(10), per_class).astype(np.uint8)  # interleaved, as the published files are
        images = np.stack([np.full((28, 28), class_value(int(y)), np.uint8) for y in labels])
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)


def write_cifar(root: Path, num_classes: int, per_class: int = 2) -> None:
    """The python-version pickles: CIFAR-10 batches or CIFAR-100 train/test/meta."""

    def batch(label_key: str) -> dict:
        labels = [i % num_classes for i in range(num_classes * per_class)]
        data = np.stack([np.full(3 * 32 * 32, class_value(y), np.uint8) for y in labels])
        return {b"data": data, label_key.encode(): labels}

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(pickle.dumps(batch("labels")))
        meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("train", "test"):
            (folder / name).write_bytes(pickle.dumps(batch("fine_labels")))
        meta = {b"fine_label_names": [f"c{i:03d}".encode() for i in range(100)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))


def write_image(path: Path, label: int, size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = class_value(label) if mode == "L" else (class_value(label),) * 3
    Image.new(mode, (size, size), colour).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=100)


def wnids(n: int) -> list[str]:
    # deliberately not created in sorted order below, so sorting is tested
    return [f"n{(i * 7919) % 100000:08d}" for i in range(n)]


def write_tiny_imagenet_official(root: Path, per_class: int = 2) -> list[str]:
    ids = wnids(200)
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(ids) + "\n")  # file order is not class order
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}, other name\n" for w in ids))
    order = sorted(ids)
    lines = []
    for wnid in ids:
        label = order.index(wnid)
        for j in range(per_class):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", label)
        name = f"val_{label}.JPEG"
        write_image(root / "val" / "images" / name, label)
        lines.append(f"{name}\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return order


def write_image_folder(root: Path, classes: list[str], per_class: int = 1, ext: str = ".JPEG") -> list[str]:
    order = sorted(classes)
    for split in ("train", "val"):
        for cls in classes:
            for j in range(per_class):
                write_image(root / split / cls / f"{cls}_{j}{ext}", order.index(cls))
    return order
