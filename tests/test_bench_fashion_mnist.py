"""The Fashion-MNIST benchmark's bookkeeping: targets, DD-Ranking metrics, the report, cell skipping (no training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from cvdd.artifacts.distilled import DistilledArtifact, SetPiece, write_set

SPEC = importlib.util.spec_from_file_location(
    "fashion_mnist_bench", Path(__file__).parents[1] / "bench/fashion_mnist.py"
)
bench = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = bench  # dataclasses look their module up
SPEC.loader.exec_module(bench)
Cell = bench.Cell


def finished(cell, top1: float, best: float | None = None) -> tuple[str, dict]:
    return cell.key, {**asdict(cell), "test_top1": top1, "test_top1_best": best or top1 + 0.5, "seconds": 1.0}


def record_jobs(b, monkeypatch: pytest.MonkeyPatch, top1: float) -> list[tuple[str, list[str]]]:
    """Stands in for the bench's jobs: each call's config name and overrides are recorded, every student scores
    ``top1``."""
    calls: list[tuple[str, list[str]]] = []

    def job(config_name, run, overrides, folder):
        calls.append((config_name, overrides))
        return {"test_top1": top1, "test_top1_best": top1 + 0.5}, 1.0, 2.0

    monkeypatch.setattr(b, "job", job)
    return calls


@pytest.fixture
def state(tmp_path: Path) -> Path:
    crop = bench.ALT_CROP
    cells = dict(
        [
            finished(Cell("cvdd", 10, 0, bench.PAPER_CROP), 84.0),
            finished(Cell("sre2l", 10, 0, bench.PAPER_CROP), 82.0),
            finished(Cell("random_real", 10, 0, bench.PAPER_CROP), 83.0),
            finished(Cell("cvdd", 10, 0, crop), 87.0),
            finished(Cell("cvdd", 10, 1, crop), 86.0),
            finished(Cell("sre2l", 10, 0, crop), 84.0),
            finished(Cell("random_real", 10, 0, crop), 85.0),
            finished(Cell("random_real", 10, 1, crop), 85.2),
            finished(Cell("random_real", 10, 0, crop, teachers="resnet18_small"), 83.5),
            finished(Cell("cvdd", 10, 0, crop, labels="hard"), 80.0),
            finished(Cell("random_real", 10, 0, crop, labels="hard"), 78.0),
            finished(Cell("cvdd", 1, 0, crop), 70.0),
            finished(Cell("random_real", 1, 0, crop), 69.9),
        ]
    )
    record = {
        "teachers": {
            "resnet18_small": {
                "tries": [{"epochs": 10, "test_top1": 91.0, "seconds": 80.0}],
                **{"epochs": 10, "test_top1": 91.0, "seconds": 80.0},
            }
        },
        "pool": {"test_top1": 92.5},
        "stages": {"full_data": {"seconds": 100.0, "cpu_seconds": 190.0, "test_top1": 93.0}},
        "crop": {"chosen": crop},
        "cells": cells,
        "sessions": [{"started": "2026-11-24T00:00:00+00:00", "seconds": 600.0, "commit": "abc"}],
    }
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fashion_mnist.json").write_text(json.dumps(record))
    return tmp_path


def test_targets_compare_with_the_larger_std_and_say_the_gap(state: Path):
    lines = bench.targets(bench.Bench(state / "work", state / "out").state)
    # IPC 10: CV-DD 86.5 ± 0.71, random_real 85.1 ± 0.14: +1.40 beats the larger std
    assert any(
        line.startswith("* IPC 10: CV-DD 86.50 vs random_real 85.10: +1.40 points") and "met" in line for line in lines
    )
    assert "* IPC 10: CV-DD vs SRe2L++ 84.00: +2.50: met" in lines
    assert "* IPC 10 moonshot: CV-DD vs best hard-label 86.0: +0.50: met" in lines
    assert any(line.startswith("* IPC 1: CV-DD 70.00 vs random_real 69.90: +0.10") for line in lines)
    assert not any("82.0" in line or "84.0 vs" in line for line in lines), "the other crop scale is not the grid"


def test_hlr_and_ior_follow_dd_ranking(state: Path):
    b = bench.Bench(state / "work", state / "out")
    # random real cells outside the grid (a one-change check, a longer student) are not IOR's reference
    b.state["cells"].update(
        [
            finished(Cell("random_real", 10, 0, bench.ALT_CROP, check="tau4"), 95.0),
            finished(Cell("random_real", 10, 0, bench.ALT_CROP, epochs=bench.LONG_EPOCHS), 96.0),
        ]
    )
    rows = {(r[0], r[1]): r for r in bench.ranking_rows(b.state)}
    _, _, hard, hlr, ior = rows[("cvdd", "10")]
    assert hard.startswith("80.00") and hlr == "13.00" and ior == "+1.40"  # 93 − 80; 86.5 − 85.1
    assert rows[("sre2l", "10")][4] == "+0.50"  # 84.0 − random real under resnet18_small's labels (83.5)
    assert rows[("random_real", "10")][3] == "15.00"


def test_each_seed_is_shown_with_cvdd_s_lead_over_random_real(state: Path):
    lines = bench.per_seed_lines(bench.Bench(state / "work", state / "out").state)
    assert lines[0] == "| IPC | method | seed 0 | seed 1 |"
    assert "| 10 | cvdd | 87.00 | 86.00 |" in lines
    assert "| 10 | random_real | 85.00 | 85.20 |" in lines
    assert "| 10 | cvdd − random_real | +2.00 | +0.80 |" in lines  # seed by seed, not the means' gap
    assert "| 1 | cvdd − random_real | +0.10 | – |" in lines  # seed 1 has no IPC-1 cells
    assert not any("| 50 |" in line for line in lines) and not any("82.00" in line for line in lines)


def test_the_report_holds_protocol_tables_and_plot(state: Path):
    b = bench.Bench(state / "work", state / "out")
    bench.write_report(b)
    text = (state / "out" / "fashion_mnist.md").read_text()
    assert "## Protocol v2" in text and f"**({bench.ALT_CROP}, 1)**" in text
    assert "| cvdd | 70.00 ± 0.00 (n=1) | 86.50 ± 0.71 (n=2) |" in text
    assert "| cvdd | 84.00 / 84.50 | 87.00 / 87.50 |" in text  # the crop ablation, final / best
    assert "| ConvNet on all 60k images, hard labels (20 epochs) | 93.0 | 93.0 |" in text
    assert "| resnet18_small | 10 → 91.00 | 10 | 91.00 | 80 |" in text
    assert (state / "out" / "fashion_mnist.png").stat().st_size > 10_000
    # the teacher's try predates CPU timing: counted, not summed as zero or shown as nan
    assert "| squeeze (teachers, every try) | 1.3 | 0.0 (0 of 1 runs timed) |" in text
    assert "| all stages | 3.0 | 3.2 (1 of 2 runs timed) |" in text
    assert "Code per run (teacher tries and stages): not recorded: 2" in text


def test_a_stage_keeps_the_commit_that_ran_it(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    b.commit = "0123456789abcdef"
    monkeypatch.setattr(b, "job", lambda *a, **k: ({}, 5.0, 9.0))
    record = b.stage("distill/x", "distill", None, [])
    assert record == {"seconds": 5.0, "cpu_seconds": 9.0, "commit": "0123456789abcdef"}
    bench.write_report(b)
    assert "not recorded: 2, 01234567: 1" in (state / "out" / "fashion_mnist.md").read_text()


def test_finished_cells_are_skipped(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    monkeypatch.setattr(b, "job", lambda *a, **k: pytest.fail("a finished cell ran again"))
    record = b.cell(Cell("cvdd", 10, 0, bench.ALT_CROP))
    assert record["test_top1"] == 87.0 and len(b.state["cells"]) == 13


def test_a_check_changes_only_what_it_names_and_stays_out_of_the_grid(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    crop = bench.ALT_CROP
    calls = record_jobs(b, monkeypatch, 88.0)
    b.cell(Cell("cvdd", 10, 0, crop, check="init_real"))
    distilled = [o for name, o in calls if name == "distill"]
    assert distilled and "method.recover.init.mode=real" in distilled[0]
    assert any("set=cvdd_ipc10_it1000_crop0.5_init_real_s0" in o for o in distilled)
    calls.clear()
    b.cell(Cell("random_real", 10, 0, crop, check="tau4"))  # a student-only check reuses the grid's set and labels
    (evaluated,) = [o for name, o in calls if name == "evaluate"]
    assert "validate.temperature=4" in evaluated and "set=random_real_ipc10_s0" in evaluated
    assert not any("method.recover.init.mode=real" in o for _, o in calls)
    # the check cells are not grid cells: the targets still compare 86.5 with 85.1
    assert any(line.startswith("* IPC 10: CV-DD 86.50 vs random_real 85.10") for line in bench.targets(b.state))
    lines = bench.check_lines(b.state)
    assert "| cvdd | 87.00 / 87.50 | 88.00 / 88.50 | +1.00 |" in lines
    assert "| random_real | 85.00 / 85.50 | unchanged | – |" in lines  # init_real leaves random_real as it is
    assert "| random_real | 85.00 / 85.50 | 88.00 / 88.50 | +3.00 |" in lines  # tau4 changes every student


def test_checks_run_every_concerned_method_and_the_curve_of_changed_sets(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    ran: list = []
    monkeypatch.setattr(b, "cell", ran.append)
    b.checks(bench.ALT_CROP)
    keys = {c.key for c in ran}
    assert {m for m in bench.ORDER if f"{m}/ipc10/s0/crop0.5/soft/e300" in " ".join(keys)} == set(bench.ORDER)
    assert "random_real/ipc10/s0/crop0.5/soft/e300/x-init_real" not in keys  # nothing changes for random_real
    curve = [c for c in ran if c.iterations != bench.ITERATIONS]
    assert {(c.method, c.iterations, c.check) for c in curve} == {
        (m, i, "init_real") for m in ("sre2l", "cvdd") for i in bench.CURVE_ITERATIONS
    }
    assert Cell("cvdd", 10, 0, 0.5, iterations=80, check="init_real").set_name == "cvdd_ipc10_it80_crop0.5_init_real_s0"


def test_the_sets_are_pictured_side_by_side_as_their_students_read_them(state: Path):
    b = bench.Bench(state / "work", state / "out")
    names, ipc = [f"class{c}" for c in range(3)], 10
    labels, ipc_index = torch.arange(3).repeat_interleave(ipc), torch.arange(ipc).repeat(3)
    shades = [51, 102, 153, 204]  # one pixel level per method, in ORDER
    for shade, method in zip(shades, bench.ORDER, strict=True):
        artifact = DistilledArtifact(state / "work" / "artifacts", bench.DATASET, Cell(method, 10, 0, 0.5).set_name)
        images = torch.full((3 * ipc, 1, 28, 28), shade / 255)  # mean 0, std 1: the PNGs hold exactly `shade`
        write_set(
            artifact,
            [SetPiece.of(images, labels, ipc_index)],
            class_names=names,
            mean=[0.0],
            std=[1.0],
            seed=0,
            fields={"class_names": names},
        )
    b.pictures(0.5)

    picture = Image.open(state / "out" / bench.PICTURES).convert("L")
    first = bench.distilled_grid(*bench.set_pixels(artifact.folder, bench.PICTURE_COLUMNS)[:3], names)
    panel = first.width - bench.LABEL_WIDTH  # five columns, not the set's ten
    assert panel < 6 * 28 * 2 and picture.width == first.width + 3 * (panel + 12)
    starts = [bench.LABEL_WIDTH] + [first.width + 12 + k * (panel + 12) for k in range(3)]
    for start, shade in zip(starts, shades, strict=True):
        region = picture.crop((start, 18, start + panel, picture.height))
        levels = {level for count, level in region.getcolors() if count}
        assert shade in levels and not levels & (set(shades) - {shade}), "each panel shows its own method's set"
    assert b.state["pictures"]["cvdd"] == "cvdd_ipc10_it1000_crop0.5_s0"
    bench.write_report(bench.Bench(state / "work", state / "out"))  # the report reads the pictures from the state
    assert f"![sets]({bench.PICTURES})" in (state / "out" / "fashion_mnist.md").read_text()


def test_no_picture_until_every_method_has_its_set(state: Path):
    b = bench.Bench(state / "work", state / "out")
    b.pictures(0.5)
    assert not (state / "out" / bench.PICTURES).exists() and "pictures" not in b.state


def test_v3_compares_measured_priors_with_v2_and_reports_ior_per_seed(state: Path):
    b = bench.Bench(state / "work", state / "out")
    crop = bench.ALT_CROP
    b.state["cells"].update(
        [
            finished(Cell(bench.V3, 10, 0, crop), 88.0),
            finished(Cell(bench.V3, 10, 1, crop), 87.0),
            finished(Cell(bench.V3, 10, 0, crop, iterations=bench.RELEASED_ITERATIONS), 89.0),
            finished(Cell(bench.REAL_V3, 10, 0, crop), 85.5),
            finished(Cell(bench.REAL_V3, 10, 1, crop), 85.0),
        ]
    )
    lines = bench.v3_lines(state / "work", b.state)
    row = next(line for line in lines if line.startswith("| 10 |"))
    # v2 CV-DD 86.5 ± 0.71, no rerun yet; v3 87.5 ± 0.71; v3 at 4,000 it. 89.0; IOR seeds 88 − 85.5, 87 − 85.0
    assert "| 86.50 ± 0.71 (n=2) | – | 87.50 ± 0.71 (n=2) | 89.00 ± 0.00 (n=1) | +2.25 (seeds: +2.50, +2.00) |" in row
    assert "* IPC 10: measured priors +1.00 points over v2's CV-DD as recorded" in lines
    assert not any(line.startswith("* IPC 10:") and "made again" in line for line in lines)  # no rerun to compare
    assert "* IPC 10: 4,000 instead of 1,000 iterations +1.50 points more" in lines
    assert "* IPC 10: measured priors and 4,000 iterations together +2.50 points over v2's CV-DD as recorded" in lines
    assert "Priors not measured yet." in lines
    assert not any(line.startswith("| 1 |") for line in lines)  # no v3 cell at IPC 1


def test_v3_at_another_ipc_reports_the_ior_of_the_iterations_it_ran(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    crop, released = bench.ALT_CROP, bench.RELEASED_ITERATIONS
    ran: list = []
    monkeypatch.setattr(b, "cell", ran.append)
    b.v3_at(crop, 1, [0, 1], [released])
    assert [(c.method, c.seed, c.labels, c.iterations) for c in ran] == [
        (bench.V3, 0, "soft", released),
        (bench.REAL_V3, 0, "soft", bench.ITERATIONS),
        (bench.V3, 0, "hard", released),
        (bench.V3, 1, "soft", released),
        (bench.REAL_V3, 1, "soft", bench.ITERATIONS),
        (bench.V3, 1, "hard", released),
    ]
    b.state["cells"].update(
        [
            finished(Cell(bench.V3, 1, 0, crop, iterations=released), 60.0),
            finished(Cell(bench.V3, 1, 1, crop, iterations=released), 58.0),
            finished(Cell(bench.REAL_V3, 1, 0, crop), 57.0),
            finished(Cell(bench.REAL_V3, 1, 1, crop), 59.0),
        ]
    )
    row = next(line for line in bench.v3_lines(state / "work", b.state) if line.startswith("| 1 |"))
    # only 4,000-iteration sets at IPC 1: no 1,000-iteration IOR, the 4,000-iteration one per seed (60 − 57, 58 − 59)
    assert row.endswith("| – | +1.00 (seeds: +3.00, -1.00) |")


def test_diversity_rows_join_sets_with_their_students_and_rank_correlate_per_ipc(state: Path):
    b = bench.Bench(state / "work", state / "out")
    crop = bench.ALT_CROP
    # sets on disk are v2's recipes made again (rerun, with their own students) and v3's; v2's records are not joined
    reruns = {"random_real": 85.0, "sre2l": 84.0, "rded": 80.0, "cvdd": 87.0}
    b.state["cells"].update(finished(Cell(m, 10, 0, crop, rerun=True), v) for m, v in reruns.items())
    b.state["cells"].update([finished(Cell(bench.V3, 10, 0, crop), 88.0)])
    values = {"random_real": 0.5, "sre2l": 0.1, "rded": 0.3, "cvdd": 0.4, bench.V3: 0.45}
    b.state["diversity"] = {
        Cell(m, 10, 0, crop).set_name: {"pixels": v, "features": 1 - v, "fingerprint": "x"} for m, v in values.items()
    }
    lines = bench.diversity_lines(b.state)
    assert "| cvdd (rerun), 1000 it. | 10 | 0 | 0.400 | 0.600 | 87.00 |" in lines
    assert "| random_real (rerun) | 10 | 0 | 0.500 | 0.500 | 85.00 |" in lines
    assert sum(line.startswith("| ") for line in lines) == 1 + 5  # the header and five sets with a student
    # top-1 ranks 4, 2, 3, 1, 5 against pixel ranks 3, 1, 5, 2, 4: Σd² = 8, ρ = 1 − 6·8 / 120 = +0.60
    assert "* IPC 10 (5 sets): Spearman ρ of top-1 with pixel diversity +0.60, with feature diversity -0.60" in lines


def test_a_rerun_of_v2_remakes_its_set_apart_and_becomes_v3_s_comparison(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    crop = bench.ALT_CROP
    calls = record_jobs(b, monkeypatch, 85.0)
    b.stage(f"distill/{Cell('cvdd', 10, 1, crop).set_name}", "distill", None, [])  # v2's record of the set
    calls.clear()
    b.rerun_v2(crop, [10], ["cvdd"], [0, 1])
    # v2's records of the same set name do not stand in for the rerun: every stage runs again, under v2's set name
    assert [name for name, _ in calls] == ["distill", "relabel", "evaluate"] * 2
    assert all(f"set={Cell('cvdd', 10, s, crop).set_name}" in calls[3 * s][1] for s in (0, 1))
    assert "distill/cvdd_ipc10_it1000_crop0.5_s1/rerun" in b.state["stages"]
    assert "cvdd/ipc10/s1/crop0.5/soft/e300/it1000/rerun" in b.state["cells"]
    # the grid (targets, v2's tables) keeps v2's cells only: 86.5 = mean of 87 and 86
    assert bench.mean_of(bench.grid_cells(b.state, labels="soft"), "cvdd", 10)[0] == pytest.approx(86.5)
    # v3 (86.0) beats v2's rerun (85.0 in both seeds), not its record (86.5): either is enough to go on
    b.state["cells"].update([finished(Cell(bench.V3, 10, s, crop), 86.0) for s in (0, 1)])
    assert b.v3_better() == [bench.ITERATIONS]
    del b.state["cells"]["cvdd/ipc10/s1/crop0.5/soft/e300/it1000/rerun"]
    assert b.v3_better() == []  # seed 1 not rerun: v2's record is the only comparison
    lines = bench.v3_lines(state / "work", b.state)
    assert "* IPC 10: v2's CV-DD made again in v3's environment -1.50 points over v2's record (n=1)" in lines
    assert "* IPC 10: measured priors +1.00 points over v2's CV-DD made again" in lines
    # above the record (86.5) but below the rerun (87.0 in both seeds): the rule as written still goes on
    b.state["cells"].update([finished(Cell("cvdd", 10, s, crop, rerun=True), 87.0) for s in (0, 1)])
    b.state["cells"].update([finished(Cell(bench.V3, 10, s, crop), 86.7) for s in (0, 1)])
    assert b.v3_better() == [bench.ITERATIONS]
    b.state["cells"].update([finished(Cell(bench.V3, 10, s, crop), 86.4) for s in (0, 1)])
    assert b.v3_better() == []  # below both


def test_stages_recorded_in_another_work_folder_run_again_when_their_output_is_gone(
    state: Path, monkeypatch: pytest.MonkeyPatch
):
    b = bench.Bench(state / "work", state / "out")
    crop = bench.ALT_CROP
    calls = record_jobs(b, monkeypatch, 85.0)
    cell = Cell("random_real", 50, 2, crop, rerun=True)
    b.stage(f"distill/{cell.set_name}/rerun", "distill", None, [])  # recorded by a run in a folder now gone
    calls.clear()
    b.cell(cell)
    assert [name for name, _ in calls] == ["distill", "relabel", "evaluate"]
    assert f"distill/{cell.set_name}/rerun" in b.state["lost_stages"]
    # a recorded stage whose output is there is not run again
    other = Cell("random_real", 50, 1, crop, rerun=True)
    b.stage(f"distill/{other.set_name}/rerun", "distill", None, [])
    manifest = bench.DistilledArtifact(b.variant_artifacts(other.variant), bench.DATASET, other.set_name).manifest
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    calls.clear()
    b.cell(other)
    assert [name for name, _ in calls] == ["relabel", "evaluate"]
