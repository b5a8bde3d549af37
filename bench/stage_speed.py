"""Stage speed in each numerics variant: squeeze, recover, relabel and the student, side by side in one run.

On Fashion-MNIST (digits when it is absent) with the ``small`` committee at IPC 10, every stage runs in
fp32, fp32 channels-last, bf16, bf16 channels-last and the ``auto`` default (``hardware.precision`` /
``hardware.channels_last``), each in its own subprocess and one at a time (never two stages at once on a
small machine). Only the optimisation/labelling steps are timed (a callback sums the batch times), so
data loading and start-up do not blur the ratios. ``--baseline <checkout>`` adds the same stages run
with another checkout's code and its defaults (e.g. the commit before this benchmark). Prints a table
and writes ``bench/results/stage_speed.json``; peak RSS is per subprocess.

    python bench/stage_speed.py
    python bench/stage_speed.py --baseline /tmp/cvdd_before --stages recover,relabel
    python bench/stage_speed.py --baseline /tmp/cvdd_before --stages student --variants auto --repeats 5
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = ["resnet18_small", "resnet50_small", "shufflenetv2_small", "mobilenetv2_small", "densenet_small"]
VARIANTS = {
    "fp32": ["hardware.precision=32", "hardware.channels_last=false"],
    "fp32_cl": ["hardware.precision=32", "hardware.channels_last=true"],
    "bf16": ["hardware.precision=bf16", "hardware.channels_last=false"],
    "bf16_cl": ["hardware.precision=bf16", "hardware.channels_last=true"],
    "auto": [],
    "auto_in_turn": ["hardware.member_threads=1"],  # recover's / relabel's passes one at a time, all threads each
}
STAGES = ("squeeze", "recover", "relabel", "student")
BUSY: list[float] = []


def step_timer():
    """A callback summing the wall time of every training / prediction batch (the work, not the loading)."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def _start(self, *args) -> None:
            self.started = time.perf_counter()

        def _stop(self, *args) -> None:
            BUSY.append(time.perf_counter() - self.started)

        on_train_batch_start = on_predict_batch_start = _start
        on_train_batch_end = on_predict_batch_end = _stop

    return StepTimer()


def dataset_name() -> str:
    sys.path.insert(0, str(ROOT))
    from cvdd.data.registry import DEBIAN_FASHION_MNIST

    return "fashion_mnist" if DEBIAN_FASHION_MNIST.is_dir() else "digits"


def mean_step(warmup: int, since: int = 0) -> float:
    """Mean of the timed steps recorded since index ``since``, the first ``warmup`` of them left out."""
    steps = BUSY[since + warmup :]
    return sum(steps) / len(steps)


def worker(args: argparse.Namespace) -> None:
    """One stage in one variant, in this process; prints its measurements as JSON."""
    sys.path.insert(0, str(args.code))
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    stages_layout = (Path(args.code) / "cvdd" / "stages").is_dir()  # packages by role (from the layout change on)
    compose_job = importlib.import_module("cvdd.config.compose" if stages_layout else "cvdd.compose").compose_job

    # a checkout from before the methods seam (e.g. the baseline) names its jobs and sets the old way
    methods_seam = (Path(args.code) / "conf" / "method").is_dir()
    set_key = "set" if methods_seam else "name"
    common = [
        f"dataset={args.dataset}",
        f"paths.root={args.workdir}",
        "logger=none",
        "+callbacks.timer._target_=__main__.step_timer",
        *([] if args.variant == "baseline" else VARIANTS[args.variant]),
    ]
    logs = args.workdir / "logs" / f"{args.stage}_{args.variant}"
    s = args.settings
    if args.stage == "squeeze":
        squeeze_teacher = importlib.import_module(
            "cvdd.stages.squeeze" if stages_layout else "cvdd.teachers" if methods_seam else "cvdd.jobs.squeeze"
        ).squeeze_teacher

        per_member = {}
        for member in MEMBERS:
            since = len(BUSY)
            squeeze_teacher(
                compose_job(
                    "train",
                    [
                        *common,
                        f"model={member}",
                        f"paths.artifacts={args.workdir / ('squeeze_' + args.variant)}",
                        "squeeze.epochs=1",
                        f"+trainer.limit_train_batches={s['squeeze_batches']}",
                        "+trainer.limit_val_batches=0",
                        "overwrite=true",
                    ],
                    logs / member,
                )
            )
            per_member[member] = mean_step(2, since)
        # one batch of every member: the pool's images per second of training
        busy = sum(per_member.values())
        result = {"rate": len(MEMBERS) * s["squeeze_batch"] / busy, "unit": "images/s", "s_per_batch": per_member}
    elif args.stage == "recover":
        jobs = "cvdd.stages" if stages_layout else "cvdd.jobs"
        distill = importlib.import_module(f"{jobs}.distill" if methods_seam else "cvdd.jobs.recover").distill

        name = f"speed_{args.variant}"
        iterations = s["recover_iterations"]
        distill(
            compose_job(
                "distill",
                [
                    *common,
                    "ipc=10",
                    f"method.recover.iterations={iterations}",
                    "method.recover.init.mode=real",
                    "committee.train_missing=false",
                    f"{set_key}={name}",
                    "overwrite=true",
                ],
                logs,
            )
        )
        busy = mean_step(2)  # one step = one Adam step of all 100 images (one group, one wave)
        result = {"rate": busy / 100, "unit": "s/image/iteration"}
    elif args.stage == "relabel":
        relabel = importlib.import_module("cvdd.stages.relabel" if stages_layout else "cvdd.jobs.relabel").relabel

        epochs = s["relabel_epochs"]
        relabel(
            compose_job(
                "relabel",
                [*common, "ipc=10", f"{set_key}=speed_fp32", f"relabel.epochs={epochs}", "overwrite=true"],
                logs,
            )
        )
        busy = mean_step(1)  # one step = one epoch of the plan: 100 images through every teacher
        result = {"rate": 100 / busy, "unit": "images/s"}
    else:
        if (Path(args.code) / "cvdd" / "stages" / "validate.py").is_file():  # one name per stage
            evaluate = importlib.import_module("cvdd.stages.validate").validate
        else:
            evaluate = importlib.import_module(
                "cvdd.stages.evaluate" if stages_layout else "cvdd.jobs.evaluate"
            ).evaluate

        epochs = s["student_epochs"]
        out = evaluate(
            compose_job(
                "evaluate",
                [
                    *common,
                    "ipc=10",
                    f"{set_key}=speed_fp32",
                    f"relabel.epochs={epochs}",
                    f"validate.epochs={epochs}",
                    f"validate.eval_every={epochs}",
                ],
                logs,
            )
        )
        busy = mean_step(5)  # one step = one planned batch of 16
        result = {"rate": 1 / busy, "unit": "steps/s", "test_top1": out["test_top1"]}
    import torch

    result.update(
        stage=args.stage,
        variant=args.variant,
        seconds_per_step=busy,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))


