"""Recover on digits with a briefly-squeezed small committee: outputs, grouping, resume, teachers, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MEMBERS, run_cli
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import Callback

from cvdd.artifacts import ArtifactConflictError
from cvdd.committee.committee import Committee
from cvdd.committee.passes import MemberPasses
from cvdd.data import get_spec
from cvdd.methods.committee_voting.recover import GroupState, RecoverModule, RecoverSettings, Unit, step_surrogate
from cvdd.methods.committee_voting.snapshots import GroupSnapshots
from cvdd.models.registry import build_model
from cvdd.stages.distill import distill

FAST = ("ipc=2", "method.recover.iterations=4", "method.recover.init.mode=real", "logger=none")


def images_of(root: Path, name: str) -> torch.Tensor:
    return torch.load(root / "artifacts" / "digits" / "distilled" / name / "images.pt", weights_only=True)["images"]


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float noise, for two recipes that are the same maths (grouped vs sequential units).
    Stacked convolutions round differently from single ones (~1e-7), and Adam divides by sqrt(v) + 1e-8,
    so on the rare pixel whose gradient is near zero that noise can grow to a visible step (measured: up
    to 0.05 on 0.7 % of pixels after 5 steps, mean 3e-5)."""
    diff = (a - b).abs()
    assert diff.mean() < 1e-4, diff.mean()
    assert (diff > 1e-4).float().mean() < 0.01, (diff > 1e-4).float().mean()
    assert diff.max() < 0.1, diff.max()


class CrashAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.step:
            raise RuntimeError("simulated kill")


