"""Squeeze on digits, in process: artifact contents, idempotence, conflicts, overwrite, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from cvdd.artifacts import ArtifactConflictError, TeacherArtifact
from cvdd.data import ImageDataModule
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.training.metrics import evaluate_classifier

FAST = ("dataset=digits", "model=convnet_small", "squeeze.epochs=3", "logger=none")


class CrashAtEpoch(Callback):
    """Simulates a killed run: dies when ``epoch`` starts (earlier epochs are checkpointed)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class StartEpochRecorder(Callback):
    seen: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        StartEpochRecorder.seen.append(trainer.current_epoch)


def test_squeeze_writes_a_reloadable_teacher_and_is_idempotent(make_cfg, tmp_path: Path):
    cfg = make_cfg("train", *FAST, "logger=csv")
    record = squeeze_teacher(cfg)
    art = TeacherArtifact(tmp_path / "artifacts", "digits", "convnet_small")
    assert art.exists() and not art.work_dir(record["fingerprint"]).exists()
    on_disk = json.loads(art.record.read_text())
    assert on_disk["classes"] == [str(i) for i in range(10)] and on_disk["epochs"] == 3
    assert on_disk["seed"] == 0 and on_disk["config"]["model"]["id"] == "convnet_small"
    assert on_disk["test_samples"] == 360 and on_disk["test_top1"] > 80.0
    assert (tmp_path / "run" / "csv").is_dir()

    # weights only, and they reproduce the recorded accuracy exactly
    state = torch.load(art.weights, weights_only=True)
    net = instantiate(cfg.model.net, num_classes=10, image_size=16, in_chans=1)
    net.load_state_dict(state)
    dm = ImageDataModule(cfg.dataset, batch_size=100)
    dm.setup("test")
    again = evaluate_classifier(net, dm.test_dataloader(), 10)
    assert again["top1"] == pytest.approx(on_disk["test_top1"], abs=1e-4)

    mtime = art.weights.stat().st_mtime_ns
    assert squeeze_teacher(make_cfg("train", *FAST))["fingerprint"] == record["fingerprint"]
    assert art.weights.stat().st_mtime_ns == mtime, "same recipe must be a no-op"

    with pytest.raises(ArtifactConflictError, match="overwrite=true"):
        squeeze_teacher(make_cfg("train", *FAST, "squeeze.lr=0.01"))
    squeeze_teacher(make_cfg("train", *FAST, "squeeze.lr=0.01", "overwrite=true"))
    assert art.weights.stat().st_mtime_ns != mtime


def test_squeeze_is_seeded(make_cfg, tmp_path: Path):
    first = squeeze_teacher(make_cfg("train", *FAST, "squeeze.epochs=1"))
    weights = torch.load(TeacherArtifact(tmp_path / "artifacts", "digits", "convnet_small").weights)
    second = squeeze_teacher(make_cfg("train", *FAST, "squeeze.epochs=1", "overwrite=true"))
    weights2 = torch.load(TeacherArtifact(tmp_path / "artifacts", "digits", "convnet_small").weights)
    assert first["test_top1"] == second["test_top1"]
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_killed_run_resumes_from_last_checkpoint(make_cfg, tmp_path: Path):
    crash = ("+callbacks.crash._target_=test_squeeze.CrashAtEpoch", "+callbacks.crash.epoch=2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        squeeze_teacher(make_cfg("train", *FAST, *crash))
    art = TeacherArtifact(tmp_path / "artifacts", "digits", "convnet_small")
    assert not art.exists(), "a killed run publishes nothing"
    work = list((art.folder / ".work").iterdir())
    assert len(work) == 1 and (work[0] / "last.ckpt").is_file()

    StartEpochRecorder.seen.clear()
    record = squeeze_teacher(make_cfg("train", *FAST, "+callbacks.rec._target_=test_squeeze.StartEpochRecorder"))
    assert StartEpochRecorder.seen == [2], "resumed after the two finished epochs"
    assert record["epochs"] == 3 and art.exists() and not (art.folder / ".work").exists()


class CrashAtBatch(Callback):
    """Simulates a kill in the middle of an epoch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated kill")


def test_resumed_run_equals_an_uninterrupted_one_bitwise(make_cfg, tmp_path: Path):
    """Killed mid-epoch, resumed from the last epoch boundary: the same data order, augmentation and weights."""
    squeeze_teacher(make_cfg("train", *FAST, f"paths.artifacts={tmp_path}/a"))
    crash = (
        "+callbacks.crash._target_=test_squeeze.CrashAtBatch",
        "+callbacks.crash.epoch=1",
        "+callbacks.crash.batch=5",
    )
    with pytest.raises(RuntimeError, match="simulated kill"):
        squeeze_teacher(make_cfg("train", *FAST, f"paths.artifacts={tmp_path}/b", *crash))
    squeeze_teacher(make_cfg("train", *FAST, f"paths.artifacts={tmp_path}/b"))
    a, b = (torch.load(tmp_path / x / "digits/teachers/convnet_small.ckpt", weights_only=True) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_path_trains(make_cfg):
    record = squeeze_teacher(make_cfg("train", *FAST, "squeeze.epochs=1", "hardware.channels_last=true"))
    assert record["test_top1"] > 20.0


def test_a_teacher_recorded_under_the_flat_layout_is_still_the_same_recipe(make_cfg, tmp_path: Path):
    """Records written before the packages-by-role layout name their module's code by its old path; moving code
    changes no recipe, so such a teacher is reused, not refused or retrained."""
    from cvdd.artifacts import fingerprint, save_json

    record = squeeze_teacher(make_cfg("train", *FAST))
    art = TeacherArtifact(tmp_path / "artifacts", "digits", "convnet_small")
    old = json.loads(art.record.read_text())
    old["recipe"]["module"]["_target_"] = "cvdd.squeeze.TeacherModule"
    old["recipe"]["module"]["optimizer"]["_target_"] = "cvdd.optim.build_optimizer"
    old["fingerprint"] = fingerprint(old["recipe"])  # what the old code stored
    save_json(art.record, old)
    mtime = art.weights.stat().st_mtime_ns
    again = squeeze_teacher(make_cfg("train", *FAST))
    assert again["fingerprint"] == old["fingerprint"] != record["fingerprint"]
    assert art.weights.stat().st_mtime_ns == mtime  # not retrained
    old["recipe"]["squeeze"]["lr"] = 1.0  # another recipe is still refused
    old["fingerprint"] = fingerprint(old["recipe"])
    save_json(art.record, old)
    with pytest.raises(ArtifactConflictError, match="different recipe"):
        squeeze_teacher(make_cfg("train", *FAST))