def run_worker(args: argparse.Namespace, stage: str, variant: str) -> dict:
    code = args.baseline if variant == "baseline" else ROOT
    cmd = [sys.executable, __file__, "--worker", stage, variant, "--code", str(code), "--workdir", str(args.workdir)]
    cmd += ["--dataset", args.dataset, "--settings", json.dumps(args.settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate (the lower middle of an even count), keeping every run's rate."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    return {**ordered[(len(ordered) - 1) // 2], "rates": [r["rate"] for r in runs]}


def prepare(args: argparse.Namespace) -> None:
    """Teachers (briefly squeezed: speed does not depend on accuracy) and an fp32 set to relabel and train on."""
    teachers = args.workdir / "artifacts" / args.dataset / "teachers"
    if not all((teachers / f"{m}.ckpt").is_file() for m in MEMBERS):
        print(f"squeezing the small committee on {args.dataset} (200 batches each)", flush=True)
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            f"model={','.join(MEMBERS)}",
            f"dataset={args.dataset}",
        ]
        subprocess.run(
            [
                *command,
                "squeeze.epochs=1",
                "+trainer.limit_train_batches=200",
                "logger=none",
                f"paths.root={args.workdir}",
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--baseline", type=Path, help="a checkout whose code and defaults run as variant 'baseline'")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work" / "stage_speed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage_speed.json")
    parser.add_argument("--dataset")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (stage, variant); the table takes the median")
    parser.add_argument("--worker", nargs=2, metavar=("STAGE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.stage, args.variant = args.worker
        worker(args)
        return
    args.dataset = args.dataset or dataset_name()
    args.settings = {
        "squeeze_batches": 12,
        "squeeze_batch": 128 if args.dataset == "fashion_mnist" else 64,
        "recover_iterations": 30,
        "relabel_epochs": 30,
        "student_epochs": 30,
    }
    prepare(args)
    variants = [*(["baseline"] if args.baseline else []), *args.variants.split(",")]
    stages = args.stages.split(",")
    if "recover" in stages:  # the fp32 set is what relabel and the student run on
        stages = ["recover", *[s for s in stages if s != "recover"]]
        variants = ["fp32", *[v for v in variants if v != "fp32"]]
    rows = []
    for stage in stages:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):  # interleaved rounds, so a slow spell of the machine hits every variant
            for variant in variants:
                runs[variant].append(run_worker(args, stage, variant))
                print(json.dumps(runs[variant][-1]), flush=True)
        rows += [median_run(r) for r in runs.values()]
    table = []
    for stage in stages:
        cells = {r["variant"]: r for r in rows if r["stage"] == stage}
        reference = cells.get("baseline", cells.get("fp32"))
        for r in cells.values():
            faster = reference["rate"] / r["rate"] if r["unit"].startswith("s/") else r["rate"] / reference["rate"]
            table.append({**r, "speedup": faster, "reference": reference["variant"]})
    print(f"\n{'stage':8s} {'variant':9s} {'rate':>12s} {'unit':18s} {'× ref':>6s} {'peak RSS MiB':>12s}  runs")
    for r in table:
        print(
            f"{r['stage']:8s} {r['variant']:9s} {r['rate']:12.4g} {r['unit']:18s} {r['speedup']:6.2f} "
            f"{r['peak_rss_mib']:12.0f}  {', '.join(f'{x:.4g}' for x in r['rates'])}"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"dataset": args.dataset, "settings": args.settings, "commit": commit.strip(), "rows": table}, indent=2
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
