"""method=external: a set made elsewhere comes in, is checked against the teachers, and gives what the set it was
written from gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import squeeze_members, with_teachers
from PIL import Image

from cvdd.artifacts import load_json, load_tensors
from cvdd.artifacts.distilled import png_files
from cvdd.export import export
from cvdd.labels.plan import BatchPlan
from cvdd.labels.static import mixed_targets
from cvdd.runtime.errors import ConfigError, DataError, MissingInputError
from cvdd.runtime.provenance import package_version
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.validate import validate

# one ResNet-18 squeezed for 4 epochs: the class-order check needs teachers that know the classes (the shared
# 1-epoch committee is near chance)
SMALL = ("ipc=2", "committee=sre2l_small", "logger=none")
PLAN = (*SMALL, "relabel.epochs=2", "relabel.batch_size=8")
SOURCE_SET = "random_real_ipc2_s0"


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory) -> Path:
    return squeeze_members(tmp_path_factory.mktemp("sharp"), ["resnet18_small"], epochs=4)


@pytest.fixture
def workdir(tmp_path: Path, sharp_teacher: Path) -> Path:
    return with_teachers(tmp_path, sharp_teacher)


def released_layout(workdir: Path, out: Path, order: list[int] | None = None, suffix: str = ".png") -> Path:
    """The set ``random_real_ipc2_s0`` rewritten as the CV-DD authors ship theirs: ``new<c>/class<c>_id<i>.jpg``;
    ``order[c]`` puts class ``c``'s images in folder ``new<order[c]>`` (a class-shuffled copy)."""
    folder = workdir / "artifacts/digits/distilled" / SOURCE_SET
    names, labels, ipc_index = png_files(load_json(folder / "manifest.json")["files"])
    for name, c, i in zip(names, labels.tolist(), ipc_index.tolist(), strict=True):
        k = order[c] if order else c
        target = out / f"new{k:03d}" / f"class{k:03d}_id{i:03d}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(folder / name) as image:
            image.save(target, quality=95) if suffix == ".jpg" else shutil.copyfile(folder / name, target)
    return out


def test_the_authors_layout_imports_and_gives_the_top1_of_the_set_it_came_from(make_cfg, workdir: Path, caplog):
    distill(make_cfg("distill", "method=random_real", *SMALL))
    relabel(make_cfg("relabel", "method=random_real", *PLAN))
    original = validate(make_cfg("evaluate", "method=random_real", *PLAN))
    source = released_layout(workdir, workdir / "cvdd_digits_ipc2")

    imported = ("method=external", f"method.source={source}")
    manifest = distill(make_cfg("distill", *imported, *SMALL))
    assert manifest["name"] == "external_cvdd_digits_ipc2" and manifest["ipc"] == 2 and manifest["images"] == 20
    assert (
        "numbered" in manifest["source"]["classes_matched_by"] and "folder number n is taken as class n" in caplog.text
    )
    assert manifest["source"]["class_of"]["new003"] == "3" and len(manifest["source"]["files"]) == 20
    assert manifest["import_check"]["teacher_top1"] > 2 * manifest["import_check"]["chance"]
    assert manifest["recipe"]["source"], "the source's content is part of the recipe"
    relabel(make_cfg("relabel", *imported, *PLAN))
    result = validate(make_cfg("evaluate", *imported, *PLAN))
    assert result["test_top1"] == original["test_top1"], "same pixels, same labels, same student"
    for record in (manifest, result, load_json(workdir / "artifacts/digits/teachers/resnet18_small.json")):
        assert record["provenance"]["versions"]["torch"] == package_version("torch"), "every stage says what made it"
    assert distill(make_cfg("distill", *imported, *SMALL)) == manifest, "imported once"

    jpeg = released_layout(workdir, workdir / "cvdd_digits_ipc2_jpeg", suffix=".jpg")  # as the authors ship them
    distill(make_cfg("distill", "method=external", f"method.source={jpeg}", *SMALL))
    sets = workdir / "artifacts/digits/distilled"
    exact, lossy = (
        load_tensors(sets / name / "images.pt", "")["images"] for name in (SOURCE_SET, "external_cvdd_digits_ipc2_jpeg")
    )
    assert 0 < (exact - lossy).abs().mean() * 0.3186 * 255 < 3, "JPEG moves pixels by a few levels at most on average"


