"""dataset=image_folder: the user's own images, with classes, channels and statistics read from the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cvdd.data import dataset_spec, load_dataset
from cvdd.runtime.errors import ConfigError
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.stages.validate import validate

DIGITS = load_dataset({"name": "digits"})


def write_digits_folder(root: Path) -> Path:
    """The built-in digits as PNG files: train/<class>/<index>.png and val/<class>/<index>.png."""
    for split, folder in (("train", "train"), ("test", "val")):
        images = DIGITS.raw.split(split)
        for i, (image, target) in enumerate(zip(images.images, images.targets.tolist(), strict=True)):
            path = root / folder / DIGITS.classes[target] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(path)
    return root


def test_the_folder_gives_classes_channels_and_statistics(tmp_path: Path):
    root = write_digits_folder(tmp_path / "digits_png")
    node = {"name": "mine", "kind": "image_folder", "root": str(root), "image_size": 16}
    spec = dataset_spec(node)
    builtin = DIGITS.spec
    assert (spec.num_classes, spec.channels, spec.image_size) == (10, 1, 16)
    assert spec.mean[0] == pytest.approx(builtin.mean[0], abs=5e-4) and spec.std[0] == pytest.approx(
        builtin.std[0], abs=5e-4
    )
    cached = json.loads((root / ".cvdd_stats.json").read_text())
    assert next(iter(cached.values()))["mean"] == list(spec.mean), "computed once, then read"
    data = load_dataset(node)
    assert data.classes == DIGITS.classes
    mine = data.raw.split("test")
    pixels = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(p)))[None] for p in mine.paths])
    order = sorted(range(len(DIGITS.raw.split("test"))), key=lambda i: (int(DIGITS.raw.split("test").targets[i]), i))
    assert torch.equal(pixels, DIGITS.raw.split("test").images[order]), "the same pixels, class by class"
    two = dataset_spec({**node, "classes": ["3", "1"]})
    assert two.num_classes == 2 and load_dataset({**node, "classes": ["3", "1"]}).classes == ["3", "1"]


@pytest.mark.parametrize(
    ("node", "error"),
    [
        ({"image_size": 16}, r"dataset=image_folder needs dataset\.root="),
        ({"root": "ROOT"}, r"dataset=image_folder needs dataset\.image_size="),
        (
            {"root": "ROOT", "image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
            r"need 1 value\(s\) each",
        ),
    ],
)
def test_missing_or_contradicting_settings_are_named(tmp_path: Path, node: dict, error: str):
    root = write_digits_folder(tmp_path / "digits_png")
    node = {k: str(root) if v == "ROOT" else v for k, v in node.items()}
    with pytest.raises(ConfigError, match=error):
        dataset_spec({"name": "mine", "kind": "image_folder", **node})


def test_every_stage_runs_on_an_image_folder(make_cfg, tmp_path: Path):
    root = write_digits_folder(tmp_path / "digits_png")
    data = ("dataset=image_folder", f"dataset.root={root}", "dataset.image_size=16", "dataset.name=digits_png")
    record = squeeze_teacher(make_cfg("train", *data, "model=resnet18_small", "squeeze.epochs=1", "logger=none"))
    assert record["num_classes"] == 10 and record["recipe"]["dataset"]["classes"] == DIGITS.classes
    chain = (*data, "committee=sre2l_small", "ipc=2", "logger=none")
    made = distill(make_cfg("distill", *chain, "method=random_real"))
    assert made["images"] == 20 and (tmp_path / "artifacts/digits_png/distilled/random_real_ipc2_s0").is_dir()
    relabel(make_cfg("relabel", *chain, "method=random_real", "relabel.epochs=2", "relabel.batch_size=8"))
    result = validate(make_cfg("evaluate", *chain, "method=random_real", "relabel.epochs=2", "relabel.batch_size=8"))
    assert result["dataset"] == "digits_png" and result["test_samples"] == 360 and result["test_top1"] > 10


def test_a_folder_trains_as_the_built_in_dataset_it_holds(make_cfg, tmp_path: Path):
    """The folder is the built-in digits: with digits' flip rule and statistics it squeezes the very teacher the
    built-in dataset squeezes (both are stored class by class; another order would change the shuffled batches)."""
    root = write_digits_folder(tmp_path / "digits_png")
    folder = squeeze_teacher(
        make_cfg(
            "train",
            *("dataset=image_folder", f"dataset.root={root}", "dataset.image_size=16", "dataset.hflip=false"),
            *("dataset.mean=[0.3054]", "dataset.std=[0.3186]", "model=resnet18_small", "squeeze.epochs=1"),
            *("logger=none", "paths.root=" + str(tmp_path / "folder")),
        )
    )
    builtin = squeeze_teacher(
        make_cfg("train", "model=resnet18_small", "squeeze.epochs=1", "logger=none", f"paths.root={tmp_path / 'b'}")
    )
    digest = {record["files"][record["weights"]]["sha256"] for record in (folder, builtin)}
    assert folder["test_top1"] == builtin["test_top1"] and len(digest) == 1, "bit for bit the same teacher"
