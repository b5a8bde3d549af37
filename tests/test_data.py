"""Every dataset format, loaded from a miniature copy through the real loader code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from minidata import (
    class_value,
    wnids,
    write_cifar,
    write_fashion_mnist,
    write_image_folder,
    write_tiny_imagenet_official,
)

from cvdd.data import DatasetNotFoundError, ImageDataModule, get_spec, load_dataset
from cvdd.data.formats import IMAGENET100_WNIDS, IMAGENETTE_NAMES, IMAGEWOOF_NAMES, read_idx


def assert_labels_match_pixels(split, tol: int = 2) -> None:
    """Every image's flat colour must encode its label (catches any mislabelled file)."""
    for i in range(len(split)):
        image, label = split[i]
        assert image.dtype == torch.uint8
        assert abs(int(image.float().mean().round()) - class_value(label)) <= tol, (i, label)


def assert_class_major(split) -> None:
    """In-memory sets are stored class by class, as an ImageFolder of the same images lists them."""
    assert torch.equal(split.targets, torch.sort(split.targets, stable=True).values), "samples in class-major order"


def test_digits_split_is_stratified_deterministic_and_upsampled():
    data = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    assert (len(data.raw.train), len(data.raw.test)) == (1437, 360)
    assert data.raw.train.images.shape[1:] == (1, 16, 16)
    counts = torch.bincount(data.raw.test.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    again = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    assert torch.equal(data.raw.test.images, again.raw.test.images)
    other = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 1})
    assert not torch.equal(data.raw.test.images, other.raw.test.images)
    assert_class_major(data.raw.train), assert_class_major(data.raw.test)


def test_digits_normalisation_constants_match_the_data():
    spec = get_spec("digits")
    x = load_dataset({"name": "digits"}).raw.train.images.float() / 255
    assert x.mean().item() == pytest.approx(spec.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(spec.std[0], abs=1e-3)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path: Path, gz: bool):
    write_fashion_mnist(tmp_path, per_class=3, gz=gz)
    data = load_dataset({"name": "fashion_mnist", "root": str(tmp_path)})
    assert len(data.raw.train) == 30 and len(data.raw.test) == 30
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert_labels_match_pixels(data.raw.train, tol=0)
    assert_class_major(data.raw.train), assert_class_major(data.raw.test)


def test_fashion_mnist_torchvision_layout(tmp_path: Path):
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", per_class=1)
    data = load_dataset({"name": "fashion_mnist", "root": str(tmp_path)})
    assert len(data.raw.test) == 10


def test_fashion_mnist_missing_and_truncated_files_name_the_folder(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)) as err:
        load_dataset({"name": "fashion_mnist", "root": str(tmp_path)})
    assert "dataset-fashion-mnist" in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian package not installed")
def test_fashion_mnist_debian_package_is_the_default():
    data = load_dataset({"name": "fashion_mnist", "root": None, "download_root": "/nonexistent"})
    assert (len(data.raw.train), len(data.raw.test)) == (60000, 10000)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_python_batches(tmp_path: Path, num_classes: int):
    write_cifar(tmp_path, num_classes, per_class=2)
    data = load_dataset({"name": f"cifar{num_classes}", "root": str(tmp_path), "download": False})
    batches = 5 if num_classes == 10 else 1
    assert len(data.raw.train) == batches * 2 * num_classes and len(data.raw.test) == 2 * num_classes
    assert data.raw.train.images.shape[1:] == (3, 32, 32)
    assert len(data.classes) == num_classes
    assert_labels_match_pixels(data.raw.train, tol=0), assert_labels_match_pixels(data.raw.test, tol=0)
    assert_class_major(data.raw.train)


def test_cifar_missing_folder_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="download=true") as err:
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    assert "cifar-10-batches-py" in str(err.value)


def test_tiny_imagenet_official_layout(tmp_path: Path):
    order = write_tiny_imagenet_official(tmp_path, per_class=2)
    data = load_dataset({"name": "tiny_imagenet", "root": str(tmp_path)})
    assert data.classes == order == sorted(order)
    assert data.class_names[0] == f"thing {order[0]}"
    assert len(data.raw.train) == 400 and len(data.raw.test) == 200
    assert_labels_match_pixels(data.raw.test)
    assert_labels_match_pixels(data.raw.train)


def test_tiny_imagenet_image_folder_layout(tmp_path: Path):
    order = write_image_folder(tmp_path, wnids(200), per_class=1)
    data = load_dataset({"name": "tiny_imagenet", "root": str(tmp_path)})
    assert data.classes == order
    assert_labels_match_pixels(data.raw.test)


def test_tiny_imagenet_malformed_annotations(tmp_path: Path):
    write_tiny_imagenet_official(tmp_path, per_class=1)
    ann = tmp_path / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG\tn99999999\t0\t0\t8\t8\n")
    with pytest.raises(DatasetNotFoundError, match="line 201") as err:
        load_dataset({"name": "tiny_imagenet", "root": str(tmp_path)})
    assert "val_annotations.txt" in str(err.value) and "wnids.txt" in str(err.value)
    ann.unlink()
    with pytest.raises(DatasetNotFoundError, match="val_annotations"):
        load_dataset({"name": "tiny_imagenet", "root": str(tmp_path)})