def test_a_class_shuffled_import_is_refused_with_a_suggested_map_that_fixes_it(make_cfg, workdir: Path):
    distill(make_cfg("distill", "method=random_real", *SMALL))
    order = [3, 0, 1, 2, 4, 5, 6, 7, 9, 8]
    source = released_layout(workdir, workdir / "shuffled", order)
    imported = ("method=external", f"method.source={source}", *SMALL)
    cfg = make_cfg("distill", *imported)
    with pytest.raises(DataError, match=r"(?s)permuted .*new003 \(imported as 3\) looks like 0.*method\.class_map="):
        distill(cfg)
    suggested = Path(cfg.paths.output_dir) / "suggested_class_map.json"
    mapping = json.loads(suggested.read_text())
    assert mapping["new003"] == "0" and mapping["new009"] == "8"
    assert not (workdir / "artifacts/digits/distilled/external_shuffled/manifest.json").exists()
    fixed = distill(make_cfg("distill", *imported, f"method.class_map={suggested}"))
    assert fixed["source"]["classes_matched_by"] == "class map"
    assert fixed["import_check"]["teacher_top1"] == fixed["import_check"]["best_permutation_top1"]
    forced = distill(make_cfg("distill", *imported, "set=forced", "method.force=true"))
    assert forced["import_check"]["forced"] and forced["import_check"]["teacher_top1"] < 50


def test_a_tensor_file_imports_like_the_folder(make_cfg, workdir: Path, tmp_path: Path):
    made = distill(make_cfg("distill", "method=random_real", *SMALL))
    folder = workdir / "artifacts/digits/distilled" / SOURCE_SET
    saved = load_tensors(folder / "images.pt", "")
    pixels = torch.stack(
        [torch.from_numpy(__import__("numpy").array(Image.open(folder / n)))[None] for n in png_files(made["files"])[0]]
    )
    torch.save({"images": pixels, "labels": saved["labels"]}, tmp_path / "set.pt")
    manifest = distill(make_cfg("distill", "method=external", f"method.source={tmp_path / 'set.pt'}", *SMALL))
    assert manifest["name"] == "external_set" and manifest["source"]["kind"] == "tensor"
    assert list(manifest["source"]["files"]) == ["set.pt"]
    imported = load_tensors(workdir / "artifacts/digits/distilled/external_set/images.pt", "")
    assert torch.equal(imported["labels"], saved["labels"])
    assert torch.allclose(imported["images"], saved["images"], atol=1 / 255 / 0.3), "within one grey level"
    floats = {"images": imported["images"], "labels": saved["labels"]}
    torch.save(floats, tmp_path / "floats.pt")
    with pytest.raises(ConfigError, match=r"float images: say how they are scaled, method\.normalized=true"):
        distill(make_cfg("distill", "method=external", f"method.source={tmp_path / 'floats.pt'}", *SMALL))


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("resize", r"new000/class000_id000\.png is 24×24 px; the dataset's images are 16×16\. Add method\.resize=true"),
        ("unreadable", r"new001/class001_id000\.png cannot be read as an image"),
        ("missing_class", r"has no images of 1 class\(es\) of digits: 9; a set needs every class"),
        ("unknown_names", r"class folders cats, new001, .* match no class .*method\.class_map="),
    ],
)
def test_bad_sources_are_refused_naming_the_file_and_the_fix(make_cfg, workdir: Path, damage: str, error: str):
    distill(make_cfg("distill", "method=random_real", *SMALL))
    source = released_layout(workdir, workdir / "bad")
    if damage == "resize":
        path = source / "new000/class000_id000.png"
        Image.open(path).resize((24, 24)).save(path)
    elif damage == "unreadable":
        (source / "new001/class001_id000.png").write_bytes(b"not an image")
    elif damage == "missing_class":
        shutil.rmtree(source / "new009")
    else:
        (source / "new000").rename(source / "cats")
    with pytest.raises((DataError, ConfigError), match=error):
        distill(make_cfg("distill", "method=external", f"method.source={source}", *SMALL))


