"""The block every stage ends with: what it wrote (path, size), its key numbers, the wall time and the next
command of the chain, with exactly the overrides of this run that the next stage needs."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from cvdd.runtime import log
from cvdd.runtime.trainer import task_overrides

# The overrides that name the same set (data, method, committee, IPC, seed, set, paths, machine, preset).
SET_KEYS = ("dataset", "method", "committee", "ipc", "seed", "set", "paths", "hardware", "experiment")
LABEL_KEYS = (*SET_KEYS, "relabel", "soft_labels", "distilled")
TEACHER_KEYS = ("dataset", "paths", "hardware", "seed", "experiment")


DISTILL_ONLY = ("committee.train_missing", "committee.train_overrides")


def command_with(script: str, keep: Callable[[str], bool]) -> str:
    """``python <script>`` with this run's overrides whose key ``keep`` accepts, each quoted for the shell (a path with
    spaces, a list) so the line can be pasted as it is."""
    kept = [shlex.quote(o) for o in task_overrides() or [] if keep(o.lstrip("+~").split("=", 1)[0])]
    return " ".join([f"python {script}", *kept])


def next_command(script: str, keys: Sequence[str]) -> str:
    """``python <script>`` with this run's overrides whose key is one of ``keys`` (or below one)."""
    return command_with(
        script, lambda key: any(key == k or key.startswith(k + ".") for k in keys) and key not in DISTILL_ONLY
    )


def size_on_disk(path: Path) -> str:
    """Bytes of a file or of every file below a folder, in a readable unit."""
    path = Path(path)
    total = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1000
    raise AssertionError("unreachable")


def stage_summary(stage: str, rows: Sequence[tuple[str, str]], seconds: float, next_step: str | None) -> str:
    """Log (and return) the block: one ``name  value`` row each, the wall time, the next command."""
    rows = [*rows, ("time", f"{seconds:.1f} s")] + ([("next", next_step)] if next_step else [])
    width = max(len(name) for name, _ in rows)
    text = "\n".join([f"{stage} done", *(f"  {name:<{width}}  {value}" for name, value in rows)])
    log.info("%s", text)
    return text
