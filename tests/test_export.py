"""python -m cvdd.export: a set as an ImageFolder and a tensor file, read back the way DD-Ranking reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEMBERS, ROOT
from PIL import Image
from torchvision.datasets import ImageFolder

from cvdd.artifacts.distilled import from_pixels
from cvdd.data import get_spec
from cvdd.export import export
from cvdd.labels.bssl import soft_label_logits
from cvdd.labels.protocol import relabel_committee
from cvdd.labels.student_set import student_set
from cvdd.runtime.errors import ConfigError

SET = ("method=random_real", "ipc=2", "logger=none")


def test_an_export_read_back_as_dd_ranking_reads_it_matches_the_set(make_cfg, workdir: Path, random_real):
    random_real("ipc=2")
    cfg = make_cfg("relabel", *SET)
    out = export(cfg, workdir / "export")
    data = torch.load(out / "set.pt", weights_only=True)

    hard = torch.arange(10).repeat_interleave(2)  # DD-Ranking's hard labels: ipc images per class, in class order
    assert torch.equal(data["labels"], hard)
    chosen = student_set(cfg, workdir / "artifacts")
    assert torch.equal(data["images"], chosen.read()[torch.arange(len(chosen))]), "the set's images, class-major"
    spec = get_spec("digits")
    assert data["mean"] == list(spec.mean) and data["std"] == list(spec.std) and data["classes"] == chosen.classes

    folder = ImageFolder(str(out / "images"))
    assert folder.classes[:2] == ["000_0", "001_1"] and [t for _, t in folder.samples] == hard.tolist()
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p)))[None] for p, _ in folder.samples])
    assert torch.equal(from_pixels(pixels, spec.mean, spec.std), data["images"]), "the PNGs hold the same pixels"

    weights = data["teachers"]
    assert sorted(weights) == sorted(MEMBERS) and sum(weights.values()) == pytest.approx(1.0)
    committee = relabel_committee(cfg, workdir / "artifacts", chosen.classes, weights)
    again = soft_label_logits(committee.members, weights, data["images"], bssl=False, numerics=committee.numerics)
    assert data["soft_labels"].shape == (20, 10) and torch.allclose(data["soft_labels"], again)
    text = (out / "README.md").read_text()
    assert "compute_metrics(image_tensor=" in text and "class-major" in text and "mode `S`" in text
    assert not (workdir / ".export.partial").exists()
    with pytest.raises(ConfigError, match=r"export exists; choose a new folder"):
        export(cfg, workdir / "export")


def test_the_export_command_runs_from_the_launch_folder(workdir: Path, random_real):
    random_real("ipc=2")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cvdd.export", *SET, "--to", "out", "--no-soft-labels"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = torch.load(workdir / "out" / "set.pt", weights_only=True)
    assert len(data["images"]) == 20 and "soft_labels" not in data