def test_distill_writes_images_manifest_and_grid(make_cfg, workdir: Path):
    manifest = distill(make_cfg("distill", *FAST, "logger=csv"))
    folder = workdir / "artifacts" / "digits" / "distilled" / "small_ipc2_real_s0"
    assert manifest["name"] == "small_ipc2_real_s0" and manifest["images"] == 20
    assert sorted(p.name for p in (folder / "0003_3").iterdir()) == ["0000.png", "0001.png"]
    assert (folder / "grid.png").stat().st_size > 1000
    data = torch.load(folder / "images.pt", weights_only=True)
    assert data["images"].shape == (20, 1, 16, 16)
    assert data["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    low, high = get_spec("digits").pixel_range
    assert data["images"].min() >= low[0] - 1e-6 and data["images"].max() <= high[0] + 1e-6
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["classes"] == [str(i) for i in range(10)] and on_disk["ipc"] == 2
    unit = on_disk["units"][1]  # IPC index 1 takes the 2nd pair of the pool: (ResNet18, ShuffleNetV2)
    assert unit["members"] == ["resnet18_small", "shufflenetv2_small"]
    assert sum(unit["weights"]) == pytest.approx(1.0)
    assert set(unit["losses"]) == set(unit["members"]) and unit["losses"]["resnet18_small"]["bn"] > 0
    assert set(on_disk["priors"]) == set(MEMBERS)

    mtime = (folder / "manifest.json").stat().st_mtime_ns
    distill(make_cfg("distill", *FAST))
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime, "same recipe: no-op"
    with pytest.raises(ArtifactConflictError, match="overwrite=true"):
        distill(make_cfg("distill", *FAST, "method.recover.r_bn=0.1"))


def test_distill_is_seeded(make_cfg, workdir: Path):
    distill(make_cfg("distill", *FAST, "set=a"))
    distill(make_cfg("distill", *FAST, "set=b"))
    distill(make_cfg("distill", *FAST, "set=c", "seed=1"))
    assert torch.equal(images_of(workdir, "a"), images_of(workdir, "b"))
    assert not torch.allclose(images_of(workdir, "a"), images_of(workdir, "c"))


@pytest.mark.parametrize("init", ["real", "patches"])
def test_grouped_units_equal_sequential_units(make_cfg, workdir: Path, init: str):
    common = (
        "ipc=12",
        "method.recover.iterations=5",
        f"method.recover.init.mode={init}",
        "method.recover.init.candidates=30",
        "logger=none",
        "committee.schedule=random",
        "hardware.precision=32",
    )  # 12 units over the 10 pairs: some share both members; grouping is exact maths in fp32
    distill(make_cfg("distill", *common, "set=grouped", "method.recover.grouping=true"))
    distill(make_cfg("distill", *common, "set=sequential", "method.recover.grouping=false"))
    grouped, sequential = images_of(workdir, "grouped"), images_of(workdir, "sequential")
    assert_same_images(grouped, sequential)


def test_one_grouped_step_gives_the_gradient_of_units_run_alone():
    """Stacking units into one pass per member is the same maths as running each unit alone: one step's image
    gradient agrees to float rounding (Adam then magnifies that rounding where a gradient is near zero, see
    :func:`assert_same_images`)."""
    torch.manual_seed(0)
    nets = {arch: build_model(arch, 10, 16, 1, width=0.25) for arch in ("convnet", "mobilenetv2", "resnet18")}
    committee = Committee(nets, dict.fromkeys(nets, 1.0), 10.0)
    pairs = [("convnet", "mobilenetv2"), ("convnet", "resnet18"), ("mobilenetv2", "resnet18"), ("convnet", "resnet18")]
    units = [Unit(i, 0, tuple(range(10)), pair, (0.6, 0.4), i) for i, pair in enumerate(pairs)]
    images = torch.randn(len(units), 10, 1, 16, 16)
    grads = {}
    for grouping in (True, False):
        group = GroupState(units, images.clone(), RecoverSettings(1, 0.1, 0.01, 2), grouping)
        assert len(group.batches) == (3 if grouping else 8)
        step_surrogate([group], committee, 0.01, MemberPasses(1, 1)).backward()
        grads[grouping] = group.images.grad
    # the objective written out in one graph, on the same augmentation draws (each unit's own stream)
    reference = GroupState(units, images.clone(), RecoverSettings(1, 0.1, 0.01, 2), grouping=True)
    augmented = reference.augment(reference.images, range(len(units))).reshape(images.shape)
    total = torch.zeros(())
    for member, ids in reference.batches:
        x, labels = augmented[ids].flatten(0, 1), reference.labels[ids].reshape(-1)
        ce, bn = committee.losses(member, x, labels, units=len(ids))
        total = total + (reference.weights[member][ids] * (ce + 0.01 * bn)).sum()
    total.backward()
    scale = reference.images.grad.abs().max()
    for grouping in (True, False):
        assert torch.allclose(grads[grouping], reference.images.grad, rtol=1e-4, atol=1e-5 * scale), grouping


def test_killed_run_resumes_to_the_same_result(make_cfg, workdir: Path):
    common = (
        *FAST,
        "ipc=3",
        "method.recover.group_images=10",
        "method.recover.wave_images=10",
    )  # 3 waves of one unit, 4 steps
    distill(make_cfg("distill", *common, "set=reference"))
    crash = ("+callbacks.crash._target_=test_recover.CrashAtStep", "+callbacks.crash.step=6")
    with pytest.raises(RuntimeError, match="simulated kill"):
        distill(make_cfg("distill", *common, "set=resumed", *crash))
    folder = workdir / "artifacts" / "digits" / "distilled" / "resumed"
    assert not (folder / "manifest.json").exists()
    assert len(list((folder / "units").glob("*.pt"))) == 1, "the unit finished before the kill was kept"
    distill(make_cfg("distill", *common, "set=resumed"))
    assert torch.equal(images_of(workdir, "reference"), images_of(workdir, "resumed"))


def test_a_run_killed_mid_wave_resumes_from_its_snapshots_bitwise(make_cfg, workdir: Path, monkeypatch):
    """Snapshots every 2 of 6 iterations, two groups in one wave; killed before iteration 6, a group goes on from
    iteration 5 (4 done) — the other, its snapshot lost, from the start — and the set ends on the very images of an
    uninterrupted run; finished, it leaves no snapshot behind."""
    common = (*FAST, "method.recover.iterations=6", "method.recover.snapshot_every=2", "method.recover.group_images=10")
    distill(make_cfg("distill", *common, "set=reference"))
    computed: list[tuple[int, int]] = []
    optimise = RecoverModule._optimise

    def counted(module, groups, step: int) -> None:
        computed.append((step, len(groups)))
        optimise(module, groups, step)

    monkeypatch.setattr(RecoverModule, "_optimise", counted)
    crash = ("+callbacks.crash._target_=test_recover.CrashAtStep", "+callbacks.crash.step=5")
    with pytest.raises(RuntimeError, match="simulated kill"):
        distill(make_cfg("distill", *common, "set=resumed", *crash))
    folder = workdir / "artifacts" / "digits" / "distilled" / "resumed" / "units"
    paths = sorted((folder / "snapshots").glob("group_*.pt"))
    assert [torch.load(path, weights_only=True)["iterations_done"] for path in paths] == [4, 4]
    assert not list(folder.glob("*.pt")) and computed == [(step, 2) for step in range(5)]
    paths[0].unlink()
    computed.clear()
    distill(make_cfg("distill", *common, "set=resumed"))
    assert computed == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (5, 2)], "each group goes on from its own snapshot"
    assert torch.equal(images_of(workdir, "reference"), images_of(workdir, "resumed"))
    assert not (folder / "snapshots").exists()


