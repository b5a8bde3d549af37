"""Damaged artifacts: named with the command that rebuilds them, found before any work, repaired by a re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from minidata import write_image_folder

from cvdd.artifacts import ArtifactCorruptError
from cvdd.data import load_dataset
from cvdd.data.formats import IMAGENETTE_NAMES
from cvdd.data.images import DatasetImageError
from cvdd.stages import validate as validate_stage
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.stages.validate import validate

DISTILL = ("ipc=2", "method.recover.iterations=2", "method.recover.init.mode=real", "logger=none")
PLAN = ("ipc=2", "method.recover.init.mode=real", "relabel.epochs=3", "relabel.batch_size=8", "logger=none")
SET = "small_ipc2_real_s0"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_teacher_is_named_and_a_rerun_of_train_repairs_it(make_cfg, workdir: Path):
    weights = workdir / "artifacts/digits/teachers/resnet50_small.ckpt"
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["files"]["resnet50_small.ckpt"]["bytes"] == weights.stat().st_size
    truncate(weights)
    rebuild = r"python train\.py dataset=digits model=resnet50_small"
    with pytest.raises(ArtifactCorruptError, match=rf"{weights} differs from the file its manifest records.*{rebuild}"):
        distill(make_cfg("distill", *DISTILL))
    squeeze_teacher(make_cfg("train", "model=resnet50_small", "squeeze.epochs=1", "logger=none"))
    repaired = json.loads(weights.with_suffix(".json").read_text())
    assert repaired["files"] == record["files"], "the same recipe retrained gives the same weights"
    distill(make_cfg("distill", *DISTILL))


def test_damaged_set_is_refused_and_a_rerun_of_distill_rebuilds_it_from_its_units(make_cfg, workdir: Path):
    distill(make_cfg("distill", *DISTILL))
    folder = workdir / "artifacts/digits/distilled" / SET
    before = torch.load(folder / "images.pt", weights_only=True)["images"]
    truncate(folder / "images.pt")
    (folder / "0003_3" / "0001.png").unlink()
    with pytest.raises(ArtifactCorruptError, match=r"images\.pt.* is missing or damaged .*python distill\.py"):
        relabel(make_cfg("relabel", *PLAN))
    distill(make_cfg("distill", *DISTILL))  # not "nothing to do": the units are re-assembled
    assert torch.equal(torch.load(folder / "images.pt", weights_only=True)["images"], before)
    assert (folder / "0003_3" / "0001.png").is_file()
    relabel(make_cfg("relabel", *PLAN))


def test_damaged_label_epoch_is_found_before_training_and_a_rerun_recomputes_only_it(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    distill(make_cfg("distill", *DISTILL))
    relabel(make_cfg("relabel", *PLAN))
    folder = workdir / "artifacts/digits/labels" / SET
    original = {p.name: p.read_bytes() for p in folder.glob("epoch_*.pt")}
    kept = (folder / "epoch_0000.pt").stat().st_mtime_ns
    truncate(folder / "epoch_0002.pt")

    def no_training(*_args, **_kwargs):
        raise AssertionError("training started before the labels were checked")

    monkeypatch.setattr(validate_stage, "stage_trainer", no_training)
    with pytest.raises(ArtifactCorruptError, match=r"epoch_0002\.pt is missing or damaged .*python relabel\.py"):
        validate(make_cfg("evaluate", *PLAN))
    monkeypatch.undo()

    relabel(make_cfg("relabel", *PLAN))
    assert {p.name: p.read_bytes() for p in folder.glob("epoch_*.pt")} == original
    assert (folder / "epoch_0000.pt").stat().st_mtime_ns == kept, "intact epochs are not recomputed"

    # altered content at the same size is caught when the epoch is read
    data = bytearray((folder / "epoch_0001.pt").read_bytes())
    data[-30] ^= 0xFF
    (folder / "epoch_0001.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match=r"epoch_0001\.pt differs from the file its manifest records"):
        validate(make_cfg("evaluate", *PLAN))


def test_damaged_patch_cache_is_scored_again(make_cfg, workdir: Path):
    common = ("ipc=2", "method.recover.iterations=1", "method.recover.init.candidates=10", "logger=none")
    first = distill(make_cfg("distill", *common, "set=a"))
    (cache,) = (workdir / "artifacts/digits/patches").glob("*.pt")
    truncate(cache)
    second = distill(make_cfg("distill", *common, "set=b"))
    assert torch.load(cache, weights_only=True)["scores"].shape == (10, 10)
    assert first["fingerprint"] == second["fingerprint"]


def test_truncated_dataset_image_names_the_file(tmp_path: Path):
    write_image_folder(tmp_path, list(IMAGENETTE_NAMES), per_class=1)
    broken = sorted((tmp_path / "train").rglob("*.JPEG"))[3]
    truncate(broken)
    data = load_dataset({"name": "imagenette", "root": str(tmp_path)})
    index = data.raw.train.paths.index(broken)
    with pytest.raises(DatasetImageError, match=rf"cannot read image {broken} .*replace the file or delete it"):
        data.raw.train[index]
