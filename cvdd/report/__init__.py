"""Results of ``evaluate.py`` → a markdown table of mean ± std and a top-1-vs-IPC plot.

    python -m cvdd.report artifacts/fashion_mnist/results            # prints the table (final top-1)
    python -m cvdd.report artifacts/fashion_mnist/results --metric best  # best top-1 over the evaluations
    python -m cvdd.report logs/evaluate/multiruns/<stamp> --out report # + report/summary.{md,png}
    python -m cvdd.report artifacts/fashion_mnist/results --wandb       # + a W&B run with the tables and plot

Every ``*.json`` below the folder that is a validate result (it has ``test_top1``) counts. Runs are
grouped by (dataset, student, label mode, method, IPC); seeds of a group are averaged, with the
sample standard deviation. ``final`` is the student's top-1 after its last epoch; ``best`` the highest
of its periodic evaluations (``validate.eval_every``) and the final one, as the released CV-DD code
reports. Every table says which. The same tool serves the CPU benchmark, paper-scale runs and sweeps.

Where their references are present (the student squeezed on the full data, hard-label results, random real images
under the same labels), DD-Ranking's HLR, IOR and LRS follow the tables (:mod:`cvdd.report.ranking`;
``ranking.csv`` with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cvdd.artifacts import atomic_write
from cvdd.report.protocol import SET_MAKING, differing, protocol_key, settings_of, variants
from cvdd.report.ranking import ranking_csv, ranking_table, rankings
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError, MissingInputError
from cvdd.runtime.provenance import version_signature

Reference = Mapping[str, Mapping[int, float]]  # published rows: name → {IPC: top-1}
METRICS = {"final": "test_top1", "best": "test_top1_best"}  # what a table reports → the result's field


@dataclass(frozen=True)
class Group:
    dataset: str
    student: str
    labels: str
    method: str
    ipc: int
    top1: tuple[float, ...]
    seeds: tuple[int, ...]
    metric: str = "final"
    eval_every: tuple[int, ...] = ()  # evaluation intervals behind a ``best`` value
    versions: tuple[str, ...] = ()  # the library versions and commits its results came from (version_signature)
    protocol: str = ""  # fingerprint of the settings its number depends on (:mod:`.protocol`)
    variant: str = ""  # how its protocol differs from others of its method in the same table ("" when alone)
    settings: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def row(self) -> str:
        """The method, and the settings that tell this row from another of the same method."""
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def std(self) -> float:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else 0.0

    def cell(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f} (n={len(self.top1)})"


REQUIRED = ("name", "method", "dataset", "ipc", "seed", "student", "labels", "test_top1")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


FIELD_TYPES = {
    "ipc": _whole,
    "seed": _whole,
    "test_top1": _number,
    **{key: lambda v: isinstance(v, str) for key in ("name", "method", "dataset", "student", "labels")},
}


def load_results(folder: Path) -> list[dict]:
    """Every validate result below ``folder``. JSON that is not a result (no ``test_top1``) is ignored; a result
    lacking a field a table groups by (written by an early version) is named in a warning and left out."""
    if not folder.is_dir():
        raise MissingInputError(f"results folder {folder} does not exist; point at artifacts/<dataset>/results")
    found = []
    for path in sorted(folder.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(record, dict) or "test_top1" not in record:
            continue
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            log.warning("%s left out: no %s (run evaluate.py again to record it)", path, ", ".join(missing))
            continue
        wrong = [key for key, ok in FIELD_TYPES.items() if not ok(record[key])]
        if wrong:
            log.warning("%s left out: not a result of evaluate.py (%s of the wrong kind)", path, ", ".join(wrong))
            continue
        found.append(record)
    return found


def labels_of(record: dict) -> str:
    """The label mode, with the top-k storage variant spelled out (``offline top-3``)."""
    return f"{record['labels']} top-{record['label_topk']}" if record.get("label_topk") else str(record["labels"])


def summarise(records: Iterable[dict], metric: str = "final") -> list[Group]:
    """Groups sorted by setting, method, IPC; a seed evaluated twice with the same settings counts once (the newest).
    Results of one method and IPC made with other settings (epochs, learning rate, temperatures, label settings,
    image format, the method's recipe: :mod:`.protocol`) form groups of their own, told apart by ``variant``.

    ``metric``: ``final`` or ``best`` top-1; results that predate the ``best`` record are left out of it.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r}; choose from {', '.join(METRICS)}")
    column = METRICS[metric]
    by_key: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r.get("created", "")):
        if column not in r:
            continue
        key = (r["dataset"], r["student"], labels_of(r), r["method"], int(r["ipc"]), protocol_key(settings_of(r)))
        by_key[key][int(r["seed"])] = r
    groups = [
        Group(
            *key[:5],
            top1=tuple(seeds[s][column] for s in sorted(seeds)),
            seeds=tuple(sorted(seeds)),
            metric=metric,
            eval_every=tuple(sorted({int(r["eval_every"]) for r in seeds.values() if "eval_every" in r})),
            versions=tuple(sorted({version_signature(r) for r in seeds.values()})),
            protocol=key[-1],
            settings=settings_of(next(iter(seeds.values()))),
        )
        for key, seeds in by_key.items()
    ]
    rows: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        rows[(g.dataset, g.student, g.labels, g.method)].append(g)
    named = {}
    for members in rows.values():
        named.update(variants(members, lambda g: g.ipc, lambda g: g.settings))
    groups = [replace(g, variant=named.get(id(g), "")) for g in groups]
    return sorted(groups, key=lambda g: (g.dataset, g.student, g.labels, g.method, g.variant, g.ipc))


