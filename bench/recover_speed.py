"""Recover speed: sequential units vs units stacked per member, at IPC 1, 10 and 50.

Every configuration runs in its own subprocess (so peak memory is its own), on digits (10
classes) with the CPU-sized committee, the same seed and iteration count; the script prints a
table, checks that both modes give the same images, and writes bench/results/recover_speed.json.

    python bench/recover_speed.py                 # CPU, 20 iterations
    python bench/recover_speed.py --iterations 50 --hardware gpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = "resnet18_small,resnet50_small,shufflenetv2_small,mobilenetv2_small,densenet_small"


FIT_SECONDS: list[float] = []


def fit_timer():
    """A callback recording the wall time of the optimisation loop alone (no loading, no PNG writing)."""
    from lightning.pytorch.callbacks import Callback

    class FitTimer(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            FIT_SECONDS.append(time.perf_counter() - self.start)

    return FitTimer()


def worker(args: argparse.Namespace) -> None:
    """One distill run; prints its timing and peak memory as JSON."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import cvdd.config.resolvers  # noqa: F401
    from cvdd.stages.distill import distill

    mode = "grouped" if args.grouping else "sequential"
    ipc = args.ipc[0]
    overrides = [
        f"paths.root={args.workdir}",
        f"ipc={ipc}",
        f"method.recover.iterations={args.iterations}",
        f"method.recover.grouping={str(args.grouping).lower()}",
        "method.recover.init.mode=gaussian",
        "logger=none",
        f"hardware={args.hardware}",
        f"set=bench_ipc{ipc}_{mode}",
        "overwrite=true",
        "callbacks.progress_bar.refresh_rate=0",
        "+callbacks.timer._target_=__main__.fit_timer",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("distill", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(args.workdir) / "logs" / f"ipc{ipc}_{mode}")
        cfg.hydra.job.name = "bench"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    distill(cfg)
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(
        json.dumps(
            {
                "ipc": ipc,
                "mode": mode,
                "seconds": seconds,
                "fit_seconds": FIT_SECONDS[-1],
                "images": ipc * 10,
                "peak_bytes": peak,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            }
        )
    )


def run(args: argparse.Namespace, *extra: str) -> str:
    cmd = [
        sys.executable,
        __file__,
        "--workdir",
        str(args.workdir),
        "--iterations",
        str(args.iterations),
        "--hardware",
        args.hardware,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--hardware", default="cpu")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recover_speed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grouping", type=lambda s: s == "true", default=True, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    teachers = args.workdir / "artifacts" / "digits" / "teachers"
    if not all((teachers / f"{m}.ckpt").is_file() for m in MEMBERS.split(",")):
        print("squeezing the small committee on digits (one epoch each; timing does not depend on accuracy)")
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "-m",
                f"model={MEMBERS}",
                "squeeze.epochs=1",
                "logger=none",
                f"paths.root={args.workdir}",
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )

    import torch

    rows = []
    for ipc in args.ipc:
        result = {}
        for grouping in ("false", "true"):
            result[grouping] = json.loads(run(args, "--worker", "--ipc", str(ipc), "--grouping", grouping))
        folder = args.workdir / "artifacts" / "digits" / "distilled"
        a = torch.load(folder / f"bench_ipc{ipc}_sequential" / "images.pt", weights_only=True)["images"]
        b = torch.load(folder / f"bench_ipc{ipc}_grouped" / "images.pt", weights_only=True)["images"]
        diff = (a - b).abs()
        seq, grp = result["false"], result["true"]
        rows.append(
            {
                "ipc": ipc,
                "images": seq["images"],
                "iterations": args.iterations,
                "device": seq["device"],
                "sequential_s_per_image": seq["seconds"] / seq["images"],
                "grouped_s_per_image": grp["seconds"] / grp["images"],
                "speedup": seq["seconds"] / grp["seconds"],
                "sequential_peak_mib": seq["peak_bytes"] / 2**20,
                "grouped_peak_mib": grp["peak_bytes"] / 2**20,
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "frac_diff_gt_1e-4": float((diff > 1e-4).float().mean()),
            }
        )
    header = (
        f"{'IPC':>4} {'images':>6} {'seq s/img':>10} {'grp s/img':>10} {'speed-up':>9} "
        f"{'seq MiB':>8} {'grp MiB':>8} {'mean|diff|':>11} {'max|diff|':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['ipc']:>4} {r['images']:>6} {r['sequential_s_per_image']:>10.3f} {r['grouped_s_per_image']:>10.3f} "
            f"{r['speedup']:>8.2f}x {r['sequential_peak_mib']:>8.0f} {r['grouped_peak_mib']:>8.0f} "
            f"{r['mean_abs_diff']:>11.2e} {r['max_abs_diff']:>10.2e}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"iterations": args.iterations, "hardware": args.hardware, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
