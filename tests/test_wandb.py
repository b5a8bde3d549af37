"""W&B, offline: one run per stage grouped by the set's name, with what each stage's dashboard shows (read back
from the offline run's own files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvdd.report import main as report_main
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.validate import validate
from tests.wandb_offline import describe, offline_runs

SET = ("committee=sre2l_small", "ipc=1", "logger=wandb")
LABELS = (*SET, "relabel.epochs=2", "relabel.teachers=resnet18_small")


@pytest.mark.slow
def test_each_stage_is_a_run_of_the_set_s_group_with_its_dashboard_items(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    distill(make_cfg("distill", *SET, "method.recover.iterations=25"))  # recover logs every 25 steps
    relabel(make_cfg("relabel", *LABELS))
    validate(make_cfg("evaluate", *LABELS, "validate.eval_every=1"))
    runs = {run.job_type: run for run in offline_runs(workdir / "run")}
    assert set(runs) == {"distill", "relabel", "evaluate"}, describe(workdir / "run")
    assert {run.group for run in runs.values()} == {"sre2l_small_ipc1_patches_s0"}, "the stages of one set together"
    for stage, run in runs.items():
        assert run.config["task_name"] == stage and run.config["ipc"] == 1, "the resolved config"

    distilled = runs["distill"]
    assert {"recover/resnet18_small/ce", "recover/resnet18_small/bn", "recover/resnet18_small/weight"} <= set(
        distilled.metrics
    ), "per-member loss curves and voting weights"
    assert len(distilled.metrics["recover/resnet18_small/ce"]) >= 1
    assert distilled.media("images"), "the grid as an image"

    labels = runs["relabel"]
    assert labels.metrics["labels/payload_bytes_per_image_per_epoch"] == [20.0]  # 10 fp16 logits
    assert labels.metrics["labels/epochs"] == [2]

    student = runs["evaluate"]
    assert {"train/loss", "val/top1", "test/top1", "test/top1_best"} <= set(student.metrics)
    (table,) = student.media("table")
    rows = json.loads(table.read_text())
    assert rows["columns"][:3] == ["set", "method", "ipc"] and rows["data"][0][:3] == [
        "sre2l_small_ipc1_patches_s0",
        "cvdd",
        1,
    ]


@pytest.mark.slow
def test_report_logs_every_result_and_the_summary(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    for seed, top1 in enumerate((90.0, 92.0)):
        record = {"dataset": "digits", "student": "convnet", "labels": "offline", "method": "rded", "ipc": 10}
        (results / f"r{seed}.json").write_text(
            json.dumps({**record, "seed": seed, "test_top1": top1, "test_top1_best": top1, "name": "x"})
        )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    report_main([str(results), "--wandb", "--wandb-dir", str(tmp_path / "wb")])
    assert "W&B run:" in capsys.readouterr().out
    (run,) = offline_runs(tmp_path / "wb")
    assert run.job_type == "report" and run.group == "report"
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in run.media("table")}
    assert len(tables["results"]["data"]) == 2
    assert tables["summary"]["data"] == [
        ["digits", "convnet", "offline", "rded", 10, 91.0, pytest.approx(1.414, abs=1e-3), 2, "final"]
    ]
    assert run.media("images"), "the top-1-vs-IPC plot"
