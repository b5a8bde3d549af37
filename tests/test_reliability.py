"""What a hostile user found (reliability round 3): two jobs on one artifact, interrupted overwrites, stale files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from cvdd.artifacts import load_json
from cvdd.artifacts.ownership import ArtifactBusyError, exclusive
from cvdd.labels.module import RelabelModule
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.stages.validate import validate

SET = ("method=random_real", "ipc=2", "logger=none")
LABELS = (*SET, "relabel.batch_size=8")
DIGITS = Path("artifacts/digits")


def epochs_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("epoch_*.pt"))}


def test_a_second_job_on_an_artifact_another_job_writes_stops_at_once_naming_it(make_cfg, workdir: Path):
    """Every stage that writes a folder or file holds its lock: another process holding it makes the stage fail
    before any work, with the holder's pid and command."""
    labels = workdir / DIGITS / "labels/random_real_ipc2_s0"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cvdd.artifacts.ownership import exclusive\n"
            f"with exclusive(__import__('pathlib').Path({str(labels)!r}), 'labels'):\n"
            "    print('held', flush=True); time.sleep(60)",
            "--the-other-job",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        distill(make_cfg("distill", *SET))
        with pytest.raises(
            ArtifactBusyError, match=rf"labels .* another job \(.*\"pid\": {holder.pid}.*--the-other-job"
        ):
            relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))
        assert not labels.exists(), "nothing written"
    finally:
        holder.kill()
        holder.wait()
    relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))  # the lock went with its holder

    sets = workdir / DIGITS / "distilled/random_real_ipc2_s0"
    result = validate(make_cfg("evaluate", *LABELS, "relabel.epochs=2"))
    held = [
        (sets, lambda: distill(make_cfg("distill", *SET, "overwrite=true"))),
        (Path(result["path"]), lambda: validate(make_cfg("evaluate", *LABELS, "relabel.epochs=2"))),
        (workdir / DIGITS / "teachers/convnet.json", lambda: squeeze_teacher(make_cfg("train", "model=convnet"))),
    ]
    for target, stage in held:
        with exclusive(target, "artifact"), pytest.raises(ArtifactBusyError, match="being written by another job"):
            stage()
    assert load_json(sets / "manifest.json")["images"] == 20, "the held set is untouched"


def test_an_interrupted_overwrite_leaves_none_of_the_old_recipes_epochs(make_cfg, workdir: Path, monkeypatch):
    """Recipe A stopped after 4 of 8 epochs, recipe B with overwrite=true stopped after 1, then B resumed: every
    epoch is B's (the old recipe's epochs 1-3 used to pass as B's)."""
    distill(make_cfg("distill", *SET))
    folder = workdir / DIGITS / "labels/random_real_ipc2_s0"
    a, b = (*LABELS, "relabel.epochs=8"), (*LABELS, "relabel.epochs=8", "relabel.mix=mixup")
    labelled = RelabelModule.predict_step

    def stop_after(count: int):
        def step(self, epoch, batch_idx):
            if len(list(folder.glob("epoch_*.pt"))) >= count:
                raise KeyboardInterrupt
            return labelled(self, epoch, batch_idx)

        return step

    monkeypatch.setattr(RelabelModule, "predict_step", stop_after(4))
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into exit 1
        relabel(make_cfg("relabel", *a))
    monkeypatch.setattr(RelabelModule, "predict_step", stop_after(1))
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into exit 1
        relabel(make_cfg("relabel", *b, "overwrite=true"))
    monkeypatch.setattr(RelabelModule, "predict_step", labelled)
    resumed = relabel(make_cfg("relabel", *b))
    assert resumed["mix"] == "mixup" and len(epochs_of(folder)) == 8
    made_by_b = epochs_of(folder)
    relabel(make_cfg("relabel", *b, "overwrite=true"))  # B from scratch
    assert epochs_of(folder) == made_by_b, "every epoch is recipe B's"
    assert not list(folder.parent.glob(".*replaced*")), "the old folder is gone, not parked"


def test_an_overwrite_leaves_only_the_new_sets_files(make_cfg, workdir: Path):
    distill(make_cfg("distill", *SET, "ipc=4", "set=mine"))
    made = distill(make_cfg("distill", *SET, "ipc=2", "set=mine", "overwrite=true"))
    folder = workdir / DIGITS / "distilled/mine"
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert made["images"] == 20 and len(made["files"]) == 22, "20 PNGs, images.pt, grid.png"
    assert on_disk == sorted([*made["files"], "manifest.json"]), "nothing of the IPC 4 set is left"
    assert len(torch.load(folder / "images.pt", weights_only=True)["labels"]) == 20
