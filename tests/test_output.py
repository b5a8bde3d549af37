"""What a user sees: each entry point on digits prints none of the library noise, a short log, and a summary
that ends with the next command of the chain; ``verbose=true`` brings the noise back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cvdd.runtime.quiet import NOISE
from tests.conftest import run_cli

NOISE_PATTERN = re.compile("|".join(NOISE))
SET = ("committee=sre2l_small", "ipc=1")
LABELS = (*SET, "relabel.epochs=2", "relabel.teachers=resnet18_small")


def log_lines(proc) -> list[str]:
    """Everything printed except progress bars (carriage-return redraws, tqdm's rates and cursor moves)."""
    text = (proc.stdout + proc.stderr).replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip() and "it/s" not in line and "\x1b[A" not in line]


@pytest.mark.slow
def test_every_entry_point_prints_a_short_quiet_log_with_the_next_command(tmp_path: Path):
    runs = {
        "train.py": (("model=convnet_small", "squeeze.epochs=1"), "python distill.py"),
        # squeezes its missing member first: one line for it, then recover's summary
        "distill.py": (
            (*SET, "method.recover.iterations=3", 'committee.train_overrides=["squeeze.epochs=1"]'),
            "python relabel.py committee=sre2l_small ipc=1",
        ),
        "relabel.py": (LABELS, "python evaluate.py committee=sre2l_small ipc=1 relabel.epochs=2"),
        "evaluate.py": (LABELS, f"python -m cvdd.report {tmp_path}/artifacts/digits/results"),
    }
    for script, (overrides, follow_up) in runs.items():
        lines = log_lines(run_cli(script, *overrides, "logger=none", cwd=tmp_path))
        noise = [line for line in lines if NOISE_PATTERN.search(line)]
        assert not noise, f"{script} printed {noise}"
        assert len(lines) <= 15, f"{script} printed {len(lines)} lines:\n" + "\n".join(lines)
        (next_line,) = [line.strip() for line in lines if line.strip().startswith("next ")]
        assert next_line.split(None, 1)[1].startswith(follow_up), next_line
        assert any(line.endswith(" done") for line in lines), f"{script} has no summary block"
        if script == "distill.py":
            assert any("[1/1] resnet18_small: top-1" in line for line in lines), lines
    loud = log_lines(run_cli("evaluate.py", *LABELS, "logger=none", "verbose=true", cwd=tmp_path))
    assert any(NOISE_PATTERN.search(line) for line in loud), "verbose=true shows Lightning's own messages"
