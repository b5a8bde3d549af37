"""A Lightning callback that bench/scale.py adds to relabel and evaluate runs (``+callbacks.scale_probe=…``).

Each process of a run writes ``<out>/rank<r>.json`` when it exits: seconds from its start to its first step,
its peak RSS, what it read (``/proc/self/io``) and hashed (:data:`cvdd.artifacts.io.HASHED`), the bytes that crossed
the loopback interface per student step on rank 0 (all ranks' traffic under gloo; the machine is otherwise idle
while the benchmark runs) and the slices this rank forwarded (``StudentModule.forwards``).
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def process_age() -> float:
    """Seconds since this process started (from /proc: the interpreter's start-up and imports count too)."""
    ticks = os.sysconf("SC_CLK_TCK")
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss() -> int:
    """This process's peak resident set (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: Linux carries that across
    ``execve`` from the parent, so a child started by a large parent reports the parent's peak."""
    return status_bytes("VmHWM")


def io_counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, data = line.partition(":")
        if name.strip() == "lo":
            return int(data.split()[8])  # transmitted bytes
    return 0


class ScaleProbe(Callback):
    def __init__(self, out: str, warmup_steps: int = 2):
        self.out, self.warmup = Path(out), warmup_steps
        self.first_step_s: float | None = None
        self.rss_first_step: int | None = None
        self.steps = self.forwards = 0
        self.lo_start: tuple[int, int] | None = None
        self.lo_end: tuple[int, int] | None = None
        self.rank = int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0))
        atexit.register(self.write)

    def _first(self) -> None:
        if self.first_step_s is None:
            self.first_step_s = process_age()
            self.rss_first_step = status_bytes("VmRSS")  # the set is loaded; no batch has run yet

    def on_predict_batch_start(self, *args, **kwargs) -> None:
        self._first()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._first()
        if self.steps == self.warmup:
            self.lo_start = (loopback_bytes(), self.steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        self.forwards += int(getattr(pl_module, "forwards", 0))
        if self.lo_start is not None:
            self.lo_end = (loopback_bytes(), self.steps)

    def write(self) -> None:
        from cvdd.artifacts.io import HASHED

        per_step = None
        if self.lo_start and self.lo_end and self.lo_end[1] > self.lo_start[1]:
            per_step = (self.lo_end[0] - self.lo_start[0]) / (self.lo_end[1] - self.lo_start[1])
        record = {
            "rank": self.rank,
            "first_step_s": self.first_step_s,
            "exit_s": process_age(),
            "peak_rss_bytes": peak_rss(),
            "rss_first_step_bytes": self.rss_first_step,
            **io_counters(),
            "hashed_bytes": HASHED["bytes"],
            "steps": self.steps,
            "forwards": self.forwards,
            "loopback_bytes_per_step": per_step,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(record, indent=1))
