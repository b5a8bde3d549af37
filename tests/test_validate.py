"""Validate: KL loss by hand, offline labels = online labels, the chain on digits, baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvdd.artifacts.distilled import to_pixels
from cvdd.data import get_spec
from cvdd.labels.plan import apply_batch
from cvdd.labels.protocol import build_plan, label_settings, teacher_weights
from cvdd.labels.student_set import student_set
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.validate import offline_labels, online_labels, validate
from cvdd.training.student import kd_loss

DISTILL = ("ipc=2", "method.recover.iterations=2", "method.recover.init.mode=real", "logger=none")
PLAN = ("ipc=2", "method.recover.init.mode=real", "relabel.epochs=3", "relabel.batch_size=8")


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    tau = 2.0
    p = torch.softmax(t / tau, dim=1)
    q = torch.softmax(s / tau, dim=1)
    expected = (p * (p.log() - q.log())).sum(dim=1).mean()
    assert kd_loss(s, t, tau).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture
def labelled(make_cfg, workdir: Path) -> Path:
    distill(make_cfg("distill", *DISTILL))
    relabel(make_cfg("relabel", *PLAN))
    return workdir


def test_offline_labels_equal_online_labels(make_cfg, labelled: Path):
    cfg = make_cfg("evaluate", *PLAN)
    chosen = student_set(cfg, labelled / "artifacts")
    images = chosen.read()
    plan = build_plan(cfg, len(chosen))
    expected = label_settings(cfg, teacher_weights(cfg, labelled / "artifacts"), plan, chosen)
    offline, _ = offline_labels(cfg, labelled / "artifacts", chosen, expected, plan)
    online, _ = online_labels(cfg, labelled / "artifacts", [str(i) for i in range(10)])
    for epoch in range(3):
        for b, batch in enumerate(plan.epoch(epoch)):
            x = apply_batch(images, batch)
            stored, fresh = offline(epoch, b, batch, lambda x=x: x), online(epoch, b, batch, lambda x=x: x)
            assert torch.allclose(stored, fresh, atol=2e-2, rtol=1e-2)  # fp16 storage


def test_chain_on_digits_writes_results_and_checks_the_plan(make_cfg, labelled: Path):
    result = validate(make_cfg("evaluate", *PLAN, "validate.eval_every=1", "logger=none"))
    (out,) = (labelled / "artifacts/digits/results").glob("small_ipc2_real_s0__convnet__offline__cvdd__*.json")
    on_disk = json.loads(out.read_text())
    assert on_disk["test_samples"] == 360 and on_disk["epochs"] == 3 and on_disk["labels"] == "offline"
    assert on_disk["test_top1"] == result["test_top1"] and 0 <= result["test_top1"] <= 100
    curve = result["test_top1_curve"]
    assert [epoch for epoch, _ in curve] == [1, 2, 3] and curve[-1][1] == pytest.approx(result["test_top1"])
    assert result["test_top1_best"] == max(top1 for _, top1 in curve) and result["eval_every"] == 1
    assert curve[result["test_top1_best_epoch"] - 1][1] == result["test_top1_best"]
    assert result["images_format"] == "png"
    with pytest.raises(ValueError, match="the epoch plan"):
        validate(make_cfg("evaluate", *PLAN, "seed=1", "set=small_ipc2_real_s0", "logger=none"))
    (labelled / "artifacts/digits/labels/small_ipc2_real_s0/manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"make them with:\n  python relabel\.py paths\.root=\S+ ipc=2"):
        validate(make_cfg("evaluate", *PLAN, "logger=none"))


def test_random_real_with_hard_labels_baseline_runs(make_cfg, workdir: Path, random_real):
    random_real("ipc=5")
    result = validate(
        make_cfg(
            "evaluate",
            "method=random_real",
            "labels=hard",
            "ipc=5",
            "relabel.epochs=10",
            "relabel.batch_size=10",
            "logger=none",
            "validate.eval_every=5",
        )
    )
    assert result["name"] == "random_real_ipc5_s0" and result["labels"] == "hard"
    assert result["test_top1"] > 30.0, "50 real digits and 10 epochs beat chance (10 %) by far"


def test_topk_labels_are_stored_beside_dense_ones_and_train_the_student(make_cfg, labelled: Path):
    dense = relabel(make_cfg("relabel", *PLAN))
    sparse = relabel(make_cfg("relabel", *PLAN, "relabel.topk=3"))
    folder = labelled / "artifacts/digits/labels/small_ipc2_real_s0_top3"
    assert sparse["topk"] == 3 and (folder / "epoch_0002.pt").is_file()
    assert sparse["payload_bytes_per_image_per_epoch"] == 3 * 2 + 3 * 1 + 2  # fp16 values, uint8 indices, rest
    assert dense["payload_bytes_per_image_per_epoch"] == 10 * 2
    stored = torch.load(folder / "epoch_0000.pt", weights_only=True)
    full = torch.load(labelled / "artifacts/digits/labels/small_ipc2_real_s0/epoch_0000.pt", weights_only=True)
    assert torch.equal(stored["indices"].long().sort(1).values, full["logits"].float().topk(3).indices.sort(1).values)

    result = validate(make_cfg("evaluate", *PLAN, "relabel.topk=3", "logger=none"))
    assert result["label_topk"] == 3 and result["label_payload_bytes"] == 11
    (topk_file,) = (labelled / "artifacts/digits/results").glob("small_ipc2_real_s0__convnet__offline_top3__*.json")
    longer = validate(make_cfg("evaluate", *PLAN, "relabel.topk=3", "validate.epochs=2", "logger=none"))
    assert longer["epochs"] == 2 and topk_file.is_file(), "another recipe gets its own result file"
    assert len(list((labelled / "artifacts/digits/results").glob("*offline_top3*.json"))) == 2


def test_random_real_gets_the_same_offline_soft_labels(make_cfg, workdir: Path, random_real):
    random_real("ipc=2")
    plan = [o for o in PLAN if not o.startswith("method.recover")]  # CV-DD's own settings
    manifest = relabel(make_cfg("relabel", *plan, "method=random_real"))
    assert manifest["name"] == "random_real_ipc2_s0" and len(manifest["teachers"]) == 5
    assert manifest["method"] == "random_real" and manifest["ipc"] == 2
    result = validate(make_cfg("evaluate", *plan, "method=random_real", "logger=none"))
    assert result["method"] == "random_real" and result["labels"] == "offline" and result["label_bytes"] > 20
    again = validate(make_cfg("evaluate", *plan, "method=random_real", "logger=none"))
    assert again["test_top1"] == result["test_top1"], "same seed, same student"


def test_png_images_are_the_exported_pixels_and_labels_follow_the_format(make_cfg, labelled: Path):
    spec = get_spec("digits")
    chosen = student_set(make_cfg("evaluate", *PLAN), labelled / "artifacts")
    stored = torch.load(chosen.artifact.tensors, weights_only=True)["images"]
    png = chosen.read()[torch.arange(len(chosen))]
    assert torch.equal(to_pixels(png, spec.mean, spec.std), to_pixels(stored, spec.mean, spec.std))
    assert 0 < (png - stored).abs().max() <= 0.5 / 255 / spec.std[0] + 1e-6, "rounded to the nearest level"

    floats = relabel(make_cfg("relabel", *PLAN, "distilled.format=float"))
    assert (
        floats["images_format"] == "float" and (labelled / "artifacts/digits/labels/small_ipc2_real_s0_float").is_dir()
    )
    result = validate(make_cfg("evaluate", *PLAN, "distilled.format=float", "logger=none"))
    assert result["images_format"] == "float" and result["config"]["distilled"]["format"] == "float"

    # the set changes under its labels (distilled again with other settings): the labels are refused
    distill(make_cfg("distill", *DISTILL, "method.recover.iterations=3", "overwrite=true"))
    with pytest.raises(ValueError, match=r"the images \(the set was distilled again"):
        validate(make_cfg("evaluate", *PLAN, "logger=none"))


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("relabel.teachers=resnet18_small", "relabel.teachers and their weights"),
        ("relabel.bssl=false", "relabel.bssl: True in the labels, False asked here"),
        ("relabel.halves=true", "relabel.halves: False in the labels, True asked here"),
        ("relabel.temperature=5", "relabel.temperature: 10.0 in the labels, 5.0 asked here"),
        ("relabel.dtype=float32", "relabel.dtype: 'float16' in the labels, 'float32' asked here"),
    ],
)
def test_labels_made_with_other_settings_are_refused(make_cfg, labelled: Path, setting: str, named: str):
    with pytest.raises(ValueError) as err:
        validate(make_cfg("evaluate", *PLAN, setting, "validate.epochs=2", "logger=none"))
    message = str(err.value)
    assert named in message
    command = message.split("Make matching labels: ")[1].splitlines()[0]
    assert command.startswith("python relabel.py ") and setting in command and command.endswith("overwrite=true")
    assert "validate.epochs" not in command and "logger=none" in command
    assert not (labelled / "artifacts/digits/results").exists(), "refused before training"


def test_png_sets_never_open_images_pt(make_cfg, labelled: Path):
    """``images.pt`` overwritten with noise of its recorded size: the PNG path trains as before; ``float`` refuses."""
    from cvdd.artifacts import ArtifactCorruptError

    first = validate(make_cfg("evaluate", *PLAN, "validate.epochs=1", "logger=none"))
    tensors = labelled / "artifacts/digits/distilled/small_ipc2_real_s0/images.pt"
    tensors.write_bytes(bytes(reversed(tensors.read_bytes())))
    again = validate(make_cfg("evaluate", *PLAN, "validate.epochs=1", "logger=none"))
    assert again["test_top1"] == first["test_top1"]
    with pytest.raises(ArtifactCorruptError, match=r"images\.pt differs from the file its manifest records"):
        chosen = student_set(make_cfg("evaluate", *PLAN, "distilled.format=float"), labelled / "artifacts")
        chosen.read()
