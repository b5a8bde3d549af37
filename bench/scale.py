"""How relabel and the student grow with the set: start-up, peak RSS, bytes read and hashed, DDP traffic.

Synthetic sets of growing size in the real artifact layout (random pixels written by the same ``write_set`` that
distill uses: PNGs, ``images.pt``, grid, manifest), a miniature ImageFolder of the dataset for the test split, and
an untrained ``convnet_small`` teacher published by ``train.py`` (the network's cost is not what is measured).
Per set: ``relabel.py`` (1 epoch of labels) and ``evaluate.py`` (a fixed number of student steps, then the
recorded test pass), each as its own process with :mod:`scale_probe` attached; under ``hardware=ddp_cpu`` also
the loopback bytes per student step and each rank's share of the forward passes. Each figure is fitted linearly
in the number of images (least squares over the 224 px series) and **extrapolated** to ImageNet-1K IPC 50 (50,000
images): an extrapolation from sets of a few thousand images on this machine, not a measurement at that size.

    python bench/scale.py                      # every cell (resumable: finished runs are kept in --work)
    python bench/scale.py --report             # the table and JSON from what --work holds

Writes ``bench/results/scale.json`` and prints the table that bench/README.md quotes. Run it alone: timings and
loopback traffic are per machine, not per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvdd.artifacts.distilled import DistilledArtifact, SetPiece, from_pixels, write_set  # noqa: E402
from cvdd.data import get_spec  # noqa: E402

# (dataset, IPC, run under ddp_cpu too); the 224 px series is what the fits use
CELLS = [
    ("imagenet1k", 1, True),
    ("imagenet1k", 2, True),
    ("imagenet1k", 4, True),
    ("imagenet1k", 8, False),
    ("tiny_imagenet", 10, False),
]
TARGET_IMAGES = 50_000  # ImageNet-1K IPC 50
RUNS = ("finish", "relabel", "evaluate", "evaluate_ddp")  # finish: distill's write_set over unit-like pieces
STUDENT_STEPS = 24
TEACHER = STUDENT = "convnet_small"  # small networks: what grows with the set is measured, not the network


def wnids(count: int) -> list[str]:
    return [f"n{index:08d}" for index in range(count)]


def write_dataset(root: Path, classes: list[str], size: int = 16) -> None:
    """An ImageFolder ``train/`` and ``val/`` with one small JPEG per class (the loaders resize them)."""
    if (root / "val" / classes[-1]).is_dir():
        return
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{cls}_0.JPEG")


PIECE_IMAGES = 100  # images per piece of a synthetic set: what one recover unit of ImageNet-1K holds


def write_pieces(folder: Path, dataset: str, ipc: int, classes: list[str]) -> None:
    """``ipc`` images of random pixels per class as unit-like files of :data:`PIECE_IMAGES` normalised images each
    (with their classes and IPC indices), IPC-major as recover finishes them."""
    if (folder / "done").is_file():
        return
    spec = get_spec(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(len(classes)).repeat(ipc)
    ipc_index = torch.arange(ipc).repeat_interleave(len(classes))
    for k, start in enumerate(range(0, len(labels), PIECE_IMAGES)):
        part = slice(start, start + PIECE_IMAGES)
        generator = torch.Generator().manual_seed(ipc * 100_000 + k)
        shape = (len(labels[part]), 3, spec.image_size, spec.image_size)
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        piece = {"images": from_pixels(pixels, spec.mean, spec.std), "labels": labels[part], "ipc": ipc_index[part]}
        torch.save(piece, folder / f"piece_{k:05d}.pt")
    (folder / "done").write_text("")


def piece_images(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["images"]


def assemble(pieces: Path, artifacts: Path, dataset: str, ipc: int, probe: Path) -> None:
    """Child process: distill's finish (``write_set``) over the pieces, read lazily one at a time as recover's unit
    files are; writes its probe record (peak RSS, bytes read and hashed, seconds)."""
    from scale_probe import io_counters, peak_rss

    from cvdd.artifacts.io import HASHED

    started = time.perf_counter()
    spec = get_spec(dataset)
    classes = wnids(spec.num_classes)
    set_pieces = []
    for path in sorted(pieces.glob("piece_*.pt")):
        meta = torch.load(path, weights_only=True, mmap=True)
        set_pieces.append(SetPiece(meta["labels"].clone(), meta["ipc"].clone(), partial(piece_images, path)))
    artifact = DistilledArtifact(artifacts, dataset, f"scale_ipc{ipc}")
    fields = {"dataset": dataset, "method": "random_real", "classes": classes, "class_names": classes, "ipc": ipc}
    fields["fingerprint"] = f"scale-{dataset}-{ipc}"
    write_set(artifact, set_pieces, class_names=classes, mean=spec.mean, std=spec.std, seed=0, fields=fields)
    record = {"rank": 0, "first_step_s": None, "peak_rss_bytes": peak_rss(), **io_counters()}
    record.update(hashed_bytes=HASHED["bytes"], wall_s=time.perf_counter() - started)
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "rank0.json").write_text(json.dumps(record, indent=1))


def write_random_set(work: Path, dataset: str, ipc: int, classes: list[str], probe: Path) -> str:
    """``ipc`` images of random pixels per class, as a finished set: written as pieces, then assembled by distill's
    finish in a child process whose peak memory and traffic are the ``finish`` row."""
    name = f"scale_ipc{ipc}"
    if DistilledArtifact(work / "artifacts", dataset, name).manifest.is_file() and (probe / "wall.json").is_file():
        return name
    pieces = work / "pieces" / f"{dataset}_ipc{ipc}"
    write_pieces(pieces, dataset, ipc, classes)
    shutil.rmtree(probe, ignore_errors=True)
    started = time.perf_counter()
    command = [sys.executable, str(Path(__file__).resolve()), "--assemble", str(pieces), "--dataset", dataset]
    command += ["--ipc", str(ipc), "--work", str(work), "--probe", str(probe)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"assembling {name} failed:\n{proc.stderr[-6000:]}")
    (probe / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    return name


def cli(script: str, args: list[str], work: Path, probe: Path | None = None) -> float:
    """Run an entry point from ``work``; returns its wall seconds."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT / 'bench'}:{os.environ.get('PYTHONPATH', '')}"}
    extra = (
        ["+callbacks.scale_probe._target_=scale_probe.ScaleProbe", f"+callbacks.scale_probe.out={probe}"]
        if probe
        else []
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args, *extra], cwd=work, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return time.perf_counter() - started


