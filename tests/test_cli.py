"""The real command line: a -m sweep, DDP on two CPU processes, and a DDP sweep (Lightning #11300)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import run_cli

FAST = ["dataset=digits", "squeeze.epochs=2", "logger=csv"]


def sweep_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "logs" / "train" / "multiruns").iterdir())


def test_multirun_sweep_squeezes_each_model(tmp_path: Path):
    run_cli("train.py", "-m", "model=convnet_small,shufflenetv2_small", *FAST, cwd=tmp_path)
    teachers = tmp_path / "artifacts" / "digits" / "teachers"
    for model in ("convnet_small", "shufflenetv2_small"):
        record = json.loads((teachers / f"{model}.json").read_text())
        assert record["model"] == model and record["epochs"] == 2 and record["test_top1"] > 10
    (sweep,) = sweep_dirs(tmp_path)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert "model=" in overrides
        assert (sweep / job / "csv").is_dir()


def test_ddp_cpu_trains_on_two_processes(tmp_path: Path):
    proc = run_cli("train.py", "hardware=ddp_cpu", "model=convnet_small", *FAST, cwd=tmp_path)
    assert "world_size: 2" in proc.stdout + proc.stderr or "distributed_backend=gloo" in proc.stdout + proc.stderr
    record = json.loads((tmp_path / "artifacts/digits/teachers/convnet_small.json").read_text())
    assert record["test_samples"] == 360, "final accuracy from one device over the whole test set"
    (run,) = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert (run / "train_rank1.log").exists(), "rank 1 ran as a run of this job, in its folder"


@pytest.mark.slow
def test_ddp_cpu_sweep_does_not_relaunch_the_sweep_in_ranks(tmp_path: Path):
    run_cli("train.py", "-m", "hardware=ddp_cpu", "model=convnet_small,shufflenetv2_small", *FAST, cwd=tmp_path)
    teachers = tmp_path / "artifacts" / "digits" / "teachers"
    assert {p.name for p in teachers.glob("*.json")} == {"convnet_small.json", "shufflenetv2_small.json"}
    (sweep,) = sweep_dirs(tmp_path)  # a rank re-running the sweep would create a second sweep folder
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "train_rank1.log").exists()
    assert not (tmp_path / "logs" / "train" / "runs").exists()


def test_evaluate_seed_sweep_prints_and_writes_mean_and_std(tmp_path: Path):
    run_cli("distill.py", "-m", "method=random_real", "seed=0,1,2", "ipc=2", "logger=none", cwd=tmp_path)
    proc = run_cli(
        "evaluate.py",
        "-m",
        "seed=0,1,2",
        "method=random_real",
        "labels=hard",
        "ipc=2",
        "relabel.epochs=3",
        "relabel.batch_size=8",
        "logger=none",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "evaluate" / "multiruns").iterdir()
    top1 = [json.loads((sweep / str(i) / "result.json").read_text())["test_top1"] for i in range(3)]
    expected = f"| random_real | {statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f} (n=3) |"
    assert expected in proc.stdout
    assert expected in (sweep / "summary.md").read_text() and (sweep / "summary.png").is_file()
