"""What a hostile user found (reliability round 3): two jobs on one artifact, interrupted overwrites, stale files."""

from __future__ import annotations

import errno
import os
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from minidata import write_cifar, write_fashion_mnist, write_idx, write_image_folder
from PIL import Image

from cvdd.artifacts import ArtifactCorruptError, atomic_write, load_json, save_json
from cvdd.artifacts.io import DiskFullError, NameTooLongError
from cvdd.artifacts.ownership import ArtifactBusyError, exclusive
from cvdd.data import load_dataset
from cvdd.labels import module as label_module
from cvdd.labels.module import RelabelModule
from cvdd.methods.committee_voting import memory
from cvdd.report import summary
from cvdd.runtime.errors import ConfigError, DataError
from cvdd.runtime.finite import NonFiniteError
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.squeeze import squeeze_teacher
from cvdd.stages.validate import validate

SET = ("method=random_real", "ipc=2", "logger=none")
LABELS = (*SET, "relabel.batch_size=8")
DIGITS = Path("artifacts/digits")


def epochs_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("epoch_*.pt"))}


def test_a_second_job_on_an_artifact_another_job_writes_stops_at_once_naming_it(make_cfg, workdir: Path):
    """Every stage that writes a folder or file holds its lock: another process holding it makes the stage fail
    before any work, with the holder's pid and command."""
    labels = workdir / DIGITS / "labels/random_real_ipc2_s0"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cvdd.artifacts.ownership import exclusive\n"
            f"with exclusive(__import__('pathlib').Path({str(labels)!r}), 'labels'):\n"
            "    print('held', flush=True); time.sleep(60)",
            "--the-other-job",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        distill(make_cfg("distill", *SET))
        with pytest.raises(
            ArtifactBusyError, match=rf"labels .* another job \(.*\"pid\": {holder.pid}.*--the-other-job"
        ):
            relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))
        assert not labels.exists(), "nothing written"
    finally:
        holder.kill()
        holder.wait()
    relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))  # the lock went with its holder

    sets = workdir / DIGITS / "distilled/random_real_ipc2_s0"
    result = validate(make_cfg("evaluate", *LABELS, "relabel.epochs=2"))
    held = [
        (sets, lambda: distill(make_cfg("distill", *SET, "overwrite=true"))),
        (Path(result["path"]), lambda: validate(make_cfg("evaluate", *LABELS, "relabel.epochs=2"))),
        (workdir / DIGITS / "teachers/convnet.json", lambda: squeeze_teacher(make_cfg("train", "model=convnet"))),
    ]
    for target, stage in held:
        with exclusive(target, "artifact"), pytest.raises(ArtifactBusyError, match="being written by another job"):
            stage()
    assert load_json(sets / "manifest.json")["images"] == 20, "the held set is untouched"


def test_an_interrupted_overwrite_leaves_none_of_the_old_recipes_epochs(make_cfg, workdir: Path, monkeypatch):
    """Recipe A stopped after 4 of 8 epochs, recipe B with overwrite=true stopped after 1, then B resumed: every
    epoch is B's (the old recipe's epochs 1-3 used to pass as B's)."""
    distill(make_cfg("distill", *SET))
    folder = workdir / DIGITS / "labels/random_real_ipc2_s0"
    a, b = (*LABELS, "relabel.epochs=8"), (*LABELS, "relabel.epochs=8", "relabel.mix=mixup")
    labelled = RelabelModule.predict_step

    def stop_after(count: int):
        def step(self, epoch, batch_idx):
            if len(list(folder.glob("epoch_*.pt"))) >= count:
                raise KeyboardInterrupt
            return labelled(self, epoch, batch_idx)

        return step

    monkeypatch.setattr(RelabelModule, "predict_step", stop_after(4))
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into exit 1
        relabel(make_cfg("relabel", *a))
    monkeypatch.setattr(RelabelModule, "predict_step", stop_after(1))
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into exit 1
        relabel(make_cfg("relabel", *b, "overwrite=true"))
    monkeypatch.setattr(RelabelModule, "predict_step", labelled)
    resumed = relabel(make_cfg("relabel", *b))
    assert resumed["mix"] == "mixup" and len(epochs_of(folder)) == 8
    made_by_b = epochs_of(folder)
    relabel(make_cfg("relabel", *b, "overwrite=true"))  # B from scratch
    assert epochs_of(folder) == made_by_b, "every epoch is recipe B's"
    assert not list(folder.parent.glob(".*replaced*")), "the old folder is gone, not parked"