def common(dataset: str, ipc: int, name: str, data_root: Path) -> list[str]:
    return [
        f"dataset={dataset}",
        f"dataset.root={data_root}",
        f"ipc={ipc}",
        f"set={name}",
        "method=random_real",
        f"relabel.teachers={TEACHER}",
        "relabel.epochs=1",
        "logger=none",
    ]


def read_probe(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def run_cell(work: Path, dataset: str, ipc: int, ddp: bool, execute: bool = True) -> dict:
    """One set's runs (each skipped when its probe is already in ``work``; none run without ``execute``)."""
    spec = get_spec(dataset)
    classes = wnids(spec.num_classes)
    data_root = work / "data" / dataset
    artifacts = work / "artifacts"
    if execute:
        write_dataset(data_root, classes)
    if execute and not (artifacts / dataset / "teachers" / f"{TEACHER}.json").is_file():
        cli(
            "train.py",
            [
                f"dataset={dataset}",
                f"dataset.root={data_root}",
                f"model={TEACHER}",
                "squeeze.epochs=1",
                "model.pretrained=false",
                "squeeze.batch_size=256",
                "logger=none",
            ],
            work,
        )
    cell = work / "probes" / f"{dataset}_ipc{ipc}"
    name = write_random_set(work, dataset, ipc, classes, cell / "finish") if execute else f"scale_ipc{ipc}"
    args = common(dataset, ipc, name, data_root)
    student = [
        *args,
        f"student={STUDENT}",
        "validate.epochs=1",
        f"+trainer.max_steps={STUDENT_STEPS}",
        "validate.micro_batches=2",
        "hardware.eval_batch_size=32",
        "relabel.stack_images=32",
    ]
    runs = {
        "relabel": ("relabel.py", [*args, "relabel.stack_images=32"]),
        "evaluate": ("evaluate.py", student),
    }
    if ddp:
        runs["evaluate_ddp"] = ("evaluate.py", [*student, "hardware=ddp_cpu", "hardware.threads=1"])
    out = {"dataset": dataset, "ipc": ipc, "images": ipc * len(classes), "image_size": spec.image_size}
    out["uint8_bytes"] = out["images"] * 3 * spec.image_size**2
    finish = cell / "finish"
    if (finish / "wall.json").is_file():
        out["finish"] = {"ranks": read_probe(finish), **json.loads((finish / "wall.json").read_text())}
    for run, (script, run_args) in runs.items():
        probe = cell / run
        if execute and not (probe / "wall.json").is_file():
            shutil.rmtree(probe, ignore_errors=True)
            wall = cli(script, run_args, work, probe)
            (probe / "wall.json").write_text(json.dumps({"wall_s": wall}))
        if (probe / "wall.json").is_file():
            out[run] = {"ranks": read_probe(probe), **json.loads((probe / "wall.json").read_text())}
    return out


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def student_parameters() -> int:
    """Parameters of the student the benchmark trains (its gradients are what DDP all-reduces every step)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    net = OmegaConf.load(ROOT / "conf" / "model" / f"{STUDENT}.yaml").net
    model = instantiate(net, num_classes=1000, image_size=224, in_chans=3)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def report(cells: list[dict]) -> dict:
    rows, series = [], [c for c in cells if c["dataset"] == "imagenet1k"]
    print(
        "| set | images | uint8 MB | run | ranks | start-up s | peak RSS MB | read MB | hashed MB | lo KB/step "
        "| forwards/rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        for run in RUNS:
            if run not in c:
                continue
            ranks = c[run]["ranks"]
            first = max(r["first_step_s"] or 0.0 for r in ranks)
            rss = max(r["peak_rss_bytes"] for r in ranks)
            lo = ranks[0]["loopback_bytes_per_step"] if run == "evaluate_ddp" else None
            forwards = "/".join(str(r["forwards"]) for r in ranks) if run.startswith("evaluate") else "–"
            row = {
                "set": f"{c['dataset']} IPC {c['ipc']}",
                "images": c["images"],
                "uint8_mb": c["uint8_bytes"] / 1e6,
                "run": run,
                "ranks": len(ranks),
                "startup_s": first,
                "peak_rss_mb": rss / 1e6,
                "read_mb": max(r["rchar"] for r in ranks) / 1e6,
                "hashed_mb": sum(r["hashed_bytes"] for r in ranks) / 1e6,
                "loopback_kb_per_step": None if lo is None else lo / 1e3,
                "forwards_per_rank": [r.get("forwards") for r in ranks],
                "steps": ranks[0].get("steps"),
            }
            rows.append(row)
            print(
                f"| {row['set']} | {row['images']:,} | {row['uint8_mb']:.0f} | {run} | {row['ranks']} | {first:.1f} | "
                f"{row['peak_rss_mb']:.0f} | {row['read_mb']:.0f} | {row['hashed_mb']:.1f} | "
                f"{'–' if lo is None else f'{lo / 1e3:.1f}'} | {forwards} |"
            )
    extrapolated = {}
    print("\nFitted over the 224 px sets and extrapolated to 50,000 images (ImageNet-1K IPC 50):\n")
    print("| run | figure | per 1,000 images | at 0 images | extrapolated to 50,000 | target |")
    print("|---|---|---|---|---|---|")
    uint8_per_image = 3 * 224 * 224
    for run in RUNS:
        points = [(c["images"], c[run]["ranks"]) for c in series if run in c]
        if len(points) < 2:
            continue
        xs = [n for n, _ in points]
        for figure, key, scale, target in (
            ("start-up s (slowest rank)", "first_step_s", 1.0, "< 120 s"),
            ("peak RSS MB (largest rank)", "peak_rss_bytes", 1e-6, "≤ constant + 1.2 × uint8 (180.6 MB per 1,000)"),
            ("RSS at the first step MB (largest rank)", "rss_first_step_bytes", 1e-6, "the set loaded: 1 × uint8"),
            ("hashed MB (all ranks)", "hashed_bytes", 1e-6, "each file once per job"),
        ):
            if any(r.get(key) is None for _, ranks in points for r in ranks):
                continue
            reduce = sum if key == "hashed_bytes" else max
            ys = [reduce(r[key] for r in ranks) * scale for _, ranks in points]
            a, b = fit(xs, ys)
            at = a + b * TARGET_IMAGES
            extrapolated[f"{run}.{key}"] = {"intercept": a, "per_image": b, "at_50k": at}
            print(f"| {run} | {figure} | {b * 1000:.2f} | {a:.1f} | {at:,.1f} | {target} |")
    ddp = [c for c in series if "evaluate_ddp" in c]
    if len(ddp) >= 2:
        params = student_parameters()
        gradients = 2 * 4 * params  # gloo's ring all-reduce of fp32 gradients over 2 ranks: W · 2 (W − 1) / W · 4 P
        xs = [c["images"] for c in ddp]
        ys = [c["evaluate_ddp"]["ranks"][0]["loopback_bytes_per_step"] for c in ddp]
        a_lo, b_lo = fit(xs, ys)
        extrapolated["evaluate_ddp.loopback_bytes_per_step"] = {
            "intercept": a_lo,
            "per_image": b_lo,
            "at_50k": a_lo + b_lo * TARGET_IMAGES,
        }
        extrapolated["evaluate_ddp.gradient_allreduce_bytes"] = gradients
        print(
            f"| evaluate_ddp | loopback bytes per student step (both ranks) | {b_lo * 1000:,.0f} B "
            f"| {a_lo / 1e6:,.2f} MB | {(a_lo + b_lo * TARGET_IMAGES) / 1e6:,.2f} MB "
            "| nothing that grows with the set (< 1 MB) |"
        )
        print(
            f"\nOf the loopback bytes per step, the gradient all-reduce of the student's {params:,} parameters "
            f"accounts for {gradients / 1e6:,.2f} MB (2 ranks × 4 bytes × P); "
            f"the rest, {(a_lo - gradients) / 1e3:,.1f} KB at 0 "
            f"images, is the BatchNorm merge, the loss sync and the collectives' framing."
        )
    rss_ratio = {
        run: extrapolated[f"{run}.peak_rss_bytes"]["per_image"] / 1e-6 / uint8_per_image
        for run in RUNS
        if f"{run}.peak_rss_bytes" in extrapolated
    }
    print(
        "\nPeak RSS growth per image as a multiple of its uint8 pixels: "
        + ", ".join(f"{k} {v:.2f}×" for k, v in rss_ratio.items())
    )
    return {"rows": rows, "extrapolated": extrapolated, "rss_growth_over_uint8": rss_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "scale")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--report", action="store_true", help="only the table, from the runs --work holds")
    parser.add_argument("--assemble", type=Path, help=argparse.SUPPRESS)  # the finish's child process
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--ipc", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.assemble:
        assemble(args.assemble, args.work / "artifacts", args.dataset, args.ipc, args.probe)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    cells = []
    for dataset, ipc, ddp in CELLS:
        if args.report and not (args.work / "probes" / f"{dataset}_ipc{ipc}").is_dir():
            continue
        print(f"{dataset} IPC {ipc} ...", flush=True)
        cells.append(run_cell(args.work, dataset, ipc, ddp, execute=not args.report))
    result = {"cells": cells, **report(cells), "machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
