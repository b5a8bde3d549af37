"""The Fashion-MNIST benchmark's bookkeeping: targets, report files, cell skipping (no training here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "fashion_mnist_bench", Path(__file__).parents[1] / "bench/fashion_mnist.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def cell(method: str, ipc: int, seed: int, top1: float, topk: int | None = None) -> dict:
    return {
        "method": method,
        "ipc": ipc,
        "seed": seed,
        "topk": topk,
        "test_top1": top1,
        "test_top5": 99.0,
        "student": "convnet",
        "epochs": bench.EPOCHS[ipc],
        "iterations": 80,
        "seconds": {"distill": 60.0, "relabel": 30.0, "evaluate": 30.0},
        "label_bytes_per_image_per_epoch": 35.6 if topk is None else 30.0,
        "label_payload_bytes_per_image_per_epoch": 20.0 if topk is None else 11.0,
        "teachers": {},
    }


@pytest.fixture
def state(tmp_path: Path) -> Path:
    cells = [
        cell("cvdd", 1, 0, 70.0),
        cell("cvdd", 1, 1, 72.0),
        cell("sre2l", 1, 0, 71.5),
        cell("random_real", 1, 0, 60.0),
        cell("cvdd", 10, 0, 87.0),
        cell("sre2l", 10, 0, 80.0),
        cell("random_real", 10, 0, 86.5),
        cell("cvdd", 10, 0, 86.0, topk=3),
    ]
    keys = [f"{c['method']}/ipc{c['ipc']}/s{c['seed']}" + (f"/top{c['topk']}" if c["topk"] else "") for c in cells]
    record = {
        "teachers": {"resnet18_small": {"test_top1": 88.0, "epochs": 1, "seconds": 80.0}},
        "cells": dict(zip(keys, cells, strict=True)),
        "sessions": [{"started": "2026-11-24T00:00:00+00:00", "seconds": 600.0, "commit": "abc"}],
    }
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fashion_mnist.json").write_text(json.dumps(record))
    return tmp_path


def test_targets_say_met_or_missed_with_the_gap(state: Path):
    groups = bench.Bench(state / "work", state / "out").groups()
    lines = bench.targets(groups)
    assert "* IPC 1: CV-DD 71.00 vs SRe2L++ 71.50: MISSED (-0.50 points)" in lines
    assert "* IPC 1: CV-DD 71.00 vs best classic hard-label (81.0) 81.00: MISSED (-10.00 points)" in lines
    assert "* IPC 10: CV-DD 87.00 vs random_real 86.50: met (+0.50 points)" in lines
    assert "* IPC 10: CV-DD 87.00 vs best classic hard-label (86.0) 86.00: met (+1.00 points)" in lines
    assert not any("top" in line for line in lines), "top-k cells are not a method of their own"


def test_report_files_hold_the_table_the_classic_rows_and_storage(state: Path):
    b = bench.Bench(state / "work", state / "out")
    bench.write_report(b)
    text = (state / "out" / "fashion_mnist.md").read_text()
    assert "| cvdd | 71.00 ± 1.41 (n=2) | 87.00 ± 0.00 (n=1) |" in text
    assert "| IDC (published) | 81.0 | 86.0 |" in text
    assert "| top-3 | 11.0 | 30.0 | 86.00 |" in text and "| fp16 dense | 20.0 | 35.6 | 87.00 |" in text
    assert "| all stages | 17.3 |" in text  # 80 s of squeeze + 8 cells of 120 s
    assert (state / "out" / "fashion_mnist.png").stat().st_size > 10_000


def test_finished_cells_are_skipped(state: Path, monkeypatch: pytest.MonkeyPatch):
    b = bench.Bench(state / "work", state / "out")
    monkeypatch.setattr(b, "job", lambda *a, **k: pytest.fail("a finished cell ran again"))
    b.cell("cvdd", 10, 0)
    b.cell("cvdd", 10, 0, topk=3)
    assert len(b.state["cells"]) == 8
