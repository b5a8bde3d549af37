"""committee.priors=measured: each member's prior is the top-1 of a student on the set it distilled alone."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import MEMBERS, compose_config, run_cli
from hydra.core.global_hydra import GlobalHydra

import cvdd.stages.distill
import cvdd.stages.priors
import cvdd.stages.relabel
from cvdd.artifacts import load_json
from cvdd.committee.committee import warn_if_nearly_equal
from cvdd.committee.priors import measured_priors
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.stages.validate import validate

MEASURE = [
    "logger=none",
    "ipc=1",
    "method.recover.iterations=2",
    "method.recover.init.mode=gaussian",
    "committee.priors=measured",
    "committee.priors_measure.ipc=1",
    "committee.priors_measure.epochs=2",
]
RECORD = Path("artifacts/digits/priors/small_ipc1_s0.json")


@pytest.fixture(scope="module")
def measured(tmp_path_factory, teachers: Path) -> tuple[Path, dict]:
    """A CV-DD set at IPC 1 distilled with measured priors (every member measured at a few steps)."""
    root = tmp_path_factory.mktemp("priors")
    shutil.copytree(teachers, root / "artifacts" / "digits" / "teachers")
    manifest = distill(compose_config("distill", MEASURE, root))
    GlobalHydra.instance().clear()
    return root, manifest


def refuse_to_measure(*args, **kwargs):
    raise AssertionError("measured again")


def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = refuse_to_measure
    monkeypatch.setattr(cvdd.stages.distill, "measure_member", refuse)
    monkeypatch.setattr(cvdd.stages.relabel, "measure_member", refuse)


def test_the_priors_are_the_members_students_top1_and_cvdd_votes_with_them(measured):
    root, manifest = measured
    record = load_json(root / RECORD)
    assert record["complete"] and list(record["priors"]) == MEMBERS
    for member, entry in record["members"].items():
        result = load_json(root / "artifacts" / "digits" / entry["result"])
        assert result["test_top1"] == entry["prior"] == record["priors"][member]
        assert result["name"] == f"priors_{member}_ipc1_s0" and result["method"] == "sre2l"
        assert load_json(root / "artifacts/digits/distilled" / entry["set"] / "manifest.json")["ipc"] == 1
    assert manifest["priors"] == record["priors"]
    top_two = sorted(MEMBERS, key=lambda m: -record["priors"][m])[:2]  # IPC 1: the fixed pair of highest priors
    assert set(manifest["units"][0]["members"]) == set(top_two)
    alpha = torch.tensor([record["priors"][m] for m in manifest["units"][0]["members"]], dtype=torch.float64)
    assert manifest["units"][0]["weights"] == pytest.approx(torch.softmax(alpha / 5.0, 0).tolist())


def test_a_second_run_reuses_them_and_relabel_and_evaluate_weight_teachers_by_them(measured, make_cfg, monkeypatch):
    root, _ = measured
    no_measuring(monkeypatch)
    again = compose_config("distill", MEASURE, root)
    priors = load_json(root / RECORD)["priors"]
    assert measured_priors(again, root / "artifacts", "measure", refuse_to_measure) == priors
    labelled = [*MEASURE[:2], "method.recover.init.mode=gaussian", "committee.priors=measured", "relabel.epochs=2"]
    labelled += ["committee.priors_measure.ipc=1", "committee.priors_measure.epochs=2"]
    labels = relabel(compose_config("relabel", labelled, root))
    alpha = torch.tensor([priors[m] for m in MEMBERS], dtype=torch.float64)
    assert list(labels["teachers"].values()) == pytest.approx(torch.softmax(alpha / 10.0, 0).tolist())
    result = validate(compose_config("evaluate", [*labelled, "validate.epochs=2"], root))
    assert 0 <= result["test_top1"] <= 100
    GlobalHydra.instance().clear()


def test_a_retrained_member_is_measured_again_alone(measured, tmp_path):
    shutil.copytree(measured[0] / "artifacts", tmp_path / "artifacts")
    before = load_json(tmp_path / RECORD)
    squeeze_teacher(compose_config("train", ["model=resnet50_small", "squeeze.epochs=2", "overwrite=true"], tmp_path))
    remeasured = []

    def measure(measurement, member, *rest):
        remeasured.append(member)
        return cvdd.stages.priors.measure_member(measurement, member, *rest)

    cfg = compose_config("distill", MEASURE, tmp_path)
    priors = measured_priors(cfg, tmp_path / "artifacts", "measure", measure)
    assert remeasured == ["resnet50_small"]
    after = load_json(tmp_path / RECORD)
    assert after["members"]["resnet50_small"]["teacher"] != before["members"]["resnet50_small"]["teacher"]
    assert {m: after["members"][m] for m in MEMBERS if m != "resnet50_small"} == {
        m: before["members"][m] for m in MEMBERS if m != "resnet50_small"
    }
    assert priors == after["priors"]
    GlobalHydra.instance().clear()


def test_evaluate_refuses_measured_priors_that_nobody_measured(workdir):
    cfg = compose_config("evaluate", ["committee.priors=measured", "relabel.teachers=committee"], workdir)
    with pytest.raises(FileNotFoundError, match=r"committee\.priors=measured"):
        measured_priors(cfg, workdir / "artifacts", "read")
    GlobalHydra.instance().clear()


def test_nearly_equal_weights_from_teacher_accuracy_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="cvdd"):
        warn_if_nearly_equal({"a": 91.0, "b": 92.6}, 5.0, "test-flat")  # weights 0.42 / 0.58: 1.38x
        warn_if_nearly_equal({"a": 91.0, "b": 92.6}, 5.0, "test-flat")
        warn_if_nearly_equal({"a": 63.0, "b": 68.5}, 5.0, "test-paper")  # CIFAR-10's spread: 3.0x
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "committee.priors=measured" in warned[0] and "1.38" in warned[0]


def test_two_ranks_measure_the_priors_together_and_vote_with_them(workdir):
    """Under hardware=ddp_cpu each member's three jobs run on both ranks (nested fits in one process group)."""
    run_cli("distill.py", "hardware=ddp_cpu", *MEASURE, cwd=workdir)
    record = load_json(workdir / RECORD)
    manifest = load_json(workdir / "artifacts/digits/distilled/small_ipc1_gaussian_s0/manifest.json")
    assert record["complete"] and manifest["priors"] == record["priors"]
    for entry in record["members"].values():
        assert load_json(workdir / "artifacts/digits" / entry["result"])["test_top1"] == entry["prior"]
