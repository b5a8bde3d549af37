"""Fashion-MNIST benchmark v2: CV-DD vs SRe2L++ vs random real images under one faithful protocol, on CPU.

    python bench/fashion_mnist.py                      # the whole protocol (resumable; hours on 2 cores)
    python bench/fashion_mnist.py --seeds 0            # a slice of the grid (the other parts run in full)
    python bench/fashion_mnist.py --report             # rewrite the report from the finished cells only

Runs every stage in-process (the same job functions as the command lines, configs composed from ``conf/``
with the overrides below), in this order: squeeze the ``small`` committee until every member reaches 90 %
and a ConvNet on all the training data (the upper bound); the fp32 check of the fast numerics; the crop-scale
ablation at IPC 10, seed 0; with the better crop scale, the IPC 10 cells of seed 0, the recover iterations
curve, the one-change checks (``CHECKS``) and the 1,000-epoch students at IPC 10, seed 0; the grid (IPC 10 / 1 /
50 × seeds × methods, soft and hard labels). Every finished stage and cell is written to
``bench/results/fashion_mnist.json`` at once, so a re-run skips it (and an interrupted stage resumes: the jobs
do). ``fashion_mnist.md``, ``fashion_mnist.png`` and ``fashion_mnist_sets.png`` are rewritten as parts finish.

Label sets are stored per set name, so every label variant (epochs, crop scale, teachers, numerics) gets its
own artifacts folder under ``<work>/variants/`` that links the shared teachers, distilled sets and patch cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cvdd.artifacts import TeacherArtifact, load_json, save_json  # noqa: E402
from cvdd.artifacts.distilled import DistilledArtifact, png_files, read_pngs  # noqa: E402
from cvdd.artifacts.grid import LABEL_WIDTH, distilled_grid, save_image_atomic  # noqa: E402
from cvdd.artifacts.labels import LabelArtifact  # noqa: E402
from cvdd.committee.committee import load_committee, voting_weights  # noqa: E402
from cvdd.config.compose import compose_job  # noqa: E402
from cvdd.data import get_spec, load_dataset  # noqa: E402
from cvdd.labels.bssl import soft_label_logits  # noqa: E402
from cvdd.labels.protocol import relabel_committee, teacher_weights  # noqa: E402
from cvdd.report import Group, markdown_table, plot  # noqa: E402
from cvdd.report.ranking import rankings  # noqa: E402
from cvdd.stages.distill import distill  # noqa: E402
from cvdd.stages.relabel import relabel  # noqa: E402
from cvdd.stages.squeeze import squeeze_teacher  # noqa: E402
from cvdd.stages.validate import validate  # noqa: E402
from cvdd.training.metrics import set_diversity  # noqa: E402

DATASET = "fashion_mnist"
COMMITTEE = ["resnet18_small", "resnet50_small", "shufflenetv2_small", "mobilenetv2_small", "densenet_small"]

# --- Protocol v2: identical for every method -------------------------------------------------------------
# Teachers: epochs tried per member in turn until it reaches TEACHER_TARGET test top-1 (Adam 2e-3, batch 128,
# cosine over the run; conf/dataset/fashion_mnist.yaml). A longer try retrains from scratch (its cosine differs).
SQUEEZE_EPOCHS = {
    "resnet18_small": (10, 20),
    "resnet50_small": (10, 20),
    "shufflenetv2_small": (15, 30),
    "mobilenetv2_small": (12, 24),
    "densenet_small": (10, 20),
}
TEACHER_TARGET = 90.0  # % test top-1 of every member
POOL_TARGET = 92.0  # % test top-1 of the prior-weighted pool (relabel's weights)
FULL_DATA_EPOCHS = 20  # the upper bound: the student architecture on all 60k images, hard labels, squeeze recipe
ITERATIONS = 1000  # recover iterations per image (patches init, medium band; Adam 0.25, r_bn 0.01)
CURVE_ITERATIONS = (80, 300)  # the iterations curve at IPC 10, seed 0 (1,000 is the grid's cell)
STUDENT = "convnet"  # ConvNet-3, width 128, BatchNorm
EPOCHS = 300  # student epochs at every IPC (= epochs of label plans); LONG_EPOCHS is the later papers' choice
LONG_EPOCHS = 1000
PICTURES, PICTURE_COLUMNS = "fashion_mnist_sets.png", 5  # the sets side by side: 5 images per class each
# Lower bound of the random-resized-crop scale (recover, relabel, student): the paper's, and for 28-px images
# crops of at least half the image (v1's one-change check at IPC 10: +1.4 points for CV-DD, +5.7 for real images).
PAPER_CROP, ALT_CROP = 0.08, 0.5
IPCS, SEEDS = (1, 10, 50), (0, 1, 2)

# Per method: overrides naming the image set (every stage) and its labelling teachers (relabel, evaluate).
METHODS: dict[str, tuple[list[str], str]] = {
    "random_real": (["method=random_real", "committee=small"], "committee"),  # real images, the pool's labels
    "sre2l": (["committee=sre2l_small"], "resnet18_small"),  # SRe2L++: one model recovers and relabels
    "rded": (["method=rded", "committee=small"], "committee"),  # RDED: the pool's most realistic crops, 2 × 2
    "cvdd": (["committee=small", "committee.k=2", "committee.schedule=auto"], "committee"),  # CV-DD, k = 2
}
ORDER = ["random_real", "sre2l", "rded", "cvdd"]

# --- v3: CV-DD with priors measured as the paper measures them (committee.priors=measured) -------------------
# Every member distills IPC 10 alone (seed 0, v2's recover recipe at 1,000 iterations), relabels it, and a v2
# student is trained on it: its final top-1 is the member's prior. v3 cells at 1,000 iterations isolate the
# priors; at the released 4,000 they add the recipe's length.
RELEASED_ITERATIONS = 4000
V3 = "cvdd_measured"
METHODS[V3] = (
    ["committee=small", "committee.k=2", "committee.schedule=auto", "committee.priors=measured"],
    "committee",
)
REAL_V3 = "random_real_measured"  # random real images labelled by the pool at the measured priors' weights (IOR)
METHODS[REAL_V3] = (["method=random_real", "committee=small", "committee.priors=measured"], "committee")
PRIORS_RECORD = Path("artifacts") / DATASET / "priors" / "small_ipc10_s0.json"


def measure_overrides(crop: float) -> list[str]:
    """The priors' measurement under protocol v2: seed 0, IPC 10, 1,000 iterations, v2's labels and student."""
    stages = [f"relabel.crop_scale=[{crop},1.0]", "relabel.halves=true", f"student={STUDENT}"]
    listed = ",".join(f'"{o}"' for o in stages)
    return [
        "committee.priors_measure.ipc=10",
        "committee.priors_measure.seed=0",
        f"committee.priors_measure.iterations={ITERATIONS}",
        f"committee.priors_measure.epochs={EPOCHS}",
        f"committee.priors_measure.overrides=[{listed}]",
    ]


@dataclass(frozen=True)
class Check:
    """One change to protocol v2 at IPC 10, seed 0, for every method it concerns: does it move one method more
    than the others? ``image_set`` changes a method's set (its set, labels and student are redone); ``student``
    changes only the student of every method (the sets and labels are the grid's)."""

    question: str
    image_set: dict[str, list[str]] = field(default_factory=dict)
    student: tuple[str, ...] = ()
    curve: bool = False  # also the recover iterations curve of the changed sets

    def methods(self) -> list[str]:
        return ORDER if self.student else [m for m in ORDER if m in self.image_set]


CHECKS: dict[str, Check] = {
    # random_real is already whole real images: the reference row, unchanged
    "init_real": Check(
        "whole real images as the starting point: recover from the random-real set of the same seed "
        "(`method.recover.init.mode=real`), RDED with one crop per image (`method.factor=1`)",
        image_set={
            "sre2l": ["method.recover.init.mode=real"],
            "cvdd": ["method.recover.init.mode=real"],
            "rded": ["method.factor=1"],
        },
        curve=True,
    ),
    "tau4": Check("student KL temperature τ = 4 instead of 20", student=("validate.temperature=4",)),
    # the two knobs of recovery's drift away from real images: the BN prior's weight and the step size
    "rbn0.1": Check(
        "BN-statistics weight r_bn = 0.1 instead of 0.01",
        image_set={m: ["method.recover.r_bn=0.1"] for m in ("sre2l", "cvdd")},
    ),
    "lr0.05": Check(
        "recover learning rate 0.05 instead of 0.25",
        image_set={m: ["method.recover.lr=0.05"] for m in ("sre2l", "cvdd")},
    ),
}

# Hard-label results with a ConvNet student (reference.md); none of them uses soft labels.
CLASSIC = {
    "DC (published)": {1: 70.5, 10: 82.3, 50: 83.6},
    "DSA (published)": {1: 70.6, 10: 84.6, 50: 88.7},
    "IDC (published)": {1: 81.0, 10: 86.0, 50: 86.2},
    "IDC-I (published)": {1: 70.7, 10: 85.3, 50: 89.1},
}


@dataclass(frozen=True)
class Cell:
    """One student: a method's image set (IPC, seed, recover iterations, crop scale, numerics) and its labels."""

    method: str
    ipc: int
    seed: int
    crop: float
    labels: str = "soft"  # soft (offline soft labels) | hard
    epochs: int = EPOCHS
    iterations: int = ITERATIONS
    teachers: str | None = None  # another labelling teacher than the method's own (random_real for IOR)
    precision: str = "auto"
    check: str | None = None  # a one-change check (CHECKS) instead of protocol v2 as it stands
    rerun: bool = False  # v2's cell made again from its recipe in this environment (its set name, own stage records)

    @property
    def set_change(self) -> list[str]:
        """The check's overrides of this method's image set (none: the set is the grid's)."""
        return CHECKS[self.check].image_set.get(self.method, []) if self.check else []

    @property
    def optimised(self) -> bool:
        """Recover optimises the images (its iterations and crop scale make the set)."""
        return self.method in ("sre2l", "cvdd", V3)

    @property
    def set_name(self) -> str:
        changed = f"_{self.check}" if self.set_change else ""
        if not self.optimised:
            return f"{self.method}_ipc{self.ipc}{changed}_s{self.seed}"
        suffix = "" if self.precision == "auto" else f"_fp{self.precision}"
        return f"{self.method}_ipc{self.ipc}_it{self.iterations}_crop{self.crop}{suffix}{changed}_s{self.seed}"

    @property
    def label_teachers(self) -> str:
        return self.teachers or METHODS[self.method][1]

    @property
    def variant(self) -> str:
        """The artifacts folder of this cell's labels and results."""
        return f"e{self.epochs}_crop{self.crop}_{self.label_teachers}_{self.precision}"

    @property
    def key(self) -> str:
        parts = [self.method, f"ipc{self.ipc}", f"s{self.seed}", f"crop{self.crop}", self.labels, f"e{self.epochs}"]
        if self.optimised:
            parts.append(f"it{self.iterations}")
        if self.teachers:
            parts.append(f"t-{self.teachers}")
        if self.precision != "auto":
            parts.append(f"fp{self.precision}")
        if self.check:
            parts.append(f"x-{self.check}")
        if self.rerun:
            parts.append("rerun")
        return "/".join(parts)


def pool_accuracy(cfg) -> dict[str, Any]:
    """Test top-1 of ``argmax Σ_t w_t · logits_t`` over the relabelling teachers in relabel's numerics with
    their running BN statistics: the combination relabel stores, on the test images."""
    data = load_dataset(cfg.dataset)
    weights = teacher_weights(cfg, Path(cfg.paths.artifacts))
    committee = relabel_committee(cfg, Path(cfg.paths.artifacts), data.classes, weights)
    test = DataLoader(data.view("test"), batch_size=500)
    correct = 0
    with torch.no_grad():
        for images, labels in test:
            logits = soft_label_logits(committee.members, weights, images, bssl=False, numerics=committee.numerics)
            correct += int((logits.argmax(1) == labels).sum())
    return {"test_top1": 100.0 * correct / len(test.dataset), "weights": weights}


class Bench:
    """Teachers, stages and cells kept in one JSON file, rewritten after each."""

    def __init__(self, work: Path, out: Path):
        self.work, self.out = work, out
        self.path = out / "fashion_mnist.json"
        self.state: dict[str, Any] = load_json(self.path) if self.path.is_file() else {}
        for key in ("teachers", "stages", "cells"):
            self.state.setdefault(key, {})
        self.state.setdefault("sessions", [])
        self.commit = git_commit()

    def save(self) -> None:
        save_json(self.path, self.state)

    # --- running jobs ---------------------------------------------------------------------------------------
    def job(self, config_name: str, run: Callable, overrides: list[str], folder: str) -> tuple[dict, float, float]:
        """The job's result, wall seconds and CPU seconds (all threads; unlike wall time, not inflated when the
        run is paused or shares the machine)."""
        base = [f"dataset={DATASET}", f"paths.root={self.work}", "logger=none", "hardware=cpu"]
        cfg = compose_job(config_name, [*base, *overrides], self.work / "logs" / config_name / folder)
        started, cpu = time.perf_counter(), time.process_time()
        result = run(cfg)
        return result, round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)

    def stage(self, key: str, config_name: str, run: Callable, overrides: list[str]) -> dict:
        """Run a stage once: its record (result fields and seconds) is kept under ``stages[key]``."""
        if key not in self.state["stages"]:
            result, seconds, cpu = self.job(config_name, run, overrides, key.replace("/", "_"))
            self.state["stages"][key] = {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "commit": self.commit,
                **stage_record(config_name, result),
            }
            self.save()
            print(f"[bench] {key}: {seconds:.0f}s", flush=True)
        return self.state["stages"][key]

    def variant_artifacts(self, variant: str) -> Path:
        """``<work>/variants/<variant>/artifacts``: own labels and results, the shared teachers, sets, patches."""
        shared = self.work / "artifacts" / DATASET
        folder = self.work / "variants" / variant / "artifacts"
        (folder / DATASET).mkdir(parents=True, exist_ok=True)
        for name in ("teachers", "distilled", "patches", "priors"):
            (shared / name).mkdir(parents=True, exist_ok=True)
            link = folder / DATASET / name
            if not link.is_symlink():
                link.symlink_to(shared / name, target_is_directory=True)
        return folder

    def pictures(self, crop: float) -> None:
        """The IPC-10, seed-0 set of every method side by side (``fashion_mnist_sets.png``); the state keeps which
        sets are pictured, so the report can be rewritten without them."""
        folders = {m: self.work / "artifacts" / DATASET / "distilled" / Cell(m, 10, 0, crop).set_name for m in ORDER}
        if not all((folder / "manifest.json").is_file() for folder in folders.values()):
            return
        panels = []
        for method, folder in folders.items():
            pixels, labels, ipc_index, names = set_pixels(folder, PICTURE_COLUMNS)
            grid = distilled_grid(pixels, labels, ipc_index, names)
            panels.append((method, grid if not panels else grid.crop((LABEL_WIDTH, 0, grid.width, grid.height))))
        save_image_atomic(side_by_side(panels), self.out / PICTURES)
        self.state["pictures"] = {m: folder.name for m, folder in folders.items()}
        self.save()

    # --- teachers ---------------------------------------------------------------------------------------------
    def squeeze(self) -> None:
        """Each member squeezed at its first epoch count that reaches the target (every try recorded), then the
        pool's accuracy with relabel's weights, then the full-data upper bound."""
        for member in COMMITTEE:
            tries = self.state["teachers"].setdefault(member, {"tries": []})["tries"]
            if tries and not TeacherArtifact(self.work / "artifacts", DATASET, member).exists():
                self.resqueeze(member, tries[-1])  # a fresh work folder: the recorded teacher again
            for epochs in SQUEEZE_EPOCHS[member]:
                if tries and tries[-1]["test_top1"] >= TEACHER_TARGET:
                    break
                if any(t["epochs"] == epochs for t in tries):
                    continue
                overrides = [f"model={member}", f"squeeze.epochs={epochs}", *(["overwrite=true"] if tries else [])]
                record, seconds, cpu = self.job("train", squeeze_teacher, overrides, f"{member}_e{epochs}")
                tries.append(
                    {
                        "epochs": record["epochs"],
                        "test_top1": record["test_top1"],
                        "seconds": seconds,
                        "cpu_seconds": cpu,
                        "commit": self.commit,
                    }
                )
                self.save()
                print(f"[bench] teacher {member}, {epochs} epochs: {record['test_top1']:.2f}% in {seconds:.0f}s")
            self.state["teachers"][member].update(tries[-1])
            self.save()
        if "pool" not in self.state:
            cfg = compose_job(
                "relabel",
                [f"dataset={DATASET}", f"paths.root={self.work}", "logger=none", "relabel.teachers=committee"],
                self.work / "logs" / "pool",
            )
            self.state["pool"] = pool_accuracy(cfg)
            self.save()
            print(f"[bench] pool: {self.state['pool']}", flush=True)
        self.stage("full_data", "train", squeeze_teacher, [f"model={STUDENT}", f"squeeze.epochs={FULL_DATA_EPOCHS}"])

    def resqueeze(self, member: str, used: dict) -> None:
        """Squeeze ``member`` again at the recorded epochs (same recipe and seed); its top-1 is recorded beside the
        first run's, so the report says whether the teachers of later cells are the same."""
        overrides = [f"model={member}", f"squeeze.epochs={used['epochs']}"]
        record, seconds, cpu = self.job("train", squeeze_teacher, overrides, f"{member}_again")
        again = {"test_top1": record["test_top1"], "seconds": seconds, "cpu_seconds": cpu, "commit": self.commit}
        self.state["teachers"][member].setdefault("again", []).append(again)
        self.save()
        print(f"[bench] teacher {member} squeezed again: {record['test_top1']:.2f}% (first {used['test_top1']:.2f}%)")

    # --- cells ----------------------------------------------------------------------------------------------
    def cell(self, cell: Cell) -> dict:
        """Distill, relabel (soft labels) and evaluate one student; skipped when finished."""
        if cell.key in self.state["cells"]:
            return self.state["cells"][cell.key]
        common, made = set_overrides(cell)
        again = "/rerun" if cell.rerun else ""  # a rerun's set has v2's name: its stages are recorded apart
        artifacts = self.variant_artifacts(cell.variant)
        distill_key, relabel_key = f"distill/{cell.set_name}{again}", f"relabel/{cell.variant}/{cell.set_name}{again}"
        self.forget_lost_stages(
            {
                distill_key: DistilledArtifact(artifacts, DATASET, cell.set_name).manifest,
                relabel_key: LabelArtifact(artifacts, DATASET, cell.set_name).folder,
            }
        )
        self.stage(distill_key, "distill", distill, made)
        crop = f"[{cell.crop},1.0]"
        labelled = [
            *common,
            f"paths.artifacts={artifacts}",
            f"relabel.teachers={cell.label_teachers}",
            f"relabel.epochs={cell.epochs}",
            f"relabel.crop_scale={crop}",
            "relabel.halves=true",
        ]
        if cell.labels == "soft":
            self.stage(relabel_key, "relabel", relabel, labelled)
        method = cell.method if not cell.teachers else f"{cell.method}_by_{cell.teachers}"
        student = [
            *labelled,
            f"student={STUDENT}",
            f"method_label={method}",
            f"labels={'offline' if cell.labels == 'soft' else 'hard'}",
            *(CHECKS[cell.check].student if cell.check else ()),
        ]
        record = self.stage(f"evaluate/{cell.key}", "evaluate", validate, student)
        self.state["cells"][cell.key] = {**asdict(cell), **record}
        self.save()
        print(f"[bench] {cell.key}: top-1 {record['test_top1']:.2f}% (best {record['test_top1_best']:.2f}%)")
        return self.state["cells"][cell.key]

    def forget_lost_stages(self, outputs: dict[str, Path]) -> None:
        """Recorded stages (key → the output they wrote) whose output is not in the work folder (a fresh folder: they
        ran in another) run again: their records would skip work whose output is gone. The old records are kept
        under ``lost_stages``."""
        lost = [key for key, output in outputs.items() if key in self.state["stages"] and not output.exists()]
        for key in lost:
            self.state.setdefault("lost_stages", {})[key] = self.state["stages"].pop(key)
            print(f"[bench] {key}: recorded, but {outputs[key]} is gone: running it again", flush=True)
        if lost:
            self.save()

    def crop_ablation(self) -> float:
        """Both crop scales for every method at IPC 10, seed 0; the grid takes the better mean final top-1 over
        the methods of the first run (a method added later gets its ablation cells, not a new choice)."""
        for crop in (PAPER_CROP, ALT_CROP):
            for method in ORDER:
                self.cell(Cell(method, 10, 0, crop))
        if "crop" in self.state:
            return self.state["crop"]["chosen"]
        means = {
            crop: statistics.fmean(self.state["cells"][Cell(m, 10, 0, crop).key]["test_top1"] for m in ORDER)
            for crop in (PAPER_CROP, ALT_CROP)
        }
        chosen = max(means, key=means.get)
        self.state["crop"] = {"chosen": chosen, "mean_over_methods": {str(k): v for k, v in means.items()}}
        self.save()
        return chosen

    def checks(self, crop: float) -> None:
        """Every one-change check for the methods it concerns, at IPC 10, seed 0 (soft labels)."""
        for name, check in CHECKS.items():
            for method in check.methods():
                self.cell(Cell(method, 10, 0, crop, check=name))
            if check.curve:
                self.curve(crop, name)

    def curve(self, crop: float, check: str | None = None) -> None:
        """The recover iterations curve at IPC 10, seed 0 (the grid's cell is its last point)."""
        for iterations in CURVE_ITERATIONS:
            for method in ("sre2l", "cvdd"):
                self.cell(Cell(method, 10, 0, crop, iterations=iterations, check=check))

    def v3(self, crop: float, seeds) -> None:
        """CV-DD with measured priors at IPC 10 (1,000 and 4,000 iterations; soft and hard labels)."""
        for seed in seeds:
            for iterations in (ITERATIONS, RELEASED_ITERATIONS):
                self.cell(Cell(V3, 10, seed, crop, iterations=iterations))
            self.cell(Cell(REAL_V3, 10, seed, crop))
        for seed in seeds:
            for iterations in (ITERATIONS, RELEASED_ITERATIONS):
                self.cell(Cell(V3, 10, seed, crop, labels="hard", iterations=iterations))

    def v3_better(self) -> list[int]:
        """The iteration counts whose v3 mean beats v2's CV-DD at IPC 10: those go on to IPC 1 and 50.

        Beating either v2's record (issue 24's rule as written) or v2's recipe made again in v3's environment (the
        like-for-like comparison) is enough: the two disagree by less than a seed's spread, and running a setting
        one of them favours costs compute only, while skipping it would leave a reading untested."""
        v2 = [
            stat[0]
            for stat in (v2_cvdd_made_again(self.state, 10), mean_of(grid_cells(self.state, labels="soft"), "cvdd", 10))
            if stat
        ]
        if not v2:
            return []
        return [
            i
            for i in (ITERATIONS, RELEASED_ITERATIONS)
            if (v3 := mean_of(v3_cells(self.state, i), V3, 10)) and v3[0] > min(v2)
        ]

    def v3_at(self, crop: float, ipc: int, seeds, iterations: list[int]) -> None:
        """v3 at another IPC, every seed, for each of ``iterations``: its set (soft and hard labels) and random real
        images under the measured priors' labels (its IOR)."""
        for it in iterations:
            for seed in seeds:
                self.cell(Cell(V3, ipc, seed, crop, iterations=it))
                self.cell(Cell(REAL_V3, ipc, seed, crop))
                self.cell(Cell(V3, ipc, seed, crop, labels="hard", iterations=it))

    def rerun_v2(self, crop: float, ipcs, methods, seeds) -> None:
        """v2's soft-label cells made again from their recipes in this environment (code, library versions): set,
        labels, student. v2 ran under other versions, and a rerun of one recipe there moved a seed's top-1 by
        1.5 points, so v3 is compared with these; their sets also carry the report's diversity."""
        for ipc in ipcs:
            for seed in seeds:
                for method in methods:
                    self.cell(Cell(method, ipc, seed, crop, rerun=True))

    def diversity(self) -> None:
        """Within-class diversity of every finished set in the work folder, in pixels and in the pool's penultimate
        features (:func:`cvdd.training.metrics.set_diversity`); kept per set name and fingerprint."""
        cache = self.state.setdefault("diversity", {})
        spec = get_spec(DATASET)
        nets = None
        for path in sorted((self.work / "artifacts" / DATASET / "distilled").glob("*/manifest.json")):
            folder, manifest = path.parent, load_json(path)
            if (
                folder.name.startswith("priors_")
                or cache.get(folder.name, {}).get("fingerprint") == manifest["fingerprint"]
            ):
                continue
            if nets is None:
                root = self.work / "artifacts"
                nets = load_committee(root, DATASET, COMMITTEE, manifest["classes"], None, 1.0).members
            names, labels, _ = png_files(manifest["files"])
            if labels.unique().numel() == len(names):
                continue  # one image per class (IPC 1): no within-class distance
            pixels = read_pngs(folder, names, manifest["files"], f"delete {folder} and run the benchmark again")
            found = set_diversity(pixels, labels, nets, spec.mean, spec.std)
            cache[folder.name] = {**found, "fingerprint": manifest["fingerprint"]}
            self.save()

    def grid(self, crop: float, ipcs, seeds) -> None:
        """Soft-label students of every method, random_real under SRe2L++'s one teacher (its IOR), and hard-label
        students of every method (HLR)."""
        for seed in seeds:
            for ipc in ipcs:
                for method in ORDER:
                    self.cell(Cell(method, ipc, seed, crop))
                self.cell(Cell("random_real", ipc, seed, crop, teachers=METHODS["sre2l"][1]))
                for method in ORDER:
                    self.cell(Cell(method, ipc, seed, crop, labels="hard"))


