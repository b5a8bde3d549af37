"""All four stages on a miniature CIFAR-100 with the paper's full-size committee, per hardware setting.

Writes a CIFAR-100 of a few images per class in the real on-disk format (the python pickles), then for each
``--hardware`` (``gpu`` and ``ddp`` on a GPU machine) runs ``train.py -m`` over the pool, ``distill.py``,
``relabel.py`` and ``evaluate.py`` under ``experiment=cifar100_ipc10`` (the paper's pool, priors, schedule and
student), with the iterations and epochs cut down. Each stage is its own process tree; a sampler records its peak
accelerator memory (``nvidia-smi``: the most the GPUs held at once above what they held before the stage) and the
tree's peak host memory (PSS, and the summed RSS, which counts the pages data-loader workers share with their
parent once per worker). Recover's cost is given per image and iteration and, times 4,000 iterations, beside the
paper's per-image figures (reference.md: ImageNet-1K on one RTX 4090, CV-DD 8.20 s and 23.4 GB; a CIFAR-100 image
is 49 times fewer pixels, so the numbers sit side by side, not as a like-for-like comparison).

    bash bench/gpu_smoke.sh                      # GPU machine: hardware gpu and ddp
    python bench/gpu_smoke.py --hardware cpu --members resnet18_small,resnet50_small --iterations 2   # CPU check

Writes ``bench/results/gpu_smoke.json`` (``--json``) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # cvdd without an install (a bare GPU machine); minidata

POOL = "resnet18,resnet50,shufflenetv2,mobilenetv2,densenet121"
PSS_READABLE = Path("/proc/self/smaps_rollup").is_file()  # Linux >= 4.14
PAPER = {"cvdd_s_per_image": 8.20, "cvdd_peak_gb": 23.4, "iterations": 4000}  # reference.md, ImageNet-1K, RTX 4090


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (DDP ranks, data-loader workers), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_memory(root: int) -> tuple[int, int | None]:
    """Host memory of ``root``'s process tree: the sum of RSS (which counts a page shared by a parent and its forked
    data-loader workers once per process: an upper bound) and of PSS (each shared page split between its sharers,
    from ``smaps_rollup``; ``None`` where the kernel does not give it). A process that ends mid-read is skipped."""
    rss, pss = 0, 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text() if PSS_READABLE else ""
        except OSError:
            continue
        rss += kib_field(status, "VmRSS:")
        pss += kib_field(rollup, "Pss:")
    return rss, pss if PSS_READABLE else None


def kib_field(text: str, name: str) -> int:
    """Bytes of the ``name  N kB`` line of a ``/proc`` file (0 when it has none)."""
    return sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(name))


def gpu_used() -> int | None:
    """Bytes in use on all GPUs together (``nvidia-smi``), ``None`` without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    )
    return sum(int(v) for v in out.stdout.split()) * 2**20 if out.returncode == 0 else None


