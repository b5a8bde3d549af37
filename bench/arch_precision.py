"""Which precision and memory format each architecture should run in, measured on this machine.

For every architecture of the CPU-sized pool and the ConvNet student, on Fashion-MNIST-shaped inputs
(1×28×28), times the workloads the stages run at the batch each runs them — recover (eval-mode forward +
gradient with respect to the input; 40 images: a member's stacked units at IPC 10), relabel (BSSL:
train-mode BatchNorm forward, no gradient; batch 16), squeeze (train-mode forward + backward + SGD
step; batch 128) and student (the same at the student's batch 16) — in fp32, fp32 channels-last, bf16
autocast and bf16 channels-last, and prints the speed-up of each over fp32. ``cvdd/runtime/precision.py``'s
per-architecture table is read off this table (the JSON is kept in ``bench/results/``).

    python bench/arch_precision.py                   # CPU, Fashion-MNIST shapes
    python bench/arch_precision.py --device cuda --size 32 --channels 3
    python bench/arch_precision.py --models full --size 32 --channels 3 --repeats 3 \
        --out bench/results/arch_precision_full_32px.json   # the paper's full-size pool on CIFAR-shaped inputs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"recover": 40, "relabel": 16, "squeeze": 128, "student": 16}  # workload: batch
MODELS = ["resnet18_small", "resnet50_small", "shufflenetv2_small", "mobilenetv2_small", "densenet_small", "convnet"]
FULL = ["resnet18", "resnet50", "shufflenetv2", "mobilenetv2", "densenet121"]  # --models full: the paper's pool
VARIANTS = {
    "fp32": (None, False),
    "fp32_cl": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16_cl": (torch.bfloat16, True),
}


def build(model_id: str, args: argparse.Namespace) -> torch.nn.Module:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{model_id}.yaml")
    return instantiate(cfg.net, num_classes=10, image_size=args.size, in_chans=args.channels)


def workload(kind: str, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype, device: str):
    """One step of ``kind`` as a closure."""
    autocast = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
    if kind == "recover":  # frozen member, gradient with respect to the images only
        net.eval().requires_grad_(False)

        def step():
            inp = x.clone().requires_grad_(True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(net(inp).float(), y)
            loss.backward()

    elif kind == "relabel":
        net.train().requires_grad_(False)

        def step():
            with torch.no_grad(), autocast:
                net(x).float()

    else:  # squeeze and student: ordinary training
        net.train().requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def time_step(step, device: str, repeats: int) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default=",".join(f"{k}={v}" for k, v in WORKLOADS.items()), help="name=batch")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "arch_precision.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    workloads = {name: int(batch) for name, batch in (w.split("=") for w in args.workloads.split(","))}
    rows = []
    print(
        f"{'model':20s} {'workload':8s} {'batch':>5s} "
        + " ".join(f"{v:>9s}" for v in VARIANTS)
        + "   (ms per step; × vs fp32)"
    )
    for model_id in FULL if args.models == "full" else args.models.split(","):
        for kind, batch in workloads.items():
            x = torch.randn(batch, args.channels, args.size, args.size, device=args.device)
            y = torch.randint(0, 10, (batch,), device=args.device)
            times = {}
            for variant, (dtype, channels_last) in VARIANTS.items():
                net = build(model_id, args).to(args.device)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                net = net.to(memory_format=fmt)
                inp = x.contiguous(memory_format=fmt)
                times[variant] = time_step(workload(kind, net, inp, y, dtype, args.device), args.device, args.repeats)
            speedup = {v: times["fp32"] / t for v, t in times.items()}
            rows.append({"model": model_id, "workload": kind, "batch": batch, "seconds": times, "speedup": speedup})
            cells = " ".join(f"{times[v] * 1e3:6.1f}/{speedup[v]:.1f}" for v in VARIANTS)
            print(f"{model_id:20s} {kind:8s} {batch:5d} {cells}", flush=True)
    result = {
        "device": args.device,
        "cpu_threads": torch.get_num_threads(),
        "input": [args.channels, args.size, args.size],
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