def test_a_snapshot_of_another_recipe_or_a_damaged_one_is_not_used(tmp_path: Path, caplog):
    units = [Unit(0, 0, (0, 1), ("a",), (1.0,), seed=3)]
    settings = RecoverSettings(iterations=4, lr=0.1, r_bn=0.01, jitter=0)
    group = GroupState(units, torch.randn(1, 2, 1, 4, 4), settings, grouping=True)
    GroupSnapshots(tmp_path, 2, "recipe-a").save(group, 2)
    assert GroupSnapshots(tmp_path, 2, "recipe-a").load(units)["iterations_done"] == 2
    assert GroupSnapshots(tmp_path, 2, "recipe-b").load(units) is None
    other = [Unit(0, 0, (0, 1), ("a",), (1.0,), seed=3), Unit(1, 0, (0, 1), ("a",), (1.0,), seed=4)]
    assert GroupSnapshots(tmp_path, 2, "recipe-a").load(other) is None, "another group under the same first unit"
    path = GroupSnapshots(tmp_path, 2, "recipe-a").path(units)
    path.write_bytes(path.read_bytes()[:100])
    assert GroupSnapshots(tmp_path, 2, "recipe-a").load(units) is None and "damaged" in caplog.text
    assert [GroupSnapshots(tmp_path, 2, "r").due(done, 6) for done in range(1, 7)] == [False, True] * 2 + [False] * 2


def test_images_do_not_depend_on_wave_size_or_on_resuming_bitwise(make_cfg, workdir: Path):
    """Groups are a fixed partition of the set (2 units each here); waves only decide how many run at once."""
    common = (
        *FAST,
        "ipc=6",
        "method.recover.iterations=3",
        "method.recover.group_images=20",
        "committee.schedule=random",
    )
    distill(make_cfg("distill", *common, "set=one_wave"))
    distill(make_cfg("distill", *common, "set=three_waves", "method.recover.wave_images=20"))
    crash = ("+callbacks.crash._target_=test_recover.CrashAtStep", "+callbacks.crash.step=4")
    with pytest.raises(RuntimeError, match="simulated kill"):
        distill(make_cfg("distill", *common, "set=resumed", "method.recover.wave_images=20", *crash))
    distill(make_cfg("distill", *common, "set=resumed"))  # resumed with another wave size: same recipe
    reference = images_of(workdir, "one_wave")
    assert torch.equal(reference, images_of(workdir, "three_waves"))
    assert torch.equal(reference, images_of(workdir, "resumed"))
    with pytest.raises(ValueError, match=r"method\.recover\.wave_images=10 is below method\.recover\.group_images=20"):
        distill(make_cfg("distill", *common, "set=bad", "method.recover.wave_images=10"))


def test_missing_teachers_error_prints_the_train_command(make_cfg, tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        distill(make_cfg("distill", *FAST, "committee.train_missing=false"))
    assert f"python train.py -m dataset=digits model={','.join(MEMBERS)}" in str(err.value)


def test_train_missing_squeezes_the_committee_first(make_cfg, tmp_path: Path):
    manifest = distill(
        make_cfg("distill", *FAST, "committee=sre2l_small", 'committee.train_overrides=["squeeze.epochs=1"]')
    )
    record = json.loads((tmp_path / "artifacts/digits/teachers/resnet18_small.json").read_text())
    assert record["epochs"] == 1
    assert manifest["units"][0]["members"] == ["resnet18_small"] and manifest["units"][0]["weights"] == [1.0]


def test_squeeze_inside_distill_gets_the_runs_paths_dataset_and_seed(make_cfg, tmp_path: Path):
    """`distill.py paths.artifacts=<dir>` squeezes into <dir> too, with the run's dataset options and seed."""
    elsewhere = tmp_path / "elsewhere"
    cfg = make_cfg(
        "distill", *FAST, "committee=sre2l_small", "dataset.squeeze.epochs=1", "seed=3", f"paths.artifacts={elsewhere}"
    )
    manifest = distill(cfg)
    record = json.loads((elsewhere / "digits/teachers/resnet18_small.json").read_text())
    assert record["epochs"] == 1 and record["seed"] == 3
    assert manifest["name"] == "sre2l_small_ipc2_real_s3"
    assert {p.name for p in tmp_path.iterdir()} <= {"elsewhere", "run", "wandb"}, "no artifacts outside <dir>"


def test_class_order_mismatch_stops_recover(make_cfg, workdir: Path):
    record_path = workdir / "artifacts/digits/teachers/resnet18_small.json"
    record = json.loads(record_path.read_text())
    record["classes"] = record["classes"][::-1]
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="class"):
        distill(make_cfg("distill", *FAST))


