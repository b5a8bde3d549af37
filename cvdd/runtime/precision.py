"""Per-network numerics: bf16 autocast and channels-last where they pay, fp32 everywhere else.

Only a network's own forward (and so its backward) runs in reduced precision: synthetic images, their
optimiser state, BatchNorm statistics, losses and stored labels stay fp32, because every caller casts a
network's output back with ``.float()`` and :meth:`Numerics.forward` hands fp32 tensors in.

``hardware.precision`` picks the policy: ``32`` is plain fp32 (exact and the reference), ``bf16`` runs
every network in bf16, and ``auto`` (the default) uses bf16 + channels-last on GPUs and, on a CPU that
computes bf16 natively (AVX512-BF16 or AMX), the measured per-architecture table below; other CPUs stay
fp32. ``hardware.channels_last`` (``auto``/``true``/``false``) overrides the table's memory format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cvdd.runtime.errors import ConfigError

WORKLOADS = ("recover", "relabel", "squeeze", "student")
PRECISIONS = ("auto", "32", "bf16")


@dataclass(frozen=True)
class Numerics:
    """How one network runs: under bf16 autocast or not, with channels-last tensors or not."""

    bf16: bool = False
    channels_last: bool = False

    @property
    def tag(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + ("_cl" if self.channels_last else "")

    def prepare(self, net: nn.Module) -> nn.Module:
        """Put ``net``'s weights in this memory format (in place; weights stay fp32)."""
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net(x)`` in these numerics, as an fp32 tensor."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return net(x).float()


FP32 = Numerics()
FP32_CL = Numerics(channels_last=True)
BF16 = Numerics(bf16=True)
BF16_CL = Numerics(bf16=True, channels_last=True)

# CPU choice per architecture (``build_model`` name) and workload, read off bench/arch_precision.py on this
# project's CPU (AMD EPYC with AVX512-BF16, 2 threads, 1×28×28 inputs; recover 40 images, relabel 16, squeeze
# 128, student 16; bench/results/arch_precision.json). Speed-ups are over fp32 for that workload:
# * ResNets and the ConvNet gain from bf16 + channels-last everywhere (recover 2.4× ResNet-18, 1.6× ResNet-50,
#   3.0× ConvNet; squeeze 1.9× / 2.4× / 2.5×).
# * ShuffleNetV2 loses with bf16 and with channels-last under a gradient (recover 0.6-0.9×, training 0.6-0.8×:
#   its channel shuffles and depthwise convolutions reorder memory each block); only BSSL labelling gains, in
#   bf16 (1.1× at batch 16; 1.9× at relabel's stacked 96 images, where bf16 + channels-last gives 1.6×).
# * MobileNetV2's depthwise blocks lose with bf16 under a gradient (recover 0.8×) but gain from channels-last in
#   fp32 (recover 1.3×, training 1.5×); labelling gains most in bf16 + channels-last (1.8×, 3.1× at batch 100).
# * DenseNet gains from bf16 in contiguous format (recover 1.2×, squeeze 1.5×; channels-last adds nothing
#   through its concatenations), not at the student's batch 16 (0.9-1.0×: fp32 there).
# The paper's full-size pool, measured the same way on 3×32×32 inputs (bench/results/arch_precision_full_32px.json,
# 3 repeats), agrees with these rows for ResNet-18/50, ShuffleNetV2 and MobileNetV2, which share them with their
# small versions (ResNet-50 recover 2.5×, squeeze 4.1×; ShuffleNetV2 recover 0.5-0.7× in bf16: fp32; MobileNetV2
# recover 1.3× in fp32 channels-last). DenseNet-121 has its own row: bf16 + channels-last wins there (recover 2.1×,
# squeeze 2.4×, relabel 2.6×) and bf16 trains the student 1.7× faster. ResNet-101 was not measured; it takes the
# ResNet row. Not measured at 64 px (Tiny-ImageNet). tests/test_precision.py checks every measured row: `auto` is
# never slower than fp32.
_RESNET = {"recover": BF16_CL, "relabel": BF16_CL, "squeeze": BF16_CL, "student": BF16_CL}
_DENSENET = {"recover": BF16, "relabel": BF16_CL, "squeeze": BF16, "student": FP32}
_DENSENET121 = {"recover": BF16_CL, "relabel": BF16_CL, "squeeze": BF16_CL, "student": BF16}
CPU_TABLE: dict[str, dict[str, Numerics]] = {
    "resnet18": _RESNET,
    "resnet50": _RESNET,
    "resnet101": _RESNET,
    "convnet": _RESNET,
    "shufflenetv2": {"recover": FP32, "relabel": BF16, "squeeze": FP32, "student": FP32},
    "mobilenetv2": {"recover": FP32_CL, "relabel": BF16_CL, "squeeze": FP32_CL, "student": FP32_CL},
    "densenet": _DENSENET,
    "densenet121": _DENSENET121,
}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_numerics(arch: str, workload: str, precision: str | int, channels_last: str | bool, device: str) -> Numerics:
    """The numerics of a ``build_model`` network ``arch`` running ``workload`` on ``device`` (``cpu``/``cuda``)."""
    precision, layout = str(precision), str(channels_last).lower()
    if precision not in PRECISIONS:
        raise ConfigError(f"hardware.precision={precision!r}; choose from {', '.join(PRECISIONS)}")
    if layout not in ("auto", "true", "false"):
        raise ValueError(f"hardware.channels_last={channels_last!r}; choose auto, true or false")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    if precision == "32":
        chosen = FP32
    elif device != "cpu":
        chosen = BF16_CL
    elif precision == "bf16":
        chosen = Numerics(True, CPU_TABLE.get(arch, {}).get(workload, FP32).channels_last)
    else:
        chosen = CPU_TABLE.get(arch, {}).get(workload, FP32) if cpu_has_native_bf16() else FP32
    if layout != "auto":
        chosen = Numerics(chosen.bf16, layout == "true")
    return chosen