def test_an_overwrite_leaves_only_the_new_sets_files(make_cfg, workdir: Path):
    distill(make_cfg("distill", *SET, "ipc=4", "set=mine"))
    made = distill(make_cfg("distill", *SET, "ipc=2", "set=mine", "overwrite=true"))
    folder = workdir / DIGITS / "distilled/mine"
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert made["images"] == 20 and len(made["files"]) == 22, "20 PNGs, images.pt, grid.png"
    assert on_disk == sorted([*made["files"], "manifest.json"]), "nothing of the IPC 4 set is left"
    assert len(torch.load(folder / "images.pt", weights_only=True)["labels"]) == 20


@pytest.mark.parametrize(
    ("stage", "override", "refused"),
    [
        ("relabel", "relabel.temperature=0", r"relabel\.temperature=0: needs a positive temperature"),
        ("distill", "committee.temperature=0", r"committee\.temperature=0: needs a positive temperature"),
        ("evaluate", "validate.temperature=0", r"validate\.temperature=0: needs a positive temperature"),
        ("evaluate", "validate.epochs=0", r"validate\.epochs=0: needs a whole number of epochs, at least 1"),
        ("evaluate", "validate.epochs=-1", r"validate\.epochs=-1: needs a whole number"),
        ("evaluate", "validate.eval_every=0", r"validate\.eval_every=0: needs a whole number of epochs between"),
        ("relabel", "committee.members=[]", r"committee\.members=\[\]: a committee needs at least one member"),
        ("distill", "method.recover.class_block=0", r"method\.recover\.class_block=0: needs a whole number"),
        ("relabel", "relabel.batch_size=0", r"relabel\.batch_size=0: needs a whole number, at least 1"),
        ("distill", "seed=-1", r"seed=-1: needs a whole number from 0 to 4294967295"),
        ("train", f"seed={2**40}", r"seed=1099511627776: needs a whole number from 0 to 4294967295"),
        ("distill", "seed=1099511627776", r"seed=1099511627776: needs a whole number from 0"),
        ("distill", "ipc=ten", r"ipc='ten': needs a whole number of images per class"),
    ],
)
def test_settings_no_run_can_use_are_refused_before_any_work_naming_the_key(
    make_cfg, workdir: Path, stage: str, override: str, refused: str
):
    run = {"train": squeeze_teacher, "distill": distill, "relabel": relabel, "evaluate": validate}[stage]
    extra = ("model=convnet",) if stage == "train" else ()
    before = sorted(p for p in (workdir / DIGITS).rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match=refused):
        run(make_cfg(stage, *(() if stage == "train" or "recover" in override else SET), *extra, override))
    assert sorted(p for p in (workdir / DIGITS).rglob("*") if p.is_file()) == before, "nothing written"


def test_a_loss_that_stops_being_a_number_stops_the_run_and_publishes_nothing(make_cfg, workdir: Path, monkeypatch):
    distill(make_cfg("distill", *SET))
    relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))
    results = workdir / DIGITS / "results"
    with pytest.raises(
        NonFiniteError, match=r"student's training loss is not finite at epoch \d+, step \d+.*validate\.lr"
    ):
        validate(make_cfg("evaluate", *LABELS, "relabel.epochs=2", "validate.lr=1e9"))
    assert not list(results.glob("*.json")), "no result"

    labels = workdir / DIGITS / "labels/random_real_ipc2_s0"
    nan_teacher = monkeypatch.context()
    with nan_teacher as patch, pytest.raises(NonFiniteError, match=r"soft labels of epoch 0 is not finite"):
        patch.setattr(label_module, "soft_label_logits", lambda *a, **k: torch.full((8, 10), float("nan")))
        relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2", "relabel.mix=mixup", "overwrite=true"))
    assert not (labels / "manifest.json").exists() and not list(labels.glob("epoch_*.pt")), "no NaN label written"

    sets = workdir / DIGITS / "distilled"
    cvdd = ("ipc=1", "committee=sre2l_small", "method.recover.iterations=3", "method.recover.init.mode=real")
    with pytest.raises(NonFiniteError, match=r"recover loss or the images is not finite at wave 1, step 1"):
        distill(make_cfg("distill", *cvdd, "method.recover.r_bn=1e39", "logger=none"))
    assert not (sets / "sre2l_small_ipc1_real_s0" / "manifest.json").exists()
    assert not list((sets / "sre2l_small_ipc1_real_s0").rglob("*.pt")), "no unit of NaN images kept"

    with pytest.raises(
        NonFiniteError, match=r"teacher's training loss is not finite at epoch 1, step \d+.*squeeze\.lr"
    ):
        squeeze_teacher(
            make_cfg(
                "train", "model=convnet", "squeeze.optimizer=sgd", "squeeze.lr=1e30", "squeeze.epochs=2", "logger=none"
            )
        )
    assert not (workdir / DIGITS / "teachers/convnet.json").exists(), "no teacher published"


