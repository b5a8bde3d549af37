"""bench/gpu_smoke.py on CPU: the four stages of the paper's preset on a miniature CIFAR-100, as far as a CPU goes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_smoke_runs_every_stage_of_the_preset_and_records_its_cost(tmp_path: Path):
    out = tmp_path / "smoke"
    command = [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--hardware", "cpu", "--out", str(out)]
    command += ["--json", str(out / "gpu_smoke.json")]
    command += ["--members", "resnet18_small,mobilenetv2_small", "--student", "convnet_small"]
    command += ["--ipc", "1", "--iterations", "2", "--epochs", "1", "--per-class", "2"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_smoke.json").read_text())
    stages = record["results"]["cpu"]
    assert list(stages) == ["squeeze", "distill", "relabel", "evaluate"]
    for stage, result in stages.items():
        assert result["seconds"] > 0 and result["peak_rss_bytes"] > 100e6, stage
        assert 50e6 < result["peak_pss_bytes"] <= result["peak_rss_bytes"], stage  # shared pages split, not summed
        assert result["peak_gpu_bytes"] is None, "no GPU here: none is claimed"
    distill = stages["distill"]
    assert distill["s_per_image_iteration"] == pytest.approx(distill["seconds"] / (100 * 1 * 2))
    manifest = next((out / "cpu" / "artifacts" / "cifar100" / "distilled").glob("*/manifest.json"))
    assert json.loads(manifest.read_text())["images"] == 100, "one image per class of the miniature CIFAR-100"
    assert next((out / "cpu" / "artifacts" / "cifar100" / "results").glob("*.json")).is_file()
    assert "| cpu | distill |" in proc.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_the_shell_entry_refuses_a_machine_without_a_gpu_and_says_what_to_run():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "python bench/gpu_smoke.py --hardware cpu" in proc.stderr