def evaluation_note(members: Sequence[Group]) -> str:
    """The evaluation settings (not how the sets were made) on which the rows of one table differ, if any: a reader
    compares such rows knowing it."""
    keys = [k for k in differing([g.settings for g in members]) if not k.startswith(SET_MAKING)]
    return f"rows differ in evaluation settings: {', '.join(keys)}" if keys else ""


def metric_phrase(groups: Sequence[Group]) -> str:
    """What the numbers are: the final top-1, or the best of evaluations every N epochs and the final one."""
    if not groups or groups[0].metric == "final":
        return "final test top-1 (%, after the last epoch)"
    every = sorted({e for g in groups for e in g.eval_every})
    interval = "/".join(str(e) for e in every) or "?"
    return f"best test top-1 (%, highest of the evaluations every {interval} epochs and the final one)"


def settings(groups: Sequence[Group]) -> dict[tuple[str, str, str], list[Group]]:
    out: dict[tuple[str, str, str], list[Group]] = defaultdict(list)
    for g in groups:
        out[(g.dataset, g.student, g.labels)].append(g)
    return dict(out)


def markdown_table(
    groups: Sequence[Group], method_order: Sequence[str] = (), reference: Reference | None = None
) -> str:
    """One method × IPC table of test top-1 (%) per (dataset, student, labels) setting.

    ``reference`` rows (published numbers) are appended to every table at the IPCs it shows.
    """
    if not groups:
        return "no validate results found\n"
    blocks = []
    order = {m: i for i, m in enumerate(method_order)}
    for (dataset, student, labels), members in settings(groups).items():
        ipcs = sorted({g.ipc for g in members})
        rows = sorted({g.row: g for g in members}.values(), key=lambda g: (order.get(g.method, len(order)), g.row))
        methods = [g.row for g in rows]
        odd, note = mixed_versions(members)
        cells = {(g.row, g.ipc): g.cell() + ("†" if g in odd else "") for g in members}
        lines = [
            f"**{dataset}**, student `{student}`, `{labels}` labels — {metric_phrase(members)}, mean ± std over seeds",
            "",
            "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
            "|---|" + "---|" * len(ipcs),
        ]
        lines += [f"| {m} | " + " | ".join(cells.get((m, i), "–") for i in ipcs) + " |" for m in methods]
        for name, row in (reference or {}).items():
            lines.append(f"| {name} | " + " | ".join(f"{row[i]:.1f}" if i in row else "–" for i in ipcs) + " |")
        notes = [n for n in (note, evaluation_note(members)) if n]
        blocks.append("\n".join([*lines, *(["", *notes] if notes else [])]))
    return "\n\n".join(blocks) + "\n"


def mixed_versions(members: Sequence[Group]) -> tuple[set[Group], str]:
    """The cells of one table made with other library versions or code than most of its results (``†``), and the
    note that says which: numbers from different versions may differ by float rounding alone."""
    counts = Counter(v for g in members for v in g.versions for _ in g.seeds)
    if len(counts) < 2:
        return set(), ""
    usual = counts.most_common(1)[0][0]
    odd = {g for g in members if set(g.versions) != {usual}}
    others = sorted({v for g in odd for v in g.versions if v != usual})
    return odd, f"† made (in part) with other versions than the rest ({usual}): " + "; ".join(others)