def test_a_record_never_states_a_number_that_is_not_one(tmp_path: Path):
    with pytest.raises(NonFiniteError, match=r"would record a NaN or infinite number"):
        save_json(tmp_path / "r.json", {"test_top1": float("nan")})
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("script", "args", "busy"),
    [
        ("train.py", ("model=convnet", "squeeze.epochs=200"), "epoch"),
        ("evaluate.py", (*LABELS, "relabel.epochs=100"), "student epoch"),
    ],
)
def test_sigterm_ends_a_run_with_exit_143_and_the_way_to_resume(make_cfg, workdir: Path, script, args, busy):
    """Lightning ends a run on SIGTERM with exit status 0: a scheduler marked it COMPLETED and ``a && b`` went on."""
    if script == "evaluate.py":
        distill(make_cfg("distill", *SET))
        relabel(make_cfg("relabel", *LABELS, "relabel.epochs=100"))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args, f"paths.root={workdir}", "logger=none"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    while busy not in seen:  # wait until the run is training (its progress bar says so)
        chunk = proc.stdout.read(64)
        assert chunk, f"{script} ended before training:\n{seen[-3000:]}"
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143, rest[-3000:]
    assert "stopped by SIGTERM" in rest and "run the same command to resume" in rest


def test_every_damaged_record_names_the_command_that_repairs_it_and_that_command_works(make_cfg, workdir: Path):
    distill(make_cfg("distill", *SET))
    relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))
    labels, sets = workdir / DIGITS / "labels/random_real_ipc2_s0", workdir / DIGITS / "distilled/random_real_ipc2_s0"
    evaluate = ("evaluate", *LABELS, "relabel.epochs=2")

    (labels / "manifest.json").write_text("not json")
    with pytest.raises(ArtifactCorruptError, match=r"labels.*manifest\.json is not valid JSON .*python relabel\.py"):
        validate(make_cfg(*evaluate))
    relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))  # the command named: it makes the labels again
    assert validate(make_cfg(*evaluate))["labels"] == "offline"

    (labels / "manifest.json").unlink()  # a stopped run whose stamp is damaged: its epochs are of no known recipe
    (labels / "recipe.json").write_text("{")
    assert relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))["epochs"] == 2

    for damaged in ("{}", "[]"):
        (sets / "manifest.json").write_text(damaged)
        with pytest.raises(
            ArtifactCorruptError, match=r"is damaged \(not a set's manifest.*repair it with python distill"
        ):
            relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2"))
        assert distill(make_cfg("distill", *SET))["images"] == 20, "distill repairs it"

    teacher = workdir / DIGITS / "teachers/resnet18_small.json"
    teacher.write_text("[]")
    with pytest.raises(
        ArtifactCorruptError, match=r"resnet18_small\.json is damaged .*python train\.py dataset=digits"
    ):
        relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2", "overwrite=true"))
    squeeze_teacher(make_cfg("train", "model=resnet18_small", "squeeze.epochs=1", "logger=none"))
    assert relabel(make_cfg("relabel", *LABELS, "relabel.epochs=2", "overwrite=true"))["epochs"] == 2