def set_overrides(cell: Cell) -> tuple[list[str], list[str]]:
    """The overrides naming ``cell``'s image set (every stage), and those that make it (distill)."""
    image_set, _ = METHODS[cell.method]
    if cell.method in (V3, REAL_V3):
        image_set = [*image_set, *measure_overrides(cell.crop)]
    common = [*image_set, f"ipc={cell.ipc}", f"seed={cell.seed}", f"hardware.precision={cell.precision}"]
    common.append(f"set={cell.set_name}")
    crop = f"[{cell.crop},1.0]"
    recover = (
        [f"method.recover.iterations={cell.iterations}", f"method.recover.crop_scale={crop}"] if cell.optimised else []
    )
    return common, [*common, *recover, *cell.set_change]


def set_pixels(folder: Path, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The first ``columns`` images of every class of a finished set, as its student reads them: the exported
    PNGs (uint8, N × C × H × W), with their labels, IPC indices and the class names."""
    manifest = load_json(folder / "manifest.json")
    names = manifest["class_names"]
    files, labels, ipc_index = png_files(manifest.get("files", {}))
    keep = ipc_index < columns
    chosen = [name for name, kept in zip(files, keep.tolist(), strict=True) if kept]
    rebuild = f"delete {folder} and its distill/ stage in fashion_mnist.json, then run python bench/fashion_mnist.py"
    return read_pngs(folder, chosen, manifest.get("files", {}), rebuild), labels[keep], ipc_index[keep], names


def side_by_side(panels: list[tuple[str, Image.Image]], title_height: int = 18, gap: int = 12) -> Image.Image:
    """Grid images in a row with their titles above."""
    width = sum(image.width for _, image in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, title_height + max(image.height for _, image in panels)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for i, (title, image) in enumerate(panels):
        canvas.paste(image, (x, title_height))
        draw.text((x + (LABEL_WIDTH if i == 0 else 0) + 4, 3), title, fill="black")
        x += image.width + gap
    return canvas


def stage_record(config_name: str, result: dict) -> dict:
    """What the report keeps of a job's result."""
    if config_name == "evaluate":
        keys = ("test_top1", "test_top1_best", "test_top1_best_epoch", "test_top5", "label_bytes")
        return {k: result.get(k) for k in keys}
    if config_name == "train":
        return {"test_top1": result["test_top1"], "epochs": result["epochs"]}
    if config_name == "relabel":
        return {k: result.get(k) for k in ("bytes_per_image_per_epoch", "payload_bytes_per_image_per_epoch")}
    return {}


# --- the report ------------------------------------------------------------------------------------------------
def groups_of(cells: list[dict], labels: str, metric: str = "final") -> list[Group]:
    """Mean ± std over seeds per (method, IPC) of ``cells``: their final or best top-1."""
    field = "test_top1" if metric == "final" else "test_top1_best"
    by: dict[tuple[str, int], dict[int, float]] = {}
    for c in cells:
        by.setdefault((c["method"], c["ipc"]), {})[c["seed"]] = c[field]
    return [
        Group(DATASET, STUDENT, labels, m, ipc, tuple(v[s] for s in sorted(v)), tuple(sorted(v)), metric, (50,))
        for (m, ipc), v in sorted(by.items())
    ]


def select(cells: dict, **match) -> list[dict]:
    return [c for c in cells.values() if all(c.get(k) == v for k, v in match.items())]


def grid_cells(state: dict, teachers: str | None = None, rerun: bool = False, **match) -> list[dict]:
    """The grid's cells (chosen crop, 300 epochs, 1,000 iterations, fast numerics, no check): under their own
    labelling teachers, or under ``teachers`` (random real images labelled as SRe2L++'s are, for its IOR); v2's as
    recorded, or with ``rerun`` those made again in v3's environment (:meth:`Bench.rerun_v2`)."""
    crop = state.get("crop", {}).get("chosen", PAPER_CROP)
    cells = select(
        state["cells"],
        crop=crop,
        epochs=EPOCHS,
        iterations=ITERATIONS,
        precision="auto",
        teachers=teachers,
        check=None,
        **match,
    )
    # v2's methods (v3's are reported on their own); records from before reruns existed have no "rerun" field
    return [c for c in cells if c["method"] in ORDER and bool(c.get("rerun")) == rerun]


def v2_cvdd_made_again(state: dict, ipc: int) -> tuple[float, float, int] | None:
    """v2's CV-DD at ``ipc`` made again in v3's environment, over the seeds v3 ran there; ``None`` until each of
    those seeds has its rerun."""
    v3_seeds = {c["seed"] for c in v3_cells(state) if c["method"] == V3 and c["ipc"] == ipc}
    rerun = [c for c in grid_cells(state, labels="soft", rerun=True) if c["method"] == "cvdd" and c["ipc"] == ipc]
    if v3_seeds and v3_seeds <= {c["seed"] for c in rerun}:
        return mean_of([c for c in rerun if c["seed"] in v3_seeds], "cvdd", ipc)
    return None


def mean_of(cells: list[dict], method: str, ipc: int, field: str = "test_top1") -> tuple[float, float, int] | None:
    values = [c[field] for c in cells if c["method"] == method and c["ipc"] == ipc]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def fmt(stat: tuple[float, float, int] | None) -> str:
    return "–" if stat is None else f"{stat[0]:.2f} ± {stat[1]:.2f} (n={stat[2]})"


def result_record(cell: dict) -> dict:
    """A grid cell as the validate result it came from, as far as the report's DD-Ranking metrics read it."""
    return {
        "dataset": DATASET,
        "student": STUDENT,
        "labels": "offline" if cell["labels"] == "soft" else "hard",
        "method": cell["method"],
        "ipc": cell["ipc"],
        "seed": cell["seed"],
        "test_top1": cell["test_top1"],
        "config": {"relabel": {"teachers": cell.get("teachers") or METHODS[cell["method"]][1]}},
    }


def ranking_rows(state: dict) -> list[list[str]]:
    """DD-Ranking's HLR and IOR of the grid's sets, computed by the report (:mod:`cvdd.report.ranking`): each set
    against random real images labelled by its own labelling teachers (SRe2L++'s: its one model)."""
    full = state["stages"].get("full_data", {}).get("test_top1")
    hard = grid_cells(state, labels="hard")
    cells = [*grid_cells(state, labels="soft"), *hard, *grid_cells(state, teachers=METHODS["sre2l"][1], labels="soft")]
    own = {
        (r.method, r.ipc): r
        for r in rankings([result_record(c) for c in cells], {(DATASET, STUDENT): full})
        if r.labels == "offline" and r.teachers == METHODS[r.method][1]
    }
    rows = []
    for method in ORDER:
        for ipc in IPCS:
            h, r = mean_of(hard, method, ipc), own.get((method, ipc))
            hlr = "–" if r is None or r.hard_label_recovery is None else f"{r.hard_label_recovery:.2f}"
            if method == "random_real":
                ior = "0 (the reference)"
            else:
                ior = "–" if r is None or r.improvement_over_random is None else f"{r.improvement_over_random:+.2f}"
            if h or r:
                rows.append([method, str(ipc), fmt(h), hlr, ior])
    return rows


def per_seed_lines(state: dict) -> list[str]:
    """Every seed's final top-1 (soft labels) and CV-DD's lead over random real images seed by seed: a mean
    within one std can hide a lead in some seeds and a loss in others."""
    soft = grid_cells(state, labels="soft")
    seeds = sorted({c["seed"] for c in soft})
    top1 = {(c["method"], c["ipc"], c["seed"]): c["test_top1"] for c in soft}

    def row(ipc: int, name: str, values: list[float | None], signed: bool = False) -> list[str] | None:
        if all(v is None for v in values):
            return None
        return [str(ipc), name, *("–" if v is None else f"{v:+.2f}" if signed else f"{v:.2f}" for v in values)]

    rows = []
    for ipc in IPCS:
        for method in ORDER:
            rows.append(row(ipc, method, [top1.get((method, ipc, s)) for s in seeds]))
        pairs = [(top1.get(("cvdd", ipc, s)), top1.get(("random_real", ipc, s))) for s in seeds]
        rows.append(
            row(
                ipc,
                "cvdd − random_real",
                [a - b if a is not None and b is not None else None for a, b in pairs],
                signed=True,
            )
        )
    return table(["IPC", "method", *[f"seed {s}" for s in seeds]], [r for r in rows if r])


def targets(state: dict) -> list[str]:
    """The issue's targets, each with how far it is from being met."""
    soft = grid_cells(state, labels="soft")
    lines = []
    for ipc in IPCS:
        cvdd, real, sre2l = (mean_of(soft, m, ipc) for m in ("cvdd", "random_real", "sre2l"))
        if cvdd is None:
            continue
        if real:
            margin = max(cvdd[1], real[1])
            gap = cvdd[0] - real[0]
            status = "met" if gap > margin else "MISSED"
            lines.append(
                f"* IPC {ipc}: CV-DD {cvdd[0]:.2f} vs random_real {real[0]:.2f}: {gap:+.2f} points, needs more than "
                f"the larger std {margin:.2f}: {status}"
            )
        if sre2l:
            gap = cvdd[0] - sre2l[0]
            lines.append(f"* IPC {ipc}: CV-DD vs SRe2L++ {sre2l[0]:.2f}: {gap:+.2f}: {'met' if gap > 0 else 'MISSED'}")
        best = max(row[ipc] for row in CLASSIC.values())
        gap = cvdd[0] - best
        lines.append(
            f"* IPC {ipc} moonshot: CV-DD vs best hard-label {best}: {gap:+.2f}: {'met' if gap > 0 else 'not met'}"
        )
    return lines


def write_report(bench: Bench) -> None:
    state, out = bench.state, bench.out
    teachers = table(
        ["teacher", "epochs tried → top-1 (%)", "used: epochs", "test top-1 (%)", "squeeze s"],
        [
            [
                m,
                ", ".join(f"{t['epochs']} → {t['test_top1']:.2f}" for t in rec.get("tries", [])),
                str(rec.get("epochs", "–")),
                f"{rec['test_top1']:.2f}" if "test_top1" in rec else "–",
                f"{rec['seconds']:.0f}" if "seconds" in rec else "–",
            ]
            for m, rec in state["teachers"].items()
        ],
    )
    pool = state.get("pool", {}).get("test_top1")
    full = state["stages"].get("full_data", {}).get("test_top1")
    crop = state.get("crop", {}).get("chosen", PAPER_CROP)
    ablation = table(
        ["method", *[f"crop ({c}, 1): final / best" for c in (PAPER_CROP, ALT_CROP)]],
        [[m, *[final_best(state["cells"].get(Cell(m, 10, 0, c).key)) for c in (PAPER_CROP, ALT_CROP)]] for m in ORDER],
    )
    soft, hard = grid_cells(state, labels="soft"), grid_cells(state, labels="hard")
    reference = dict(CLASSIC)
    if full is not None:
        reference = {f"ConvNet on all 60k images, hard labels ({FULL_DATA_EPOCHS} epochs)": dict.fromkeys(IPCS, full)}
        reference.update(CLASSIC)
    hard_real = {
        "random_real, hard labels (mean over seeds)": {
            g.ipc: g.mean for g in groups_of(hard, "hard") if g.method == "random_real"
        }
    }
    main_groups = groups_of(soft, "soft")
    curved = [None, *[name for name, check in CHECKS.items() if check.curve]]
    curve = table(
        ["method", *[f"{i} iterations" for i in (*CURVE_ITERATIONS, ITERATIONS)]],
        [
            [
                m if check is None else f"{m}, check `{check}`",
                *[
                    final_best(state["cells"].get(Cell(m, 10, 0, crop, iterations=i, check=check).key))
                    for i in (*CURVE_ITERATIONS, ITERATIONS)
                ],
            ]
            for check in curved
            for m in ("sre2l", "cvdd")
        ],
    )
    long_rows = table(
        ["method", f"{EPOCHS} epochs: final / best", f"{LONG_EPOCHS} epochs: final / best"],
        [
            [
                m,
                final_best(state["cells"].get(Cell(m, 10, 0, crop).key)),
                final_best(state["cells"].get(Cell(m, 10, 0, crop, epochs=LONG_EPOCHS).key)),
            ]
            for m in ORDER
        ],
    )
    sessions = "; ".join(
        f"{s['started']} ({s['seconds'] / 60:.1f} min, commit {s.get('commit', '?')[:8]})" for s in state["sessions"]
    )
    text = "\n".join(
        [
            "# Fashion-MNIST v2: CV-DD vs SRe2L++ vs random real images (CPU)",
            "",
            "Written by `python bench/fashion_mnist.py` (raw cells and stage times: `fashion_mnist.json`). The v1",
            "protocol's table (1-epoch teachers, 80 iterations, 100/40 student epochs) is kept in `bench/README.md`.",
            "",
            "## Protocol v2 (identical for every method)",
            "",
            f"* Teachers: the `small` committee ({', '.join(COMMITTEE)}), squeezed on the 60k training images",
            f"  (Adam 2e-3, batch 128, cosine, the squeeze augmentation) until each reaches ≥ {TEACHER_TARGET:.0f} %",
            "  test top-1 (epochs per member below); the prior-weighted pool (weights softmax(top-1 / 10),",
            f"  relabel's combination) targets ≥ {POOL_TARGET:.0f} %. Squeezed once, reused by every cell.",
            f"* Recover: {ITERATIONS} iterations, patches initialisation (medium band), Adam lr 0.25 (betas 0.5, 0.9,",
            "  cosine), r_bn 0.01, first-BN multiplier 10, class block 10, jitter 4. `sre2l` = SRe2L++: one model",
            "  (resnet18_small); `cvdd` = k = 2 members per unit, prior weights (T = 5), schedule `auto`.",
            f"* Relabel: BSSL with the paper's halves (BN statistics over 8 of the 16 images), {EPOCHS} epochs of",
            "  plans (batch 16, CutMix), fp16 logits. `cvdd` and `random_real` are labelled by the five-member pool;",
            "  `sre2l` by its one model.",
            f"* Student: `{STUDENT}` (ConvNet-3, width 128) from scratch, KL at τ = 20, AdamW 1e-3 (wd 0.01), cosine,",
            f"  {EPOCHS} epochs at every IPC, tested every 50 epochs: **final** (after the last epoch) and **best**",
            "  (of those tests; optimistic, it selects on the test set) top-1 on the 10,000 test images. A",
            f"  {LONG_EPOCHS}-epoch row at IPC 10 (the later papers' length) is separate.",
            "* Crop scale (random-resized crop in recover, relabel and the student): the paper's",
            f"  ({PAPER_CROP}, 1) and ({ALT_CROP}, 1) for 28-px images (8 % of a 28-px image is an 8 × 8-px crop),",
            f"  each for all methods at IPC 10, seed 0; the grid uses the better mean over methods: **({crop}, 1)**.",
            "* Methods: `random_real` (seeded real images, the pool's soft labels), `sre2l`, `cvdd`, and `rded` (RDED:",
            "  the pool's lowest-cross-entropy real crops, 2 × 2 per image, no optimisation; pool labels). Reference",
            f"  rows: a ConvNet on all the training data ({FULL_DATA_EPOCHS} epochs, hard labels), random real images",
            "  with hard labels, published hard-label methods.",
            "* DD-Ranking metrics (Li et al., 2025): HLR = Acc(full data, hard) − Acc(set, hard labels); IOR =",
            "  Acc(set, its soft labels) − Acc(random real, the same soft labels) (for `sre2l`: random real images",
            "  labelled by resnet18_small alone).",
            f"* Seeds {', '.join(map(str, sorted({c['seed'] for c in soft}) or SEEDS))}; mean ± sample std. "
            "Numerics: the fast default (`hardware.precision=auto`).",
            "* Code: each stage's commit is in `fashion_mnist.json` (tally under Wall time). From `11e388f` on,",
            "  recover's member passes and relabel's teacher passes run side by side (`hardware.member_threads`,",
            "  one thread each); before, in turn with 2 threads each: the same arithmetic, in another",
            "  floating-point summation order.",
            "",
            "## Teachers",
            "",
            *teachers,
            "",
            f"Pool (relabel's weights, running BN statistics): **{pool:.2f} %** test top-1." if pool else "Pool: –",
            f"ConvNet on all 60k training images, hard labels, {FULL_DATA_EPOCHS} epochs: **{full:.2f} %**."
            if full
            else "",
            "",
            "## Crop scale (IPC 10, seed 0, soft labels)",
            "",
            *ablation,
            "",
            "## Student test top-1 (%), soft labels",
            "",
            markdown_table(main_groups, ORDER, reference={**reference, **hard_real}),
            "**Best** of the tests every 50 epochs and the final one:",
            "",
            markdown_table(groups_of(soft, "soft", "best"), ORDER),
            "![top-1 vs IPC](fashion_mnist.png)",
            "",
            "Seed by seed (final top-1, soft labels):",
            "",
            *per_seed_lines(state),
            "",
            *picture_lines(state),
            "## Hard labels and DD-Ranking",
            "",
            *table(["method", "IPC", "top-1 with hard labels", "HLR", "IOR"], ranking_rows(state)),
            "",
            "## Recover iterations (IPC 10, seed 0, final / best top-1)",
            "",
            *curve,
            "",
            "## One change at a time (IPC 10, seed 0, soft labels, final / best top-1)",
            "",
            *check_lines(state),
            f"## {LONG_EPOCHS}-epoch students (IPC 10, seed 0)",
            "",
            *long_rows,
            "",
            "## Fast numerics vs fp32 (CV-DD, IPC 10, seed 0, crop (0.08, 1))",
            "",
            *numerics_lines(state),
            "",
            *v3_lines(bench.work, state),
            "## Diversity: mean distance between two images of a class",
            "",
            "In pixels (RMS difference of two images of a class, 0–1 scale) and in the pool's penultimate features",
            "(distance of L2-normalised features, 0–2, averaged over the five members), averaged over classes.",
            "Sets of the work folder the report was written from, each beside its own student: v3's sets and v2's",
            "recipes made again in v3's environment (rerun; v2's own sets are gone and were made under other",
            "versions, so their recorded top-1s are not joined with sets made now).",
            "",
            *diversity_lines(state),
            "## Targets",
            "",
            *targets(state),
            "",
            "## Wall time (summed over stages)",
            "",
            *stage_totals(state),
            "",
            f"Runs of the script: {sessions}; on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
            f"cores, torch {torch.__version__}.",
            "",
        ]
    )
    (out / "fashion_mnist.md").write_text(text)
    if main_groups:
        plot(
            main_groups,
            out / "fashion_mnist.png",
            "Fashion-MNIST v2, ConvNet student, soft labels",
            reference=reference,
        )


def v3_cells(state: dict, iterations: int | None = None, labels: str = "soft") -> list[dict]:
    """v3's cells (measured priors) at ``iterations`` (any for the real-image reference), v2's crop and epochs."""
    crop = state.get("crop", {}).get("chosen", PAPER_CROP)
    cells = select(state["cells"], crop=crop, epochs=EPOCHS, precision="auto", labels=labels, teachers=None, check=None)
    return [
        c
        for c in cells
        if c["method"] == REAL_V3 or (c["method"] == V3 and (iterations is None or c["iterations"] == iterations))
    ]


def priors_lines(work: Path, state: dict) -> list[str]:
    """The measured priors beside v2's stand-in (the teachers' test top-1) and the weights each gives."""
    path = work / PRIORS_RECORD
    if not path.is_file() or not load_json(path).get("complete"):
        return ["Priors not measured yet."]
    record = load_json(path)
    priors = record["priors"]
    accuracy = {m: state["teachers"][m]["test_top1"] for m in priors}

    def pool(scores: dict[str, float], temperature: float) -> list[float]:
        return voting_weights(list(priors), scores, "prior", temperature, ())

    def pair_spread(scores: dict[str, float]) -> str:
        larger = [max(voting_weights(pair, scores, "prior", 5.0, ())) for pair in combinations(priors, 2)]
        return f"{min(larger):.2f}–{max(larger):.2f}"

    columns = [pool(priors, 5.0), pool(accuracy, 5.0), pool(priors, 10.0), pool(accuracy, 10.0)]
    rows = [
        [m, f"{priors[m]:.2f}", f"{accuracy[m]:.2f}", *(f"{c[i]:.3f}" for c in columns)] for i, m in enumerate(priors)
    ]
    header = ["member", "measured prior (%)", "teacher top-1 (%)", "recover T=5", "(v2)", "relabel T=10", "(v2)"]
    minutes = record["seconds"] / 60
    return [
        *table(header, rows),
        "",
        f"A pair's larger voting weight at T = 5: {pair_spread(priors)} with measured priors, "
        f"{pair_spread(accuracy)} with v2's teacher accuracies (the paper's CIFAR-10 priors: up to 0.75, 68.5 "
        "against 63). "
        f"Measuring took {minutes:.1f} min (5 members × distill IPC 10 alone, relabel, student; "
        f"record `{PRIORS_RECORD}`).",
    ]


def v3_lines(work: Path, state: dict) -> list[str]:
    """v2's CV-DD (as recorded, and made again in v3's environment) against v3's (measured priors; then the
    released 4,000 iterations), random real images under both labellings, IOR with its seeds, and what each change
    bought."""
    v2, rerun = grid_cells(state, labels="soft"), grid_cells(state, labels="soft", rerun=True)
    by_ipc = []
    for ipc in IPCS:
        new = {i: mean_of(v3_cells(state, i), V3, ipc) for i in (ITERATIONS, RELEASED_ITERATIONS)}
        if not any(new.values()):
            continue
        seeds = sorted({c["seed"] for c in v3_cells(state) if c["method"] == V3 and c["ipc"] == ipc})

        def ior(iterations: int, ipc: int = ipc, seeds: list[int] = seeds) -> str:
            top1 = {(c["method"], c["seed"]): c["test_top1"] for c in v3_cells(state, iterations) if c["ipc"] == ipc}
            gaps = [top1[(V3, s)] - top1[(REAL_V3, s)] for s in seeds if (V3, s) in top1 and (REAL_V3, s) in top1]
            if not gaps:
                return "–"
            return f"{statistics.fmean(gaps):+.2f} (seeds: {', '.join(f'{g:+.2f}' for g in gaps)})"

        by_ipc.append(
            [
                str(ipc),
                fmt(mean_of(v2, "random_real", ipc)),
                fmt(mean_of(rerun, "random_real", ipc)),
                fmt(mean_of(v3_cells(state), REAL_V3, ipc)),
                fmt(mean_of(v2, "cvdd", ipc)),
                fmt(mean_of(rerun, "cvdd", ipc)),
                fmt(new[ITERATIONS]),
                fmt(new[RELEASED_ITERATIONS]),
                ior(ITERATIONS),
                ior(RELEASED_ITERATIONS),
            ]
        )
    header = [
        "IPC",
        "random_real (v2 labels)",
        "(rerun)",
        "random_real (measured-prior labels)",
        "CV-DD v2",
        "(rerun)",
        f"v3: priors, {ITERATIONS} it.",
        f"v3: priors, {RELEASED_ITERATIONS} it.",
        f"IOR v3 {ITERATIONS} it.",
        f"IOR v3 {RELEASED_ITERATIONS} it.",
    ]
    bought = []
    for ipc in IPCS:
        recorded, again = mean_of(v2, "cvdd", ipc), mean_of(rerun, "cvdd", ipc)
        first, second = (mean_of(v3_cells(state, i), V3, ipc) for i in (ITERATIONS, RELEASED_ITERATIONS))
        if recorded and again:
            bought.append(
                f"* IPC {ipc}: v2's CV-DD made again in v3's environment {again[0] - recorded[0]:+.2f} points over "
                f"v2's record (n={again[2]})"
            )
        for name, base in (("made again", again), ("as recorded", recorded)):
            if base and first:
                bought.append(f"* IPC {ipc}: measured priors {first[0] - base[0]:+.2f} points over v2's CV-DD {name}")
            if base and second:
                bought.append(
                    f"* IPC {ipc}: measured priors and 4,000 iterations together {second[0] - base[0]:+.2f} points "
                    f"over v2's CV-DD {name}"
                )
        if first and second:
            bought.append(f"* IPC {ipc}: 4,000 instead of 1,000 iterations {second[0] - first[0]:+.2f} points more")
    hard = [
        [f"{c['method']} ({c['iterations']} it.)", str(c["ipc"]), str(c["seed"]), final_best(c)]
        for c in sorted(v3_cells(state, labels="hard"), key=lambda c: (c["ipc"], c["iterations"], c["seed"]))
        if c["method"] == V3
    ]
    return [
        "## v3: CV-DD with priors measured as the paper measures them",
        "",
        "Protocol v2 unchanged except the voting priors: `committee.priors=measured` (each member distills IPC 10",
        "alone, seed 0, 1,000 iterations, relabels it and a v2 student trains on it; its final top-1 is its prior).",
        "Measured once, used at every IPC and seed, by recover's voting and by relabel's teacher weights (so v3's",
        "random real images are labelled anew for its IOR; v2's random_real column is the v2 labelling).",
        "v2's cells ran under other library versions and code; the (rerun) columns are v2's recipes made again",
        "(set, labels, student) in v3's environment, so v3 is compared with both.",
        "",
        *priors_lines(work, state),
        "",
        "Student test top-1 (%), soft labels, final, mean ± std over seeds:",
        "",
        *table(header, by_ipc),
        "",
        "What each change bought (means):",
        "",
        *(bought or ["* not run yet"]),
        "",
        "Hard-label students of v3's sets (final / best):",
        "",
        *table(["set", "IPC", "seed", "top-1"], hard),
        "",
    ]


def cell_of(record: dict) -> Cell:
    """The cell a state record belongs to; records written before a field existed take its default."""
    return Cell(**{f.name: record.get(f.name, f.default) for f in fields(Cell)})


def diversity_lines(state: dict) -> list[str]:
    """Per set on disk with a student of its own (v2's recipes made again, v3's sets): within-class diversity beside
    its soft-label top-1, and per IPC the rank correlation of each diversity with top-1 over the sets. v2's own
    sets are not on disk, and a set made again in v3's environment is not v2's, so v2's records are not joined."""
    found = state.get("diversity", {})
    cells = [c for c in [*grid_cells(state, labels="soft", rerun=True), *v3_cells(state)] if c["method"] != REAL_V3]
    rows, by_ipc = [], {}
    for c in sorted(cells, key=lambda c: (c["ipc"], c["method"], c["iterations"], c["seed"])):
        d = found.get(cell_of(c).set_name)
        if d is None:
            continue
        it = f", {c['iterations']} it." if cell_of(c).optimised else ""
        again = " (rerun)" if c.get("rerun") else ""
        rows.append(
            [f"{c['method']}{again}{it}", str(c["ipc"]), str(c["seed"]), f"{d['pixels']:.3f}", f"{d['features']:.3f}"]
        )
        rows[-1].append(f"{c['test_top1']:.2f}")
        by_ipc.setdefault(c["ipc"], []).append((d["pixels"], d["features"], c["test_top1"]))
    if not rows:
        return ["Not measured yet.", ""]
    correlation = []
    for ipc, points in sorted(by_ipc.items()):
        if len(points) < 4:
            continue
        pixels, features, top1 = zip(*points, strict=True)
        rho_p, rho_f = spearmanr(pixels, top1).statistic, spearmanr(features, top1).statistic
        correlation.append(
            f"* IPC {ipc} ({len(points)} sets): Spearman ρ of top-1 with pixel diversity {rho_p:+.2f}, "
            f"with feature diversity {rho_f:+.2f}"
        )
    header = ["set", "IPC", "seed", "pixels (RMS, 0–1)", "features (0–2)", "top-1 (%)"]
    return [*table(header, rows), "", *correlation, ""]


def picture_lines(state: dict) -> list[str]:
    """The sets side by side (nothing until the picture was made)."""
    if "pictures" not in state:
        return []
    sets = ", ".join(f"{m}: `{name}`" for m, name in state["pictures"].items())
    return [
        f"## The sets (IPC 10, seed 0; the first {PICTURE_COLUMNS} images per class, as the student reads them)",
        "",
        f"![sets]({PICTURES})",
        "",
        f"Left to right: {sets}.",
        "",
    ]


def check_lines(state: dict) -> list[str]:
    """Per check: each method's final / best top-1 under protocol v2 and with the one change, and the change."""
    crop = state.get("crop", {}).get("chosen", PAPER_CROP)
    lines = []
    for name, check in CHECKS.items():
        rows = []
        concerned = check.methods()
        for method in ORDER:
            base = state["cells"].get(Cell(method, 10, 0, crop).key)
            changed = state["cells"].get(Cell(method, 10, 0, crop, check=name).key)
            delta = f"{changed['test_top1'] - base['test_top1']:+.2f}" if base and changed else "–"
            rows.append([method, final_best(base), final_best(changed) if method in concerned else "unchanged", delta])
        lines += [f"**`{name}`**: {check.question}.", "", *table(["method", "v2", "changed", "Δ final"], rows), ""]
    return lines


def final_best(cell: dict | None) -> str:
    return "–" if cell is None else f"{cell['test_top1']:.2f} / {cell['test_top1_best']:.2f}"


def numerics_lines(state: dict) -> list[str]:
    crop = PAPER_CROP
    fast = state["cells"].get(Cell("cvdd", 10, 0, crop).key)
    fp32 = state["cells"].get(Cell("cvdd", 10, 0, crop, precision="32").key)
    if not (fast and fp32):
        return ["not run yet"]
    seconds = {
        p: sum(v["seconds"] for k, v in state["stages"].items() if c.set_name in k and k.split("/")[0] != "evaluate")
        for p, c in (("auto", Cell("cvdd", 10, 0, crop)), ("32", Cell("cvdd", 10, 0, crop, precision="32")))
    }
    rows = [
        ["fast default (`auto`)", final_best(fast), f"{seconds['auto']:.0f}"],
        ["fp32 (`hardware.precision=32`)", final_best(fp32), f"{seconds['32']:.0f}"],
    ]
    note = "The teachers are shared (squeezed with the fast default); recover, relabel and the student differ."
    return [*table(["numerics", "final / best top-1 (%)", "recover + relabel s"], rows), "", note]


def stage_totals(state: dict) -> list[str]:
    """Wall and CPU minutes per stage, and the code each stage ran. CPU time (both threads) is the comparable
    one: the run was paused while tests ran on this 2-core machine, which wall time includes. Runs recorded
    before CPU time (or the commit) was kept are counted and named, not guessed."""
    records = {"squeeze (teachers, every try)": [t for rec in state["teachers"].values() for t in rec.get("tries", [])]}
    for key, rec in state["stages"].items():
        records.setdefault(key.split("/")[0], []).append(rec)
    records["all stages"] = [r for recs in list(records.values()) for r in recs]

    def cpu_minutes(recs: list[dict]) -> str:
        timed = [r["cpu_seconds"] for r in recs if "cpu_seconds" in r]
        text = f"{sum(timed) / 60:.1f}"
        return text if len(timed) == len(recs) else f"{text} ({len(timed)} of {len(recs)} runs timed)"

    rows = [
        [stage, f"{sum(r['seconds'] for r in recs) / 60:.1f}", cpu_minutes(recs)] for stage, recs in records.items()
    ]
    commits = Counter(rec.get("commit", "")[:8] or "not recorded" for rec in records["all stages"])
    code = "Code per run (teacher tries and stages): " + ", ".join(f"{c}: {n}" for c, n in commits.items())
    note = '("not recorded": runs before stages kept their commit; the script\'s runs and their commits are below.)'
    return [*table(["stage", "wall minutes", "CPU minutes (2 threads)"], rows), "", code, note]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "fashion_mnist_v2", help="artifacts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="result files")
    parser.add_argument("--ipcs", type=int, nargs="+", default=list(IPCS), choices=IPCS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--teachers-only", action="store_true", help="squeeze the committee and stop")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from finished cells")
    args = parser.parse_args()

    bench = Bench(args.work, args.out)
    if args.report:
        bench.pictures(bench.state.get("crop", {}).get("chosen", PAPER_CROP))
        bench.diversity()
        write_report(bench)
        return
    started = time.time()
    bench.state["sessions"].append(
        {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0, "commit": bench.commit}
    )

    def tick() -> None:
        bench.state["sessions"][-1]["seconds"] = round(time.time() - started, 1)
        bench.diversity()
        bench.save()
        write_report(bench)

    bench.squeeze()
    tick()
    if args.teachers_only:
        return
    for precision in ("auto", "32"):  # the fast numerics against fp32 first: one cell, same seed and protocol
        bench.cell(Cell("cvdd", 10, 0, PAPER_CROP, precision=precision))
    tick()
    crop = bench.crop_ablation()
    tick()
    ipcs = sorted(args.ipcs, key=lambda ipc: (ipc != 10, ipc))
    if 10 in ipcs:  # the diagnostics at IPC 10, seed 0 come before the long cells: they say what the rest means
        bench.grid(crop, [10], [0])
        bench.pictures(crop)
        bench.curve(crop)
        tick()
        bench.checks(crop)
        tick()
        for method in ORDER:
            bench.cell(Cell(method, 10, 0, crop, epochs=LONG_EPOCHS))
        tick()
    for seed in args.seeds:
        bench.grid(crop, ipcs, [seed])
        tick()
    bench.v3(crop, args.seeds)
    tick()
    bench.rerun_v2(crop, [10, 1], ["cvdd", "random_real"], args.seeds)  # v3's control in v3's environment
    tick()
    better = bench.v3_better()
    bench.v3_at(crop, 1, args.seeds, better)
    tick()
    bench.rerun_v2(crop, [10, 1, 50], ORDER, [0])  # every method's seed-0 set with its student: the diversity rows
    tick()
    if better:  # the longest cells last: v3's control at IPC 50 (< 30 min a cell), then v3 there (> 1 h a set)
        bench.rerun_v2(crop, [50], ["cvdd", "random_real"], args.seeds)
        tick()
        bench.v3_at(crop, 50, args.seeds, better)
        tick()
    print((args.out / "fashion_mnist.md").read_text())


if __name__ == "__main__":
    main()