@pytest.mark.slow
def test_ddp_cpu_gives_bitwise_the_images_of_one_process_at_the_same_thread_count(make_cfg, workdir: Path):
    split = (*FAST, "method.recover.group_images=10", "hardware.threads=1")  # two groups of one unit: one per rank
    distill(make_cfg("distill", *split, "set=single"))
    GlobalHydra.instance().clear()
    run_cli("distill.py", *split, "set=ddp", "hardware=ddp_cpu", cwd=workdir)
    assert torch.equal(images_of(workdir, "single"), images_of(workdir, "ddp"))
    manifest = json.loads((workdir / "artifacts/digits/distilled/ddp/manifest.json").read_text())
    assert [u["cpu_threads"] for u in manifest["units"]] == [1, 1], "each rank ran the thread count it was given"
    single = json.loads((workdir / "artifacts/digits/distilled/single/manifest.json").read_text())
    pngs = {name: d for name, d in manifest["files"].items() if name.endswith(".png") and name != "grid.png"}
    assert len(pngs) == 20 and pngs.items() <= single["files"].items(), "each rank exported its units' PNGs"
    assert manifest["files"]["images.pt"] == single["files"]["images.pt"], "the assembled file is the same bytes"


@pytest.mark.slow
def test_snapshots_of_two_ranks_resume_in_one_process_bitwise(make_cfg, workdir: Path, monkeypatch, caplog):
    """Snapshots are named by their group's units, not by rank: a two-process run killed mid-wave goes on in one
    process to the images of an uninterrupted one-process run (same thread count)."""
    split = (*FAST, "method.recover.iterations=6", "method.recover.snapshot_every=2", "method.recover.group_images=10")
    split = (*split, "hardware.threads=1")
    distill(make_cfg("distill", *split, "set=single"))
    GlobalHydra.instance().clear()
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the ranks import CrashAtStep from this file
    crash = ("+callbacks.crash._target_=test_recover.CrashAtStep", "+callbacks.crash.step=5")
    with pytest.raises(AssertionError, match="simulated kill"):
        run_cli("distill.py", *split, "set=resumed", "hardware=ddp_cpu", *crash, cwd=workdir, timeout=300)
    folder = workdir / "artifacts" / "digits" / "distilled" / "resumed" / "units" / "snapshots"
    assert len(list(folder.glob("group_*.pt"))) == 2, "each rank saved its own group"
    caplog.set_level("INFO")
    distill(make_cfg("distill", *split, "set=resumed"))
    assert "2 of 2 group(s) resume at iteration 4 of 6" in caplog.text
    assert torch.equal(images_of(workdir, "single"), images_of(workdir, "resumed"))


def test_member_passes_side_by_side_give_bitwise_the_images_of_one_thread(make_cfg, workdir: Path):
    """Two threads run the members' passes at once, one intra-op thread each: the same arithmetic as one thread
    running them in turn (each pass's gradient is its own, summed in a fixed order), so the same images."""
    common = (*FAST, "ipc=3", "committee.schedule=random")
    one = distill(make_cfg("distill", *common, "set=one", "hardware.threads=1"))
    both = distill(make_cfg("distill", *common, "set=both", "hardware.threads=2"))
    assert torch.equal(images_of(workdir, "one"), images_of(workdir, "both"))
    assert [u["cpu_threads"] for u in one["units"]] == [u["cpu_threads"] for u in both["units"]] == [1, 1, 1]
    in_turn = distill(make_cfg("distill", *common, "set=in_turn", "hardware.threads=2", "hardware.member_threads=1"))
    assert [u["cpu_threads"] for u in in_turn["units"]] == [2, 2, 2], "one pass at a time has both threads"