def test_dataset_faults_are_named_with_the_file_not_left_to_crash_or_to_change_the_pixels(tmp_path: Path):
    root = tmp_path / "grey16"
    write_image_folder(root, ["a", "b"], per_class=1, ext=".png")
    for folder in ("train", "val"):
        deep = np.full((8, 8), 32768, dtype=np.uint16)  # a 16-bit grey PNG: mid-grey, not white
        Image.fromarray(deep).save(root / folder / "a" / "deep.png")
    data = load_dataset({"name": "grey16", "kind": "image_folder", "root": str(root), "image_size": 8, "channels": 1})
    deep_index = [p.name for p in data.raw.train.paths].index("deep.png")
    assert int(data.raw.train[deep_index][0].max()) == 128, "16-bit values scaled by their range (32768 / 257)"

    cifar = tmp_path / "cifar"
    write_cifar(cifar, 10)
    batch = cifar / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match=r"data_batch_3 cannot be read .*truncated or not a python-version CIFAR"):
        load_dataset({"name": "cifar10", "root": str(cifar)})

    fashion = tmp_path / "fashion"
    write_fashion_mnist(fashion, gz=False)
    labels = np.repeat(np.arange(10), 3).astype(np.uint8)
    labels[4] = 12
    write_idx(fashion / "train-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte holds label 12; the dataset has 10 classes"):
        load_dataset({"name": "fashion_mnist", "root": str(fashion)})


def test_recover_sizes_its_waves_within_cgroup_and_address_space_limits(tmp_path: Path, monkeypatch):
    """Wave sizing read MemAvailable alone ("21.7 GiB free") under a 4.6 GB ulimit or a cgroup limit."""
    job = tmp_path / "cgroup" / "job"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("1000000\n")
    (job / "memory.current").write_text("400000\n")
    (tmp_path / "membership").write_text("0::/job\n")
    assert memory.cgroup_headroom(tmp_path / "cgroup", tmp_path / "membership") == 600000
    (job / "memory.max").write_text("max\n")
    assert memory.cgroup_headroom(tmp_path / "cgroup", tmp_path / "membership") is None

    (tmp_path / "status").write_text("Name:\tpython\nVmSize:\t 3000000 kB\n")
    monkeypatch.setattr(resource, "getrlimit", lambda _: (4_600_000 * 1024, resource.RLIM_INFINITY))
    assert memory.address_space_headroom(tmp_path / "status") == (4_600_000 - 3_000_000) * 1024

    monkeypatch.setattr(memory, "meminfo_available", lambda: 21 * 2**30)
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: 8 * 2**30)
    monkeypatch.setattr(memory, "address_space_headroom", lambda: 3 * 2**30)
    assert memory.free_bytes(torch.device("cpu"), processes_per_node=2) == 3 * 2**30, "the process's own limit"
    monkeypatch.setattr(memory, "address_space_headroom", lambda: None)
    assert memory.free_bytes(torch.device("cpu"), processes_per_node=2) == 4 * 2**30, "the cgroup's, shared"

    failed = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    named = pytest.raises(memory.RecoverOutOfMemoryError, match=r"method\.recover\.wave_images .*group_images")
    with named, memory.named_memory_keys():
        raise failed
    with pytest.raises(RuntimeError, match="something else"), memory.named_memory_keys():
        raise RuntimeError("something else")


def test_printed_commands_paste_into_a_shell_and_disk_and_name_limits_are_named(make_cfg, workdir: Path, monkeypatch):
    monkeypatch.setattr(summary, "task_overrides", lambda: ["paths.root=/data/my runs", "ipc=2", "seed=1"])
    command = summary.next_command("relabel.py", summary.SET_KEYS)
    assert command == "python relabel.py 'paths.root=/data/my runs' ipc=2 seed=1"
    assert shlex.split(command)[2] == "paths.root=/data/my runs"

    def full_disk(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = workdir / "epoch_0001.pt"
    with pytest.raises(
        DiskFullError, match=r"no space left on the device while writing .*epoch_0001\.pt.*same command"
    ):
        atomic_write(target, full_disk)
    assert not list(workdir.glob(".epoch_0001*")) and not target.exists(), "nothing half-written is left"

    with pytest.raises(NameTooLongError, match=r"is 300 bytes, more than the file system allows .*set=<name>"):
        distill(make_cfg("distill", *SET, "set=" + "x" * 300))