def test_imagenette_image_folder_with_names(tmp_path: Path):
    order = write_image_folder(tmp_path, list(IMAGENETTE_NAMES)[::-1], per_class=2)
    data = load_dataset({"name": "imagenette", "root": str(tmp_path)})
    assert data.classes == order
    assert data.class_names[0] == "tench"
    assert_labels_match_pixels(data.raw.train)


@pytest.mark.parametrize(("name", "wanted"), [("imagewoof", list(IMAGEWOOF_NAMES)), ("imagenet100", IMAGENET100_WNIDS)])
def test_imagenet_subsets_are_read_from_an_imagenet_folder_by_their_class_list(tmp_path: Path, name, wanted):
    write_image_folder(tmp_path, [*wanted, *wnids(5)], per_class=1, ext=".png")  # an ImageNet folder: more classes
    data = load_dataset({"name": name, "root": str(tmp_path)})
    assert data.classes == sorted(wanted) and len(data.classes) == get_spec(name).num_classes
    assert len(data.raw.test) == len(wanted) and {p.parent.name for p in data.raw.train.paths} == set(wanted)
    if name == "imagewoof":
        assert data.class_names[data.classes.index("n02099601")] == "golden retriever"
    gone = sorted(wanted)[-1]
    (tmp_path / "val" / gone / f"{gone}_0.png").unlink()
    (tmp_path / "val" / gone).rmdir()
    with pytest.raises(DatasetNotFoundError, match=rf"val/ lacks 1 class folder\(s\): \['{gone}'\]"):
        load_dataset({"name": name, "root": str(tmp_path)})


def test_imagenet1k_image_folder(tmp_path: Path):
    order = write_image_folder(tmp_path, wnids(1000), per_class=1, ext=".png")
    data = load_dataset({"name": "imagenet1k", "root": str(tmp_path)})
    assert data.classes == order and len(data.raw.test) == 1000
    assert_labels_match_pixels(data.raw.test, tol=0)


def test_training_files_are_listed_only_when_the_training_split_is_read(tmp_path: Path, monkeypatch):
    """Evaluate reads the test split only: at ImageNet-1K the training split is 1.28 M files to list."""
    from cvdd.data import formats

    write_image_folder(tmp_path, wnids(1000), per_class=1, ext=".png")
    listed: list[str] = []
    original = formats.image_files
    monkeypatch.setattr(formats, "image_files", lambda folder: listed.append(folder.parent.name) or original(folder))
    data = load_dataset({"name": "imagenet1k", "root": str(tmp_path)})
    assert len(data.view("test")) == 1000 and set(listed) == {"val"}
    listed.clear()
    assert len(data.view("train")) == 1000 and listed == ["train"] * 1000
    data.view("train")
    assert len(listed) == 1000, "listed once"


def test_image_folder_errors_name_folder_layout_and_fix(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        load_dataset({"name": "imagenet1k", "root": str(tmp_path / "nope")})
    assert "train/<class>" in str(err.value) and "dataset.root" in str(err.value)
    write_image_folder(tmp_path, list(IMAGENETTE_NAMES), per_class=1)
    (tmp_path / "val" / "n01440764" / "n01440764_0.JPEG").unlink()
    with pytest.raises(DatasetNotFoundError, match="no images in"):
        load_dataset({"name": "imagenette", "root": str(tmp_path)})


def test_wrong_class_count_is_an_error(tmp_path: Path):
    write_image_folder(tmp_path, wnids(5), per_class=1)
    with pytest.raises(ValueError, match="found 5 classes, expected 10"):
        load_dataset({"name": "imagenette", "root": str(tmp_path)})


def test_unknown_dataset_lists_choices():
    with pytest.raises(KeyError, match="digits"):
        get_spec("mnist3d")


@pytest.mark.parametrize(
    ("name", "writer", "size"),
    [
        ("fashion_mnist", lambda p: write_fashion_mnist(p), 28),
        ("cifar10", lambda p: write_cifar(p, 10), 32),
        ("tiny_imagenet", lambda p: write_tiny_imagenet_official(p, 1), 64),
        ("imagenette", lambda p: write_image_folder(p, list(IMAGENETTE_NAMES), 2), 224),
    ],
)
def test_datamodule_yields_normalised_batches_at_dataset_size(tmp_path: Path, name, writer, size):
    writer(tmp_path)
    dm = ImageDataModule({"name": name, "root": str(tmp_path)}, batch_size=4, seed=0)
    dm.setup("fit")
    spec = dm.spec
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, spec.channels, size, size) and images.dtype == torch.float32
    test_images, test_labels = next(iter(dm.val_dataloader()))
    assert test_images.shape[1:] == (spec.channels, size, size)
    # evaluation view is exact normalisation of the flat class colour
    expected = (class_value(int(test_labels[0])) / 255 - np.array(spec.mean)) / np.array(spec.std)
    got = test_images[0].mean(dim=(1, 2)).numpy()
    assert np.allclose(got, expected, atol=0.05)


def test_train_loader_order_is_seeded():
    def first_labels(seed: int) -> list[int]:
        dm = ImageDataModule({"name": "digits"}, batch_size=16, seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[1].tolist()

    assert first_labels(0) == first_labels(0)
    assert first_labels(0) != first_labels(1)


def test_digits_training_view_is_never_flipped():
    assert get_spec("digits").hflip is False and get_spec("fashion_mnist").hflip is True
