"""Relabel on a small distilled digits set: per-epoch files, plan identity and digests, labels as planned, resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra.core.global_hydra import GlobalHydra

from cvdd.artifacts import ArtifactConflictError
from cvdd.committee.committee import load_committee
from cvdd.labels.bssl import soft_label_logits
from cvdd.labels.plan import EpochPlan, apply_batch
from cvdd.labels.protocol import build_plan
from cvdd.labels.student_set import student_set
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel

DISTILL = ("ipc=2", "method.recover.iterations=2", "method.recover.init.mode=real", "logger=none")
RELABEL = ("ipc=2", "method.recover.init.mode=real", "relabel.epochs=3", "relabel.batch_size=8")


@pytest.fixture
def distilled(make_cfg, workdir: Path) -> Path:
    distill(make_cfg("distill", *DISTILL))
    return workdir


def labels_dir(root: Path) -> Path:
    return root / "artifacts" / "digits" / "labels" / "small_ipc2_real_s0"


def test_relabel_writes_planned_soft_labels_per_epoch(make_cfg, distilled: Path):
    cfg = make_cfg("relabel", *RELABEL)
    manifest = relabel(cfg)
    folder = labels_dir(distilled)
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]
    stored = torch.load(folder / "epoch_0000.pt", weights_only=True)
    first = stored["logits"]
    assert first.dtype == torch.float16 and first.shape == (20, 10)
    plan = build_plan(cfg, 20)
    assert manifest["plan"] == plan.identity() and manifest["plan_seed"] == 0
    assert bytes(stored["plan_sha256"].tolist()) == EpochPlan.epoch_digest(plan.epoch(0)), "the epoch's plan digest"
    assert sum(manifest["teachers"].values()) == pytest.approx(1.0) and len(manifest["teachers"]) == 5

    # the stored labels are the weighted BSSL logits of the planned, augmented batch
    images = student_set(cfg, distilled / "artifacts").read()  # relabel reads the exported PNGs
    classes = json.loads((folder / "manifest.json").read_text())["classes"]
    committee = load_committee(distilled / "artifacts", "digits", list(manifest["teachers"]), classes, None, 1.0)
    batch = plan.epoch(0)[0]
    expected = soft_label_logits(committee.members, manifest["teachers"], apply_batch(images, batch))
    assert torch.allclose(first[: len(batch.indices)].float(), expected, atol=2e-2, rtol=1e-2)
    assert manifest["bytes_per_image_per_epoch"] > 10 * 2  # fp16 payload plus the file header


def test_relabel_resumes_per_epoch_and_fp32_doubles_the_payload(make_cfg, distilled: Path):
    relabel(make_cfg("relabel", *RELABEL))
    folder = labels_dir(distilled)
    kept = (folder / "epoch_0000.pt").stat().st_mtime_ns
    before = torch.load(folder / "epoch_0001.pt", weights_only=True)["logits"]
    (folder / "epoch_0001.pt").unlink()
    (folder / "manifest.json").unlink()  # as if killed after epoch 0 and 2 were written
    relabel(make_cfg("relabel", *RELABEL))
    assert (folder / "epoch_0000.pt").stat().st_mtime_ns == kept, "finished epochs are not redone"
    assert torch.equal(torch.load(folder / "epoch_0001.pt", weights_only=True)["logits"], before)

    fp32 = relabel(make_cfg("relabel", *RELABEL, "relabel.dtype=float32", "overwrite=true"))
    assert torch.load(folder / "epoch_0000.pt", weights_only=True)["logits"].dtype == torch.float32
    assert fp32["dtype"] == "float32"


def test_relabel_stops_on_sigterm_after_the_epoch_in_hand_and_resumes(
    make_cfg, distilled: Path, monkeypatch: pytest.MonkeyPatch
):
    """Lightning leaves predict running on SIGTERM; relabel stops at the next epoch, keeping the finished ones."""
    from cvdd.labels.module import RelabelModule

    labelled = RelabelModule.predict_step

    def then_terminated(self, epoch, batch_idx):
        labelled(self, epoch, batch_idx)
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill` does while the first epoch is being labelled

    monkeypatch.setattr(RelabelModule, "predict_step", then_terminated)
    with pytest.raises(SystemExit):
        relabel(make_cfg("relabel", *RELABEL))
    folder = labels_dir(distilled)
    assert [p.name for p in folder.glob("epoch_*.pt")] == ["epoch_0000.pt"] and not (folder / "manifest.json").exists()
    kept = (folder / "epoch_0000.pt").stat().st_mtime_ns
    monkeypatch.setattr(RelabelModule, "predict_step", labelled)
    manifest = relabel(make_cfg("relabel", *RELABEL))
    assert manifest["epochs"] == 3 and (folder / "epoch_0000.pt").stat().st_mtime_ns == kept


@pytest.mark.slow
def test_ddp_relabel_equals_single_process_at_the_same_thread_count(make_cfg, distilled: Path):
    relabel(make_cfg("relabel", *RELABEL, "hardware.threads=1"))
    single = [torch.load(p, weights_only=True)["logits"] for p in sorted(labels_dir(distilled).glob("epoch_*.pt"))]
    GlobalHydra.instance().clear()
    run_cli("relabel.py", *RELABEL, "hardware=ddp_cpu", "hardware.threads=1", "overwrite=true", cwd=distilled)
    ddp = [torch.load(p, weights_only=True)["logits"] for p in sorted(labels_dir(distilled).glob("epoch_*.pt"))]
    assert len(ddp) == len(single) == 3
    assert all(torch.equal(a, b) for a, b in zip(single, ddp, strict=True))


def test_teacher_passes_side_by_side_give_bitwise_the_labels_of_one_thread(make_cfg, distilled: Path):
    """Two threads label with one teacher each at a time (one intra-op thread per pass): the arithmetic of one
    thread labelling with the teachers in turn, so the same logits, recorded as 1-thread work."""
    one = relabel(make_cfg("relabel", *RELABEL, "hardware.threads=1"))
    single = [torch.load(p, weights_only=True)["logits"] for p in sorted(labels_dir(distilled).glob("epoch_*.pt"))]
    both = relabel(make_cfg("relabel", *RELABEL, "hardware.threads=2", "overwrite=true"))
    side = [torch.load(p, weights_only=True)["logits"] for p in sorted(labels_dir(distilled).glob("epoch_*.pt"))]
    assert len(single) == len(side) == 3 and all(torch.equal(a, b) for a, b in zip(single, side, strict=True))
    assert one["cpu_threads"] == both["cpu_threads"] == 1


def test_one_teacher_alone_labels_with_every_thread(make_cfg, distilled: Path):
    one = ("hardware.threads=2", "relabel.teachers=resnet18_small")
    assert relabel(make_cfg("relabel", *RELABEL, *one))["cpu_threads"] == 2  # one pass per step: both threads
    assert relabel(make_cfg("relabel", *RELABEL, "hardware.threads=2", "overwrite=true"))["cpu_threads"] == 1


def test_relabel_resumed_at_another_thread_count_is_refused(make_cfg, distilled: Path):
    in_turn = ("hardware.threads=2", "hardware.member_threads=1")  # teacher passes with two intra-op threads
    relabel(make_cfg("relabel", *RELABEL, *in_turn))
    folder = labels_dir(distilled)
    (folder / "epoch_0002.pt").unlink()
    (folder / "manifest.json").unlink()  # as if killed after two epochs
    hint = r"hardware\.threads=2 hardware\.member_threads=1"
    with pytest.raises(ArtifactConflictError, match=rf"begun with 2 CPU thread.*has 1.*{hint}"):
        relabel(make_cfg("relabel", *RELABEL, "hardware.threads=1"))
    assert relabel(make_cfg("relabel", *RELABEL, *in_turn))["cpu_threads"] == 2


def test_a_finished_relabel_run_again_reads_and_hashes_no_label_or_image(make_cfg, distilled: Path):
    """Recognising finished labels takes their manifest and file sizes; no label file or PNG is hashed again."""
    from cvdd.artifacts.io import HASHED

    relabel(make_cfg("relabel", *RELABEL))
    folder = labels_dir(distilled)
    before = HASHED["bytes"]
    manifest = relabel(make_cfg("relabel", *RELABEL))
    assert manifest["epochs"] == 3
    labels = sum(p.stat().st_size for p in folder.glob("epoch_*.pt"))
    pngs = sum(p.stat().st_size for p in (distilled / "artifacts/digits/distilled").rglob("[0-9]*/*.png"))
    assert HASHED["bytes"] - before < min(labels, pngs) / 10, "only small records (teachers' JSON) at most"
