"""The results report: grouping, mean ± std, the markdown table, the plot, the CLI."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from PIL import Image

from cvdd.report import load_results, main, markdown_table, summarise, write_report


def result(method: str, ipc: int, seed: int, top1: float, **extra) -> dict:
    return {
        "name": f"{method}_ipc{ipc}_s{seed}",
        "method": method,
        "dataset": "fashion_mnist",
        "student": "convnet",
        "labels": "offline",
        "ipc": ipc,
        "seed": seed,
        "test_top1": top1,
        "created": f"2026-11-24T00:00:0{seed}+00:00",
        **extra,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    rows = [
        result("cvdd", 1, 0, 60.0),
        result("cvdd", 1, 1, 62.0),
        result("cvdd", 1, 2, 67.0),
        result("cvdd", 10, 0, 80.0),
        result("sre2l", 1, 0, 50.0),
        result("sre2l", 10, 0, 70.0),
        result("sre2l", 10, 1, 72.0),
        result("cvdd", 10, 0, 79.0, label_topk=3),
    ]
    for i, row in enumerate(rows):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"{i}.json").write_text(json.dumps(row))
    (folder / "manifest.json").write_text(json.dumps({"not": "a result"}))
    return folder


def test_groups_average_seeds_with_the_sample_std(results: Path):
    groups = {(g.method, g.ipc, g.labels): g for g in summarise(load_results(results))}
    cvdd1 = groups[("cvdd", 1, "offline")]
    assert cvdd1.seeds == (0, 1, 2)
    assert cvdd1.mean == pytest.approx(63.0) and cvdd1.std == pytest.approx(statistics.stdev([60, 62, 67]))
    assert groups[("cvdd", 10, "offline")].std == 0.0  # one seed
    assert groups[("cvdd", 10, "offline top-3")].mean == 79.0  # top-k labels are their own row


def test_a_seed_evaluated_twice_counts_once_with_its_newest_result():
    old = result("cvdd", 1, 0, 10.0, created="2026-01-01T00:00:00+00:00")
    new = result("cvdd", 1, 0, 20.0, created="2026-02-01T00:00:00+00:00")
    (group,) = summarise([new, old])
    assert group.top1 == (20.0,)


def test_markdown_table_is_method_by_ipc(results: Path):
    table = markdown_table(summarise(load_results(results)), method_order=["sre2l", "cvdd"])
    lines = table.splitlines()
    header = lines.index("| method | IPC 1 | IPC 10 |")
    assert lines[header + 2] == "| sre2l | 50.00 ± 0.00 (n=1) | 71.00 ± 1.41 (n=2) |"
    assert lines[header + 3] == "| cvdd | 63.00 ± 3.61 (n=3) | 80.00 ± 0.00 (n=1) |"
    assert (
        "`offline top-3` labels" in table and "| method | IPC 10 |\n|---|---|\n| cvdd | 79.00 ± 0.00 (n=1) |" in table
    )


def test_cli_prints_the_table_and_writes_markdown_and_plot(results: Path, tmp_path: Path, capsys):
    main([str(results), "--out", str(tmp_path / "out"), "--title", "FM"])
    printed = capsys.readouterr().out
    assert "| cvdd | 63.00 ± 3.61 (n=3) |" in printed
    assert (tmp_path / "out" / "summary.md").read_text().startswith("# FM\n")
    with Image.open(tmp_path / "out" / "summary.png") as png:
        assert png.size[0] > 300 and png.size[1] > 200


def test_missing_folder_names_the_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report(tmp_path / "nowhere")


def test_best_metric_reports_the_best_evaluation_and_says_so(tmp_path: Path):
    rows = [
        result("cvdd", 10, 0, 80.0, test_top1_best=82.0, eval_every=10),
        result("cvdd", 10, 1, 78.0, test_top1_best=81.0, eval_every=10),
        result("cvdd", 10, 2, 77.0),  # written before best was recorded: only in the final table
    ]
    final, best = summarise(rows, "final"), summarise(rows, "best")
    assert final[0].top1 == (80.0, 78.0, 77.0) and best[0].top1 == (82.0, 81.0)
    assert "final test top-1 (%, after the last epoch)" in markdown_table(final)
    assert "best test top-1 (%, highest of the evaluations every 10 epochs and the final one)" in markdown_table(best)
    assert "| cvdd | 81.50 ± 0.71 (n=2) |" in markdown_table(best)
    with pytest.raises(ValueError, match="metric='top5'"):
        summarise(rows, "top5")


def versions(torch_version: str, commit: str = "abc1234567890", dirty: bool = False) -> dict:
    return {
        "provenance": {
            "versions": {"python": "3.11.7", "torch": torch_version, "cvdd": "0.1.0"},
            "git": {"commit": commit, "dirty": dirty},
            "device": "cpu",
        }
    }


def test_a_table_flags_the_cells_made_with_other_versions():
    rows = [
        result("cvdd", 10, 0, 80.0, **versions("2.15.0")),
        result("cvdd", 10, 1, 81.0, **versions("2.15.0")),
        result("sre2l", 10, 0, 70.0, **versions("2.15.0")),
        result("rded", 10, 0, 75.0, **versions("2.14.1")),
    ]
    table = markdown_table(summarise(rows))
    assert "| rded | 75.00 ± 0.00 (n=1)† |" in table and "| cvdd | 80.50 ± 0.71 (n=2) |" in table
    assert "† made (in part) with other versions than the rest (python 3.11.7, torch 2.15.0" in table
    assert table.rstrip().endswith("torch 2.14.1, cvdd 0.1.0, commit abc1234567")
    same = markdown_table(summarise(rows[:3]))
    assert "†" not in same


def test_provenance_names_versions_commit_and_device():
    from cvdd.runtime.provenance import provenance, version_signature

    made = provenance()
    assert made["versions"]["torch"] and made["versions"]["cvdd"] and made["device"]
    assert version_signature({"provenance": made}).startswith("python ")
    assert version_signature({}) == "unrecorded"
    assert version_signature(versions("2.15.0", dirty=True)).endswith("commit abc1234567 (dirty)")


def test_dd_ranking_metrics_follow_the_tables_when_their_references_exist(tmp_path: Path):
    from cvdd.report.ranking import label_robust_score

    artifacts = tmp_path / "artifacts"
    (artifacts / "fashion_mnist/teachers").mkdir(parents=True)
    (artifacts / "fashion_mnist/teachers/convnet.json").write_text(json.dumps({"test_top1": 90.0}))
    config = {"paths": {"artifacts": str(artifacts)}, "relabel": {"teachers": "committee"}}
    rows = [
        result("cvdd", 10, 0, 80.0, config=config),
        result("cvdd", 10, 1, 82.0, config=config),
        result("random_real", 10, 0, 76.0, config=config),
        result("cvdd", 10, 0, 60.0, labels="hard", config=config),
        result("rded", 10, 0, 79.0, config={**config, "relabel": {"teachers": "resnet18_small"}}),
    ]
    folder = tmp_path / "results"
    folder.mkdir()
    for i, row in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(row))
    table = write_report(folder, tmp_path / "out")
    hlr, ior = 90.0 - 60.0, 81.0 - 76.0
    lrs = 100 * (math.exp(0.5 * ior / 100 - 0.5 * hlr / 100) - math.exp(-1)) / (math.e - math.exp(-1))
    assert label_robust_score(hlr, ior) == pytest.approx(lrs) and lrs == pytest.approx(21.89, abs=0.01)
    assert f"| cvdd | 10 | committee | 81.00 | 30.00 | +5.00 | {lrs:.2f} |" in table
    assert "| random_real | 10 | committee | 76.00 | – | +0.00 | – |" in table, "its own reference"
    assert "| rded | 10 | resnet18_small" not in table, "no reference at all: no ranking row"
    assert "full data: 90.00 %" in table
    csv = (tmp_path / "out/ranking.csv").read_text().splitlines()
    assert csv[0].split(",")[-3:] == ["hard_label_recovery", "improvement_over_random", "label_robust_score"]
    cvdd = next(line for line in csv if ",offline,cvdd," in line).split(",")
    assert [float(v) for v in cvdd[-3:]] == pytest.approx([30.0, 5.0, lrs], abs=1e-4)
    rded = next(line for line in csv if ",rded," in line).split(",")
    assert rded[-3:] == ["", "", ""], "random real images labelled by other teachers are no reference"


def test_a_rerun_with_other_settings_is_a_row_of_its_own_and_replaces_no_cell(tmp_path: Path, caplog):
    """Reliability 3: one more ``evaluate.py validate.epochs=1 validate.lr=0.5`` used to become the CV-DD cell."""
    usual = {"validate": {"epochs": 300, "lr": 0.001}, "relabel": {"teachers": "committee", "epochs": 300}}
    other = {**usual, "validate": {"epochs": 1, "lr": 0.5}}
    rows = [
        result("cvdd", 10, 0, 33.0, config=usual),
        result("cvdd", 10, 1, 34.22, config=usual),
        result("cvdd", 10, 0, 10.0, config=other, created="2026-12-01T00:00:00+00:00"),
        result("cvdd", 1, 0, 20.0, config=usual),
        result("random_real", 10, 0, 30.0, config=usual),
        result("random_real", 10, 0, 9.0, config=other),
    ]
    folder = tmp_path / "results"
    folder.mkdir()
    for i, row in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(row))
    (folder / "foreign.json").write_text(json.dumps({**result("x", 1, 0, 1.0), "ipc": "ten"}))
    (folder / "list.json").write_text("[1, 2]")
    table = write_report(folder)
    assert "| cvdd [validate.epochs=300, validate.lr=0.001] | 20.00 ± 0.00 (n=1) | 33.61 ± 0.86 (n=2) |" in table
    assert "| cvdd [validate.epochs=1, validate.lr=0.5] | – | 10.00 ± 0.00 (n=1) |" in table
    assert "rows differ in evaluation settings: validate.epochs, validate.lr" in table
    assert "foreign.json left out: not a result of evaluate.py (ipc of the wrong kind)" in caplog.text

    from cvdd.report.ranking import rankings

    ior = {(r.variant, r.method, r.ipc): r.improvement_over_random for r in rankings(load_results(folder))}
    assert ior[("validate.epochs=300, validate.lr=0.001", "cvdd", 10)] == pytest.approx(33.61 - 30.0)
    assert ior[("validate.epochs=1, validate.lr=0.5", "cvdd", 10)] == pytest.approx(10.0 - 9.0), "its own protocol's"