def test_classes_of_unequal_size_are_recorded_and_the_set_trains(make_cfg, workdir: Path):
    distill(make_cfg("distill", "method=random_real", *SMALL))
    source = released_layout(workdir, workdir / "uneven")
    (source / "new004" / "class004_id001.png").unlink()
    imported = ("method=external", f"method.source={source}")
    manifest = distill(make_cfg("distill", *imported, *SMALL))
    assert manifest["images"] == 19 and manifest["ipc"] == 2 and manifest["ipc_per_class"][4] == 1
    relabel(make_cfg("relabel", *imported, *PLAN))
    assert validate(make_cfg("evaluate", *imported, *PLAN))["test_samples"] == 360


def test_soft_labels_in_a_tensor_file_come_in_as_static_labels_for_the_student(make_cfg, workdir: Path, tmp_path):
    distill(make_cfg("distill", "method=random_real", *SMALL))
    exported = torch.load(export(make_cfg("relabel", "method=random_real", *SMALL), tmp_path / "out") / "set.pt")
    images, labels, soft = exported["images"], exported["labels"], exported["soft_labels"]
    # the same set with its classes renamed (class c stored as label σ(c), its soft-label column moved with it) and
    # its rows reversed: the import must put every row and column back
    sigma = torch.tensor([3, 0, 1, 2, 4, 5, 6, 7, 9, 8])
    renamed = torch.empty_like(soft)
    renamed[:, sigma] = soft
    payload = {"images": images.flip(0), "labels": sigma[labels].flip(0), "soft_labels": renamed.flip(0)}
    torch.save(payload, tmp_path / "renamed.pt")
    (tmp_path / "map.json").write_text(json.dumps({str(int(sigma[c])): str(c) for c in range(10)}))
    imported = (
        "method=external",
        f"method.source={tmp_path / 'renamed.pt'}",
        "method.normalized=true",
        f"method.class_map={tmp_path / 'map.json'}",
    )
    manifest = distill(make_cfg("distill", *imported, *SMALL))
    folder = workdir / "artifacts/digits/distilled/external_renamed"
    static = load_tensors(folder / manifest["static_soft_labels"]["file"], "")["soft_labels"]
    kept = load_tensors(folder / "images.pt", "")
    same = torch.cdist(kept["images"].flatten(1), images.flatten(1)).argmin(1)  # each kept image's exported row
    assert torch.equal(images[same], kept["images"]) and torch.equal(labels[same], kept["labels"])
    assert torch.equal(static, soft[same]), "every image keeps its own soft label, in the dataset's class order"

    result = validate(make_cfg("evaluate", *imported, *PLAN, "labels=static"))
    assert result["labels"] == "static" and "__static__" in Path(result["path"]).name
    with pytest.raises(MissingInputError, match=r"has no static soft labels: only a set imported .*labels=offline"):
        validate(make_cfg("evaluate", "method=random_real", *PLAN, "labels=static"))

    probabilities = {"images": images, "labels": soft.softmax(1)}  # soft labels as the labels themselves
    torch.save(probabilities, tmp_path / "probs.pt")
    probs = distill(
        make_cfg(
            "distill", "method=external", f"method.source={tmp_path / 'probs.pt'}", *SMALL, "method.normalized=true"
        )
    )
    assert probs["images"] == 20 and torch.equal(
        load_tensors(workdir / "artifacts/digits/distilled/external_probs/images.pt", "")["labels"], labels
    ), "each image's class is its soft label's argmax (the exported set: the teacher agrees with every class)"
    static = load_tensors(
        workdir / "artifacts/digits/distilled/external_probs" / probs["static_soft_labels"]["file"], ""
    )
    assert torch.allclose(static["soft_labels"].softmax(1), soft.softmax(1), atol=1e-6), "probabilities kept as logs"


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_a_mixed_batch_targets_the_same_mixture_of_its_images_static_labels(lam: float):
    soft = torch.randn(6, 4) * 3
    plan = BatchPlan(
        torch.tensor([4, 1, 2]),
        torch.zeros(3, 4),
        torch.zeros(3, dtype=torch.bool),
        torch.tensor([2, 0, 1]),
        lam,
        (0, 0, 0, 0),
    )
    tau = 4.0
    mixed = mixed_targets(soft, plan, tau).div(tau).softmax(1)
    own, partner = soft[plan.indices].div(tau).softmax(1), soft[plan.indices][plan.permutation].div(tau).softmax(1)
    assert torch.allclose(mixed, lam * own + (1 - lam) * partner, atol=1e-6)