def test_one_member_alone_keeps_every_thread_in_its_pass(make_cfg, workdir: Path):
    """SRe2L++ (a prior's measurement) has one member pass per step: run side by side it would leave all but one
    thread idle, so by default it runs with both; an explicit count is still honoured."""
    common = (*FAST, "method=sre2l", "hardware.threads=2")
    alone = distill(make_cfg("distill", *common, "set=alone"))
    assert [u["cpu_threads"] for u in alone["units"]] == [2, 2]
    asked = distill(make_cfg("distill", *common, "set=asked", "hardware.member_threads=2"))
    assert [u["cpu_threads"] for u in asked["units"]] == [1, 1]


def test_resuming_at_another_thread_count_is_refused(make_cfg, workdir: Path):
    common = (*FAST, "method.recover.group_images=10")
    distill(make_cfg("distill", *common, "hardware.threads=1"))
    folder = workdir / "artifacts/digits/distilled/small_ipc2_real_s0"
    (folder / "manifest.json").unlink()  # as if killed after its units were written
    in_turn = ("hardware.threads=2", "hardware.member_threads=1")  # passes with two intra-op threads
    with pytest.raises(
        ArtifactConflictError,
        match=r"member passes\) was begun with 1 CPU thread.*has 2.*hardware\.threads=1 hardware\.member_threads=1",
    ):
        distill(make_cfg("distill", *common, *in_turn))
    assert distill(make_cfg("distill", *common, "hardware.threads=1"))["units"][0]["cpu_threads"] == 1


def test_recipe_records_each_members_numerics(make_cfg, workdir: Path, monkeypatch):
    import cvdd.runtime.precision

    monkeypatch.setattr(cvdd.runtime.precision, "cpu_has_native_bf16", lambda: True)
    exact = distill(make_cfg("distill", *FAST, "set=fp32", "hardware.precision=32"))
    fast = distill(make_cfg("distill", *FAST, "set=auto"))
    assert exact["recipe"]["numerics"] == dict.fromkeys(MEMBERS, "fp32")
    assert fast["recipe"]["numerics"] == {
        "resnet18_small": "bf16_cl",
        "resnet50_small": "bf16_cl",
        "shufflenetv2_small": "fp32",
        "mobilenetv2_small": "fp32_cl",
        "densenet_small": "bf16",
    }
    assert exact["fingerprint"] != fast["fingerprint"]
    assert not torch.equal(images_of(workdir, "fp32"), images_of(workdir, "auto"))


def test_each_wave_logs_its_images_and_peak_memory(make_cfg, workdir: Path, caplog):
    caplog.set_level("INFO", logger="cvdd")
    distill(make_cfg("distill", *FAST, "ipc=3", "method.recover.group_images=10", "method.recover.wave_images=10"))
    waves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wave ")]
    assert [w.split(",")[0] for w in waves] == [
        "wave 1/3: 10 images done",
        "wave 2/3: 10 images done",
        "wave 3/3: 10 images done",
    ]
    assert all(float(w.split("peak memory ")[1].split(" MiB")[0]) > 0 for w in waves)


def test_units_can_be_dropped_after_assembly_without_changing_the_recipe(make_cfg, workdir: Path):
    kept = distill(make_cfg("distill", *FAST, "set=kept"))
    dropped = distill(make_cfg("distill", *FAST, "set=dropped", "method.recover.keep_units=false"))
    assert not (workdir / "artifacts/digits/distilled/dropped/units").exists()
    assert (workdir / "artifacts/digits/distilled/kept/units").is_dir()
    assert dropped["fingerprint"] == kept["fingerprint"], "keeping units changes disk use, not the set"
    assert torch.equal(images_of(workdir, "kept"), images_of(workdir, "dropped"))


def test_a_resumed_finish_reads_each_units_images_only_to_write_them(make_cfg, workdir: Path, monkeypatch):
    import cvdd.methods.base as base
    import cvdd.methods.committee_voting as cv

    distill(make_cfg("distill", *FAST, "method.recover.group_images=10"))
    (workdir / "artifacts/digits/distilled/small_ipc2_real_s0/manifest.json").unlink()  # killed before the manifest
    reads = []
    original = cv.load_tensors

    def recorded(*a, **k):
        reads.append(k.get("mapped", False))
        return original(*a, **k)

    monkeypatch.setattr(cv, "load_tensors", recorded)
    monkeypatch.setattr(base, "load_tensors", recorded)  # the resume check reads unit files through methods.base
    distill(make_cfg("distill", *FAST, "method.recover.group_images=10"))
    assert reads.count(True) == 4, "each of the 2 units' metadata is read mapped, to check it and to list it"
    assert reads.count(False) == 2 * 2 + 1, "each unit's images: for its PNGs, for images.pt (the first: its shape)"
