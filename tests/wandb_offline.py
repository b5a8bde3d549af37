"""Reads an offline W&B run's ``run-*.wandb`` file (a LevelDB-style log of protobuf records, after a 7-byte
``:W&B`` header) into what a dashboard would show: group, job type, config, metrics and media files."""

from __future__ import annotations

import json
import time
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


def closed(folder: Path) -> bool:
    """The run's log ends with its ``exit`` record: W&B's service has written all of it."""
    return any(
        record.WhichOneof("record_type") == "exit"
        for log_file in Path(folder).glob("run-*.wandb")
        for record in records(log_file)
    )


def offline_runs(root: Path, wait_s: float = 60.0) -> list[OfflineRun]:
    """Every offline run under ``root``, read once W&B's service has closed its log. Two CI runs read the last
    run's log straight after ``wandb.finish()`` and found only its 7-byte header, so the reader waits for every
    log's ``exit`` record; after ``wait_s`` the runs are read as they are (and the test's assertions say what
    is missing)."""
    folders = [folder for folder in sorted(Path(root).rglob("offline-run-*")) if folder.is_dir()]
    deadline = time.monotonic() + wait_s
    while not all(closed(folder) for folder in folders) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [read_run(folder) for folder in folders]


def describe(root: Path) -> str:
    """Each offline run folder under ``root`` with its log file's size and record kinds: what a failed
    read-back assertion needs to tell a run that was never written from one that was cut short."""
    lines = []
    for folder in sorted(Path(root).rglob("offline-run-*")):
        for log_file in sorted(folder.glob("run-*.wandb")):
            kinds: dict[str, int] = {}
            for record in records(log_file):
                kind = record.WhichOneof("record_type") or "?"
                kinds[kind] = kinds.get(kind, 0) + 1
            lines.append(f"{folder.name}: {log_file.stat().st_size} bytes, records {kinds}")
    return "\n".join(lines) or f"no offline runs under {root}"
