"""The method seam: every method's set through the same outline, chains without arguments, sets named by
``set=``, sets of the previous layout, students without BatchNorm, and jobs that never import each other."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra.core.global_hydra import GlobalHydra

from cvdd.artifacts import load_json, load_tensors, save_json
from cvdd.artifacts.distilled import DistilledArtifact
from cvdd.committee.committee import Committee
from cvdd.data import load_dataset
from cvdd.labels.student_set import student_set
from cvdd.methods.committee_voting.recover import Unit
from cvdd.methods.herding import herd
from cvdd.methods.init_images import Initializer
from cvdd.models import build_model
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.validate import validate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("ipc=2", "logger=none")
PLAN = (*SMALL, "relabel.epochs=2", "relabel.batch_size=8")
DIGITS = {"name": "digits"}


def test_rded_keeps_each_class_s_most_realistic_crops_and_chains_without_arguments(make_cfg, workdir: Path):
    manifest = distill(make_cfg("distill", "method=rded", *SMALL))
    assert manifest["method"] == "rded" and manifest["name"] == "rded_small_ipc2_f2_s0" and manifest["images"] == 20
    candidates = manifest["candidates"]
    assert candidates == 5 * 2 * 4  # 5 per kept crop, ipc × factor² kept
    (cache,) = (workdir / "artifacts/digits/patches").glob("*.pt")
    scores = load_tensors(cache, "")["scores"]
    for c, chosen in manifest["chosen_candidates"].items():
        kept = sorted(j for image in chosen for j in image)
        assert kept == sorted(torch.argsort(scores[int(c)], stable=True)[:8].tolist()), "the 8 lowest-CE crops"
    labels = relabel(make_cfg("relabel", "method=rded", *PLAN))
    assert labels["name"] == "rded_small_ipc2_f2_s0" and labels["method"] == "rded" and len(labels["teachers"]) == 5
    result = validate(make_cfg("evaluate", "method=rded", *PLAN))
    assert result["method"] == "rded" and result["ipc"] == 2 and 0 <= result["test_top1"] <= 100
    again = distill(make_cfg("distill", "method=rded", *SMALL))
    assert again["created"] == manifest["created"], "a finished set of the same recipe is reused"


def test_random_real_is_seeded_real_training_images(make_cfg, workdir: Path, random_real):
    manifest = random_real("ipc=3")
    assert manifest["method"] == "random_real" and manifest["name"] == "random_real_ipc3_s0"
    train = load_dataset(DIGITS).view("train")
    stored = torch.load(DistilledArtifact(workdir / "artifacts", "digits", "random_real_ipc3_s0").tensors)
    for image, label, source in zip(stored["images"], stored["labels"], manifest["sources"], strict=True):
        real, real_label = train[source]
        assert torch.equal(image, real) and int(label) == real_label
    other = random_real("ipc=3", "seed=1")
    assert set(other["sources"]) != set(manifest["sources"]), "another seed draws other images"


@pytest.mark.slow
def test_rded_under_ddp_cpu_makes_each_class_once_and_the_one_process_set(make_cfg, workdir: Path):
    """Two ranks score and make a share of the classes each (patch scoring included: the cache is removed first)
    and end with the same files as one process."""
    single = distill(make_cfg("distill", "method=rded", *SMALL, "set=one"))
    for cache in (workdir / "artifacts/digits/patches").glob("*.pt"):
        cache.unlink()
    GlobalHydra.instance().clear()
    run_cli("distill.py", "method=rded", *SMALL, "set=two", "hardware=ddp_cpu", "hardware.threads=1", cwd=workdir)
    two = json.loads((workdir / "artifacts/digits/distilled/two/manifest.json").read_text())
    assert two["chosen_candidates"] == single["chosen_candidates"]
    assert two["files"] == single["files"], "the same images, PNGs and grid"
    assert not list((workdir / "artifacts/digits/distilled/two/units").glob("*.pt")), "class files go after assembly"
    assert len(list((workdir / "artifacts/digits/patches").glob("*.pt"))) == 1, "the ranks' scores, cached once"


def test_a_killed_per_class_method_resumes_without_remaking_finished_classes(make_cfg, workdir: Path, monkeypatch):
    from cvdd.methods.random_real import RandomReal

    made, killed = [], []
    original = RandomReal.make_class

    def make_class(self, ctx, c):
        if c == 4 and not killed:
            killed.append(c)
            raise RuntimeError("killed")  # the run dies while making class 4
        made.append(c)
        return original(self, ctx, c)

    monkeypatch.setattr(RandomReal, "make_class", make_class)
    with pytest.raises(RuntimeError, match="killed"):
        distill(make_cfg("distill", "method=random_real", *SMALL))
    made.clear()
    again = distill(make_cfg("distill", "method=random_real", *SMALL))
    assert made == [4, 5, 6, 7, 8, 9], "classes 0-3 were finished and are not made again"
    fresh = distill(make_cfg("distill", "method=random_real", *SMALL, "set=fresh"))
    assert again["sources"] == fresh["sources"]
    assert again["files"]["images.pt"] == fresh["files"]["images.pt"]


def test_real_initialisation_starts_from_the_random_real_set_of_the_same_seed(make_cfg, workdir: Path, random_real):
    """Recover with ``method.recover.init.mode=real`` and ``method=random_real`` draw the same images per (class, IPC
    index), so a recovered set and random real images compare pairwise (what the benchmark's checks rely on)."""
    manifest = random_real("ipc=3", "seed=1")
    stored = torch.load(DistilledArtifact(workdir / "artifacts", "digits", "random_real_ipc3_s1").tensors)
    train = load_dataset(DIGITS).view("train")
    init = Initializer("real", 1, tuple(stored["images"].shape[1:]), real=train)
    units = [Unit(i, 0, tuple(range(10)), ("resnet18_small",), (1.0,), seed=i) for i in range(3)]
    start = init(units)  # (IPC index, class, C, H, W)
    for image, label, index in zip(stored["images"], stored["labels"], stored["ipc_index"], strict=True):
        assert torch.equal(start[int(index), int(label)], image)
    assert len(set(manifest["sources"])) == 30


def test_herding_tracks_the_class_mean_better_than_random_picks():
    torch.manual_seed(0)
    features = torch.randn(200, 16) + torch.linspace(0, 3, 200)[:, None]
    chosen = herd(features, 10)
    assert len(set(chosen)) == 10
    target = features.mean(0)
    herded = (features[chosen].mean(0) - target).norm()
    random = torch.stack([(features[torch.randperm(200)[:10]].mean(0) - target).norm() for _ in range(100)])
    assert herded < random.min(), "closer than any of 100 random subsets"
    assert chosen[0] == int((features - target).norm(dim=1).argmin()), "the first pick is the one nearest the mean"


def test_herding_set_is_distinct_real_images_per_class(make_cfg, workdir: Path):
    manifest = distill(make_cfg("distill", "method=herding", *SMALL))
    assert manifest["name"] == "herding_resnet18_small_ipc2_s0" and manifest["recipe"]["model"] == "resnet18_small"
    train = load_dataset(DIGITS).view("train")
    assert len(set(manifest["sources"])) == 20
    labels = [train.targets[s].item() for s in manifest["sources"]]
    assert labels == [c for c in range(10) for _ in range(2)]


def test_a_set_named_with_set_is_read_from_its_manifest(make_cfg, workdir: Path, random_real):
    random_real("ipc=3")
    # the run's ipc, method and committee would name another set; set= wins and the manifest says the rest
    cfg = make_cfg("relabel", "set=random_real_ipc3_s0", "ipc=7", "logger=none")
    chosen = student_set(cfg, workdir / "artifacts")
    assert chosen.ipc == 3 and chosen.method == "random_real" and len(chosen) == len(chosen.read()) == 30


def test_a_set_of_the_previous_layout_loads_as_committee_voting(make_cfg, workdir: Path):
    distill(make_cfg("distill", "ipc=1", "method.recover.iterations=2", "method.recover.init.mode=real", "logger=none"))
    artifact = DistilledArtifact(workdir / "artifacts", "digits", "small_ipc1_real_s0")
    manifest = load_json(artifact.manifest)
    del manifest["method"]  # written before methods existed
    save_json(artifact.manifest, manifest)
    chosen = student_set(make_cfg("evaluate", "ipc=1", "method.recover.init.mode=real"), workdir / "artifacts")
    assert chosen.method == "cvdd" and chosen.ipc == 1


def test_a_student_without_batchnorm_trains(make_cfg, workdir: Path, random_real):
    random_real("ipc=2")
    net = build_model("convnet", 10, 8, 1, norm="instance")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    with pytest.raises(ValueError, match="no BatchNorm layer to match statistics with"):
        Committee({"convnet_in": net}, {"convnet_in": 1.0})
    result = validate(make_cfg("evaluate", "method=random_real", "student=convnet_in", "labels=hard", *PLAN))
    assert result["student"] == "convnet_in" and result["test_top1"] > 10.0


LAYERS = {  # package -> layer: a module imports its own layer or lower ones, never a higher one
    "cvdd.stages": 4,
    "cvdd.methods": 3,
    **dict.fromkeys(("cvdd.committee", "cvdd.labels", "cvdd.training", "cvdd.report", "cvdd.export"), 2),
    **dict.fromkeys(("cvdd.runtime", "cvdd.artifacts", "cvdd.data", "cvdd.models", "cvdd.config"), 1),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    package = ".".join(module.split(".")[:2])
    assert package in LAYERS, f"{module} is in no layer: add its package to LAYERS"
    return LAYERS[package]


MODULES = {module_name(p) for p in (ROOT / "cvdd").rglob("*.py")}


def cvdd_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The cvdd modules ``path`` imports (``top_level_only``: at import time, not inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:  # `from cvdd.data import formats` imports the module
            found.update(
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            )
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("cvdd.")}


def test_packages_import_only_their_own_or_lower_layers_without_cycles():
    """stages → methods → committee / labels / training / report → runtime / artifacts / data / models / config.
    Stages never import each other but for the priors measurement (a stage made of the three others, imported
    inside its function) and the squeeze distill runs for missing teachers; every stage uses the outline."""
    modules = {module_name(p): p for p in (ROOT / "cvdd").rglob("*.py") if module_name(p) != "cvdd"}
    for name, path in modules.items():
        for imported in cvdd_imports(path):
            assert layer(imported) <= layer(name), f"{name} imports {imported} from a higher layer"
    allowed = {
        "cvdd.stages.distill": {"cvdd.stages.priors", "cvdd.stages.squeeze"},
        "cvdd.stages.relabel": {"cvdd.stages.priors"},
        "cvdd.stages.priors": {"cvdd.stages.distill", "cvdd.stages.relabel", "cvdd.stages.validate"},
    }
    for name, path in modules.items():
        if name.startswith("cvdd.stages."):
            # the outline is what every stage shares, not a stage
            stages = {m for m in cvdd_imports(path) if m.startswith("cvdd.stages.")} - {"cvdd.stages.outline"}
            assert stages <= allowed.get(name, set()), (name, stages)

    def with_packages(imported: set[str]) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        return {".".join(m.split(".")[:i]) for m in imported for i in range(2, m.count(".") + 2)} & set(modules)

    def ancestors(name: str) -> set[str]:  # already being imported when ``name`` is
        return {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}

    graph = {n: with_packages(cvdd_imports(p, top_level_only=True)) - ancestors(n) for n, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: tuple[str, ...]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            assert state.get(nxt) != 1, f"import cycle: {' → '.join((*path, name, nxt))}"
            if nxt not in state:
                visit(nxt, (*path, name))
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, ())
    entry = {
        "distill.py": "cvdd.stages.distill",
        "relabel.py": "cvdd.stages.relabel",
        "evaluate.py": "cvdd.stages.validate",
    }
    for script, job in entry.items():
        assert job in cvdd_imports(ROOT / script)


def test_every_method_config_names_its_class_and_default_set(make_cfg):
    for path in sorted((ROOT / "conf/method").glob("*.yaml")):
        cfg = make_cfg("distill", f"method={path.stem}")
        assert cfg.method.name == path.stem and cfg.method._target_.startswith("cvdd.methods.")
        if path.stem == "external":  # an imported set is named after its source: its IPC and seed are not ours
            assert cfg.method.set_name == "external_none"
            continue
        assert "ipc10" in cfg.method.set_name and cfg.method.set_name.endswith("_s0")
    manifest_keys = json.loads(json.dumps({"labels_by": make_cfg("relabel", "method=sre2l").relabel.teachers}))
    assert manifest_keys["labels_by"] == "resnet18_small", "SRe2L++ relabels with its one model by default"