def plot(groups: Sequence[Group], path: Path, title: str = "", reference: Reference | None = None) -> Path:
    """Top-1 vs IPC (log axis), one line per method and setting, error bars = std over seeds.

    ``reference`` rows are drawn dashed and grey, at the IPCs the groups cover.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    many = len(settings(groups)) > 1
    lines: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        lines[(g.dataset, g.student, g.labels, g.row)].append(g)
    for (dataset, student, labels, method), points in lines.items():
        points = sorted(points, key=lambda g: g.ipc)
        label = f"{method} ({dataset}, {student}, {labels})" if many else method
        ax.errorbar(
            [g.ipc for g in points],
            [g.mean for g in points],
            yerr=[g.std for g in points],
            marker="o",
            capsize=3,
            label=label,
        )
    ipcs = sorted({g.ipc for g in groups})
    for i, (name, row) in enumerate((reference or {}).items()):
        shown = [ipc for ipc in ipcs if ipc in row]
        style = ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)))[i % 4]
        ax.plot(shown, [row[ipc] for ipc in shown], linestyle=style, color="grey", marker="x", label=name)
    ax.set_xscale("log")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel(f"student test top-1 (%, {groups[0].metric if groups else 'final'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    return path


def write_report(
    folder: Path, out: Path | None = None, title: str = "", method_order: Sequence[str] = (), metric: str = "final"
) -> str:
    """Summarise ``folder`` (with DD-Ranking's metrics where their references are present, :mod:`.ranking`); with
    ``out``, also write ``summary.md``, ``ranking.csv`` and ``summary.png`` there."""
    records = load_results(folder)
    groups = summarise(records, metric)
    ranks = rankings(records)
    table = markdown_table(groups, method_order)
    ranking = ranking_table(ranks)
    if ranking:
        table += "\n" + ranking
    if out is not None and groups:
        out.mkdir(parents=True, exist_ok=True)
        text = (f"# {title}\n\n" if title else "") + table
        atomic_write(out / "summary.md", lambda fh: fh.write(text.encode()))
        atomic_write(out / "ranking.csv", lambda fh: fh.write(ranking_csv(ranks).encode()))
        plot(groups, out / "summary.png", title)
    return table


RESULT_COLUMNS = ("dataset", "student", "labels", "method", "ipc", "seed", "test_top1", "test_top1_best", "name")


def log_to_wandb(folder: Path, metric: str, title: str, save_dir: Path | None = None, project: str = "cvdd") -> str:
    """One W&B run (job type ``report``) with every result as a row, the mean ± std per group and the plot;
    online with a login, else offline (``wandb sync`` uploads it). Returns the run's folder."""
    import tempfile

    import wandb

    from cvdd.runtime.loggers import wandb_mode

    records = load_results(folder)
    groups = summarise(records, metric)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project, job_type="report", group="report", name=title or None, mode=wandb_mode(), dir=save_dir
    )
    rows = [[r.get(c) for c in RESULT_COLUMNS] for r in records]
    run.log(
        {
            "results": wandb.Table(columns=list(RESULT_COLUMNS), data=rows),
            "summary": wandb.Table(
                columns=["dataset", "student", "labels", "method", "ipc", "mean", "std", "n", "metric"],
                data=[
                    [g.dataset, g.student, g.labels, g.row, g.ipc, g.mean, g.std, len(g.top1), metric] for g in groups
                ],
            ),
        }
    )
    if groups:
        with tempfile.TemporaryDirectory() as tmp:
            run.log({"top1_vs_ipc": wandb.Image(str(plot(groups, Path(tmp) / "summary.png", title)))})
    run.finish()
    return run.dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvdd.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder holding validate results (*.json), searched recursively")
    parser.add_argument("--out", type=Path, default=None, help="write summary.md, ranking.csv and summary.png here")
    parser.add_argument("--title", default="", help="title of the markdown file and the plot")
    parser.add_argument(
        "--metric", choices=sorted(METRICS), default="final", help="final top-1 (default) or the best evaluation"
    )
    parser.add_argument("--wandb", action="store_true", help="also log the tables and the plot as one W&B run")
    parser.add_argument("--wandb-dir", type=Path, default=None, help="where the W&B run's files go (default ./wandb)")
    args = parser.parse_args(argv)
    print(write_report(args.folder, args.out, args.title, metric=args.metric), end="")
    if args.wandb:
        print(f"W&B run: {log_to_wandb(args.folder, args.metric, args.title, args.wandb_dir)}")
