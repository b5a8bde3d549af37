"""Bad input is refused before any work, with a message that names the key and the fix, and no stack trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from cvdd.artifacts import ArtifactConflictError
from cvdd.config.migrations import refuse_old_spellings
from cvdd.runtime.errors import ConfigError, UnknownNameError, UserError, reported_errors
from cvdd.stages.distill import distill
from cvdd.stages.relabel import relabel
from cvdd.stages.validate import validate

NO_SQUEEZE = ("committee.train_missing=false", "logger=none")


def run_failing(script: str, *args: str, cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc


def test_entry_points_print_the_reason_without_a_stack_trace(tmp_path: Path):
    proc = run_failing("distill.py", "ipc=0", cwd=tmp_path)
    assert (
        proc.stderr.startswith("error: ipc=0: needs a whole number of images per class, at least 1")
        and "Traceback" not in proc.stderr
    )
    proc = run_failing("evaluate.py", "student=nope", cwd=tmp_path)
    assert proc.stderr.startswith("error: student='nope' is not a model id; choose from ") and "resnet18" in proc.stderr
    proc = run_failing("distill.py", "ipc=0", cwd=tmp_path, full_error=True)
    assert "Traceback" in proc.stderr and "ConfigError: ipc=0" in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_only_user_errors_lose_their_traceback(capsys):
    """A ``UserError`` becomes one line and exit status 1; a bare ``ValueError`` or ``KeyError`` is a bug and
    propagates with its traceback (it was printed as a user error before)."""
    with pytest.raises(SystemExit) as stop, reported_errors():
        raise UnknownNameError("unknown model 'x'; registered: a, b")
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("error: unknown model 'x'; registered: a, b\n")
    for bug in (ValueError("a bug"), KeyError("fingerprint")):
        with pytest.raises(type(bug)), reported_errors():
            raise bug
    assert issubclass(ConfigError, ValueError) and issubclass(ArtifactConflictError, UserError)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ipc=0", r"ipc=0: needs .*at least 1"),
        ("method.recover.iterations=0", r"method\.recover\.iterations=0: needs .*at least 1"),
        ("set=../../x", r"set='\.\./\.\./x' must be a plain folder name"),
        ("set=sub/set", r"set='sub/set' must be a plain folder name"),
        ("method.recover.init.candidates=19", r"raise method\.recover\.init\.candidates to at least 20"),
    ],
)
def test_distill_refuses_bad_settings_before_any_work(make_cfg, tmp_path: Path, override: str, message: str):
    with pytest.raises(ValueError, match=message):
        distill(make_cfg("distill", "ipc=20", override, *NO_SQUEEZE))
    assert not (tmp_path / "artifacts").exists()


def test_real_initialisation_never_repeats_an_image(make_cfg, workdir: Path):
    """digits has 141-146 training images per class: IPC 150 of distinct real images cannot exist."""
    with pytest.raises(ValueError, match=r"needs ipc=150 distinct real images per class, but class '\d' has 14\d"):
        distill(make_cfg("distill", "ipc=150", "method.recover.init.mode=real", "logger=none"))


def test_unknown_teacher_and_student_ids_list_the_choices(make_cfg, workdir: Path, random_real):
    random_real()
    real = ("method=random_real", "logger=none")
    with pytest.raises(ValueError, match=r"relabel\.teachers .*='nope' is not a model id; choose from .*resnet18"):
        relabel(make_cfg("relabel", "relabel.teachers=nope", *real))
    with pytest.raises(ValueError, match=r"student='nope' is not a model id"):
        validate(make_cfg("evaluate", "student=nope", "logger=none"))
    with pytest.raises(ValueError, match=r"ipc=-1: needs .*at least 1"):
        relabel(make_cfg("relabel", "ipc=-1", *real))
    with pytest.raises(ValueError, match=r"relabel\.stack_images=0: needs .*at least 1"):
        relabel(make_cfg("relabel", "relabel.stack_images=0", *real))
    with pytest.raises(ValueError, match=r"hardware\.precision='fp16'"):
        relabel(make_cfg("relabel", "hardware.precision=fp16", *real))


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["distilled=random_real"], r"distilled=random_real is replaced by method=random_real: .* `python distill"),
        (["-m", "name=x"], r"name=x is now set=x"),
        (["recover.iterations=5"], r"recover\.iterations=5 is now method\.recover\.iterations=5 \(every recover\.\*"),
        (["+recover.init.mode=real"], r"recover\.init\.mode=real is now method\.recover\.init\.mode=real"),
    ],
)
def test_old_spellings_are_refused_with_what_replaces_them(argv, hint, capsys):
    with pytest.raises(SystemExit):
        refuse_old_spellings(argv)
    assert re.search(hint, capsys.readouterr().err)


def test_current_spellings_pass_the_migration_check():
    refuse_old_spellings(
        ["-m", "set=x", "method.recover.iterations=5", "dataset.recover.lr=0.1", "distilled=synthetic"]
    )


@pytest.mark.parametrize(
    ("stage", "blocked", "overrides"),
    [
        ("train", "teachers", ()),
        ("distill", "distilled", NO_SQUEEZE),
        ("relabel", "labels", ("method=random_real", "logger=none")),
        ("evaluate", "results", ("method=random_real", "labels=hard", "logger=none")),
    ],
)
def test_unwritable_outputs_fail_before_the_work(
    make_cfg, tmp_path: Path, monkeypatch, random_real, stage, blocked, overrides
):
    """A file where the output folder should be cannot be written even by root (unlike a chmod)."""
    if stage in ("relabel", "evaluate"):
        random_real()  # the set they read
    from cvdd.artifacts import ArtifactNotWritableError
    from cvdd.stages import squeeze as squeeze_job
    from cvdd.stages import validate as validate_stage
    from cvdd.stages.squeeze import squeeze_teacher

    def no_training(*_args, **_kwargs):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(squeeze_job, "stage_trainer", no_training)
    monkeypatch.setattr(validate_stage, "stage_trainer", no_training)
    (tmp_path / "artifacts" / "digits").mkdir(parents=True, exist_ok=True)
    (tmp_path / "artifacts" / "digits" / blocked).write_text("not a folder")
    job = {"train": squeeze_teacher, "distill": distill, "relabel": relabel, "evaluate": validate}[stage]
    with pytest.raises(ArtifactNotWritableError, match=rf"cannot write to {tmp_path}/artifacts/digits/{blocked}"):
        job(make_cfg(stage, *overrides))
