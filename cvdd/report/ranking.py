"""DD-Ranking's metrics (Li et al., 2025, "DD-Ranking: Rethinking the Evaluation of Dataset Distillation") from the
results on disk, whenever their references are there.

* ``hard_label_recovery`` (HLR) = Acc(full data, hard labels) − Acc(set, hard labels): what the images alone lack
  against the whole training set (lower is better).
* ``improvement_over_random`` (IOR) = Acc(set, its labels) − Acc(random real images, the same labels): what the
  images add over random real ones labelled the same way (higher is better).
* ``label_robust_score`` (LRS) = 100 · (e^α − e^−1) / (e − e^−1), α = λ·IOR − (1 − λ)·HLR with λ = 0.5 and IOR,
  HLR as fractions: in [0, 100] (DD-Ranking's definition scaled by 100), higher is better.

References. The full data: the student's architecture squeezed on the whole training set (``python train.py
model=<student>``, its teacher record's test top-1: the dataset's squeeze recipe with hard labels). Random real
images: ``method=random_real`` results of the same dataset, student, IPC, label mode and labelling teachers, read
from each result's config (SRe2L++ labels with its one model, so its reference is random real images relabelled by
that model, ``relabel.teachers=<model>``, in an artifacts folder of their own since a set keeps one label folder
per storage setting). Accuracies are means over the seeds present (a seed evaluated twice counts once, the newest).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cvdd.artifacts import load_json_if_intact
from cvdd.report.protocol import SET_MAKING, protocol_key, settings_of, variants

LAMBDA = 0.5
LABEL_SETTINGS = (  # what only the labels depend on: a hard-label result shares none of it
    "labels",
    "relabel.temperature",
    "relabel.bssl",
    "relabel.halves",
    "relabel.dtype",
    "relabel.topk",
    "relabel.teachers",
    "validate.temperature",
)
RANDOM = "random_real"
COLUMNS = (
    "dataset",
    "student",
    "labels",
    "method",
    "ipc",
    "teachers",
    "variant",
    "test_top1",
    "hard_label_top1",
    "random_real_top1",
    "full_data_top1",
    "hard_label_recovery",
    "improvement_over_random",
    "label_robust_score",
)


class Cell(NamedTuple):
    """What a ranking row is, and the keys its references are found by."""

    dataset: str
    student: str
    labels: str
    method: str
    ipc: int
    teachers: str | None
    making: str  # how the set was made (the method's and committee's settings)
    evaluation: str  # how it was evaluated: schedule and label settings
    schedule: str  # the student's training schedule alone (what a hard-label result shares with a soft one)


@dataclass(frozen=True)
class Ranking:
    dataset: str
    student: str
    labels: str
    method: str
    ipc: int
    teachers: str | None  # who labelled the set (relabel.teachers); None for hard labels
    test_top1: float
    hard_label_top1: float | None
    random_real_top1: float | None
    full_data_top1: float | None
    variant: str = ""  # how its settings differ from another row of the same method, IPC and teachers

    @property
    def hard_label_recovery(self) -> float | None:
        if self.full_data_top1 is None or self.hard_label_top1 is None:
            return None
        return self.full_data_top1 - self.hard_label_top1

    @property
    def improvement_over_random(self) -> float | None:
        return None if self.random_real_top1 is None else self.test_top1 - self.random_real_top1

    @property
    def label_robust_score(self) -> float | None:
        hlr, ior = self.hard_label_recovery, self.improvement_over_random
        return None if hlr is None or ior is None else label_robust_score(hlr, ior)

    @property
    def row_name(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    def row(self) -> list:
        return [getattr(self, c) for c in COLUMNS]


def label_robust_score(hlr: float, ior: float, lam: float = LAMBDA) -> float:
    """DD-Ranking's LRS of HLR and IOR given in percentage points, scaled to [0, 100]."""
    alpha = lam * ior / 100 - (1 - lam) * hlr / 100
    return 100 * (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


def labelling_teachers(record: dict) -> str | None:
    """Who labelled the set a result trained on (``relabel.teachers``); ``None`` for hard labels."""
    if record["labels"] == "hard":
        return None
    return str(record.get("config", {}).get("relabel", {}).get("teachers"))


def mean_top1(records: Iterable[dict]) -> float | None:
    """Mean final top-1 over seeds, a seed evaluated twice counted once (the newest)."""
    newest = {int(r["seed"]): r["test_top1"] for r in sorted(records, key=lambda r: r.get("created", ""))}
    return statistics.fmean(newest.values()) if newest else None


def full_data_top1(records: Sequence[dict], dataset: str, student: str) -> float | None:
    """The test top-1 of ``student`` squeezed on all of ``dataset`` (its teacher record), found through the
    artifacts folder the results were written under."""
    folders = {r.get("config", {}).get("paths", {}).get("artifacts") for r in records if r["dataset"] == dataset}
    for folder in sorted(f for f in folders if f):
        record = load_json_if_intact(Path(folder) / dataset / "teachers" / f"{student}.json", "leaving HLR out")
        if record is not None and "test_top1" in record:
            return float(record["test_top1"])
    return None


def rankings(records: Sequence[dict], full_data: Mapping[tuple[str, str], float] | None = None) -> list[Ranking]:
    """HLR, IOR and LRS of every set with a result, as far as its references are present (random real images are
    their own reference: IOR 0); ``full_data`` gives the full-data top-1 per (dataset, student) instead of the
    teacher records. A reference counts only under the same protocol (:mod:`.protocol`): random real images under
    the same evaluation and label settings, the hard-label result of a set made the same way under the same
    training schedule."""
    groups: dict[Cell, list[dict]] = defaultdict(list)
    for r in records:
        settings = settings_of(r)
        cell = Cell(
            r["dataset"],
            r["student"],
            r["labels"],
            r["method"],
            int(r["ipc"]),
            labelling_teachers(r),
            protocol_key(settings, only=SET_MAKING),
            protocol_key(settings, SET_MAKING),
            protocol_key(settings, (*SET_MAKING, *LABEL_SETTINGS)),
        )
        groups[cell].append(r)
    named = variants(list(groups), lambda c: c[:6], lambda c: settings_of(groups[c][0]))
    full = dict(full_data or {})
    out = []
    for cell, members in sorted(groups.items(), key=lambda item: str(item[0])):
        if (cell.dataset, cell.student) not in full:
            full[(cell.dataset, cell.student)] = full_data_top1(records, cell.dataset, cell.student)
        hard = [
            r
            for c, rs in groups.items()
            if (c.dataset, c.student, c.labels, c.method, c.ipc)
            == (cell.dataset, cell.student, "hard", cell.method, cell.ipc)
            and (c.making, c.schedule) == (cell.making, cell.schedule)
            for r in rs
        ]
        random = [
            r
            for c, rs in groups.items()
            if (c.dataset, c.student, c.labels, c.method, c.ipc, c.teachers, c.evaluation)
            == (cell.dataset, cell.student, cell.labels, RANDOM, cell.ipc, cell.teachers, cell.evaluation)
            for r in rs
        ]
        out.append(
            Ranking(
                cell.dataset,
                cell.student,
                cell.labels,
                cell.method,
                cell.ipc,
                cell.teachers,
                mean_top1(members),
                mean_top1(hard),
                mean_top1(random),
                full[(cell.dataset, cell.student)],
                named.get(id(cell), ""),
            )
        )
    return out


def ranking_table(ranks: Sequence[Ranking]) -> str:
    """One markdown table per (dataset, student, labels): the set's top-1 and its DD-Ranking metrics; empty when no
    set has a reference."""
    shown = [r for r in ranks if r.hard_label_recovery is not None or r.improvement_over_random is not None]
    if not shown:
        return ""
    blocks = []
    for setting in sorted({(r.dataset, r.student, r.labels) for r in shown}):
        dataset, student, labels = setting
        full = next(r.full_data_top1 for r in shown if (r.dataset, r.student, r.labels) == setting)
        lines = [
            f"**{dataset}**, student `{student}`, `{labels}` labels — DD-Ranking metrics (percentage points; LRS in "
            f"[0, 100]); full data: {'–' if full is None else f'{full:.2f} %'}",
            "",
            "| method | IPC | labelled by | top-1 | hard_label_recovery | improvement_over_random "
            "| label_robust_score |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            (r for r in shown if (r.dataset, r.student, r.labels) == setting),
            key=lambda r: (r.method, r.variant, r.ipc),
        ):
            cells = [r.hard_label_recovery, r.improvement_over_random, r.label_robust_score]
            lines.append(
                f"| {r.row_name} | {r.ipc} | {r.teachers or 'hard labels'} | {r.test_top1:.2f} | "
                + " | ".join("–" if v is None else f"{v:+.2f}" if i == 1 else f"{v:.2f}" for i, v in enumerate(cells))
                + " |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def ranking_csv(ranks: Sequence[Ranking]) -> str:
    """Every ranking as a CSV row, columns named as DD-Ranking's (empty where a reference is missing)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in ranks:
        writer.writerow(["" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.row()])
    return out.getvalue()