class PeakSampler:
    """The peak of ``gpu_used() − baseline`` and of the process tree's PSS and summed RSS while a stage runs."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.baseline = gpu_used()
        self.peak_gpu = 0
        self.peak_rss = 0
        self.peak_pss: int | None = 0 if PSS_READABLE else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss, pss = tree_memory(self.pid)
            self.peak_rss = max(self.peak_rss, rss)
            if pss is not None:
                self.peak_pss = max(self.peak_pss, pss)
            used = gpu_used()
            if used is not None and self.baseline is not None:
                self.peak_gpu = max(self.peak_gpu, used - self.baseline)

    def stop(self) -> dict[str, int | None]:
        self._stop.set()
        self._thread.join()
        return {
            "peak_gpu_bytes": self.peak_gpu if self.baseline is not None else None,
            "peak_rss_bytes": self.peak_rss,
            "peak_pss_bytes": self.peak_pss,
        }


def run_stage(script: str, args: list[str], work: Path, log: Path) -> dict:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / script), *args], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        sampler = PeakSampler(proc.pid)
        code = proc.wait()
        peaks = sampler.stop()
    if code:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {code}); its output: {log}")
    return {"seconds": time.perf_counter() - started, **peaks}


def smoke(hardware: str, args: argparse.Namespace, data: Path, result: dict, save: Callable[[], None]) -> None:
    """Run the four stages under ``hardware`` into ``result``, calling ``save()`` after each (a run cut short by a
    time limit still leaves the stages it finished in the JSON)."""
    work = args.out / hardware
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "experiment=cifar100_ipc10",
        f"dataset.root={data}",
        f"paths.artifacts={work / 'artifacts'}",
        f"paths.logs={work / 'logs'}",
        f"hardware={hardware}",
        f"ipc={args.ipc}",
        "logger=none",
    ]
    if args.members != POOL:
        common += [f"committee.members=[{args.members}]", "committee.priors=null"]
    stages = {
        "squeeze": ("train.py", ["-m", *common, f"model={args.members}", "squeeze.epochs=1"]),
        "distill": ("distill.py", [*common, f"method.recover.iterations={args.iterations}"]),
        "relabel": ("relabel.py", [*common, f"relabel.epochs={args.epochs}"]),
        "evaluate": ("evaluate.py", [*common, f"relabel.epochs={args.epochs}", f"validate.epochs={args.epochs}"]),
    }
    if args.student:
        stages["evaluate"][1].append(f"student={args.student}")
    for stage, (script, stage_args) in stages.items():
        print(f"[{hardware}] {stage} ...", flush=True)
        result[stage] = run_stage(script, stage_args, work, work / f"{stage}.log")
        print(f"[{hardware}] {stage}: {result[stage]['seconds']:.1f} s", flush=True)
        if stage == "distill":
            per = result["distill"]["seconds"] / (100 * args.ipc * args.iterations)
            result["distill"]["s_per_image_iteration"] = per
            result["distill"]["s_per_image_at_4000_iterations"] = per * PAPER["iterations"]
        save()


def table(results: dict[str, dict]) -> None:
    print("\n| hardware | stage | seconds | peak GPU GB | peak PSS GB | peak summed RSS GB | s / image / iteration |")
    print("|---|---|---|---|---|---|---|")

    def gb(value: int | None) -> str:
        return "–" if value is None else f"{value / 1e9:.2f}"

    for hardware, stages in results.items():
        for stage, r in stages.items():
            per = f"{r['s_per_image_iteration']:.2e}" if "s_per_image_iteration" in r else "–"
            memory = " | ".join(gb(r.get(key)) for key in ("peak_gpu_bytes", "peak_pss_bytes", "peak_rss_bytes"))
            print(f"| {hardware} | {stage} | {r['seconds']:.1f} | {memory} | {per} |")
    print(
        f"\nPaper (reference.md): ImageNet-1K at 224 px on one RTX 4090, CV-DD {PAPER['cvdd_s_per_image']} s per image "
        f"({PAPER['iterations']} iterations) and {PAPER['cvdd_peak_gb']} GB peak. Distill's seconds above include "
        "loading the committee, patch scoring and writing the set: an upper bound on recover's own cost."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", default="gpu,ddp", help="hardware configs to run, comma-separated")
    parser.add_argument("--members", default=POOL, help="the pool (default: the paper's five, full size)")
    parser.add_argument("--student", default=None, help="student model id (default: the preset's)")
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2, help="relabel and student epochs")
    parser.add_argument("--per-class", type=int, default=5, help="miniature CIFAR-100 images per class")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "work" / "gpu_smoke", help="work folder")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu_smoke.json")
    args = parser.parse_args()
    from minidata import write_cifar

    from cvdd.artifacts import save_json

    args.out = args.out.resolve()
    data = args.out / "data"
    if not (data / "cifar-100-python").is_dir():
        write_cifar(data, 100, per_class=args.per_class)
    results: dict[str, dict] = {}
    record = {"command": " ".join(sys.argv), "paper": PAPER, "results": results, "gpus": gpu_used() is not None}
    for hardware in args.hardware.split(","):
        smoke(hardware, args, data, results.setdefault(hardware, {}), lambda: save_json(args.json, record))
    table(results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
