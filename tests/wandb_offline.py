"""Reads an offline W&B run's ``run-*.wandb`` file (a LevelDB-style log of protobuf records, after a 7-byte
``:W&B`` header) into what a dashboard would show: group, job type, config, metrics and media files."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768  # the log's block size; a record header never straddles a block boundary
FULL, LAST = 1, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


@dataclass
class OfflineRun:
    folder: Path
    group: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    metrics: dict[str, list] = field(default_factory=dict)  # history key → values in order

    def media(self, kind: str) -> list[Path]:
        return sorted((self.folder / "files" / "media" / kind).glob("*"))


def read_run(folder: Path) -> OfflineRun:
    (log_file,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.job_type = record.run.run_group, record.run.job_type
            run.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                run.metrics.setdefault(key, []).append(json.loads(item.value_json))
    return run


def run_folders(root: Path) -> list[Path]:
    return [folder for folder in sorted(Path(root).rglob("offline-run-*")) if folder.is_dir()]


def record_kinds(folder: Path) -> Counter:
    """How many records of each kind the run's log holds."""
    return Counter(
        record.WhichOneof("record_type") or "?"
        for log_file in Path(folder).glob("run-*.wandb")
        for record in records(log_file)
    )


def offline_runs(root: Path, wait_s: float = 60.0) -> list[OfflineRun]:
    """Every offline run under ``root``, read once W&B's service has closed its log (its ``exit`` record). Two CI
    runs read the last run's log straight after ``wandb.finish()`` and found only its 7-byte header; after
    ``wait_s`` the runs are read as they are (and the test's assertions say what is missing)."""
    folders = run_folders(root)
    open_runs, deadline = list(folders), time.monotonic() + wait_s
    while open_runs and time.monotonic() < deadline:
        open_runs = [folder for folder in open_runs if not record_kinds(folder)["exit"]]
        if open_runs:
            time.sleep(0.2)
    return [read_run(folder) for folder in folders]


def describe(root: Path) -> str:
    """Each offline run folder under ``root`` with its log's size and record kinds: what a failed read-back
    assertion needs to tell a run that was never written from one that was cut short."""
    lines = [
        f"{folder.name}: {sum(f.stat().st_size for f in folder.glob('run-*.wandb'))} bytes, "
        f"records {dict(record_kinds(folder))}"
        for folder in run_folders(root)
    ]
    return "\n".join(lines) or f"no offline runs under {root}"
