"""How a job uses the machine: CPU threads per process (and what they mean for bitwise results), and the
numerics each network runs in (:func:`numerics_for`, the policy in :mod:`cvdd.runtime.precision`).

Each process of a job runs ``cores // processes`` intra-op threads (``hardware.threads`` or
``OMP_NUM_THREADS`` override it): two processes that each use every core of a small machine run
about 4× slower than with their share (OpenMP oversubscription).

On CPU the thread count is part of the arithmetic: oneDNN picks its convolution kernels by thread
count, and some (e.g. a 1×1 convolution over 256 channels on a 4×4 map, batch 10) sum in another
order with another count (measured here: 3.8e-5 apart). Work split across ranks is therefore
bitwise the same as in one process only at the same thread count per process; stages that resume
record the count (:func:`cpu_threads`) and refuse to mix work done at different counts.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from cvdd.artifacts import ArtifactConflictError
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError
from cvdd.runtime.precision import Numerics, choose_numerics


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` restrict)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_process(requested: int | str | None, processes: int) -> int:
    """``requested`` threads, or this machine's cores shared evenly among ``processes`` (at least one)."""
    if requested is None:
        return max(1, available_cores() // max(1, processes))
    try:
        threads = int(requested)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(
            f"hardware.threads={requested!r} must be a positive integer, or null for cores // processes "
            f"({available_cores()} cores here)"
        )
    return threads


class ThreadCount(Callback):
    """Applies the job's thread count inside every rank once the launcher has started it (Lightning's
    launcher sets its own ``cores // processes`` there, which would override an explicit count)."""

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.threads)


_LOGGED_THREADS: dict[str, tuple[int, int, int]] = {}


def configure_threads(requested: int | str | None, processes: int) -> ThreadCount:
    """Set this process's thread count now (for the work before ``fit``) and return the callback that
    sets it again in every rank."""
    threads = threads_per_process(requested, processes)
    torch.set_num_threads(threads)
    setting = (threads, available_cores(), processes)
    if setting != _LOGGED_THREADS.get("last"):  # once per process and setting (a stage may build several Trainers)
        log.info("%d CPU thread(s) per process (%d core(s), %d process(es) per node)", *setting)
        _LOGGED_THREADS["last"] = setting
    return ThreadCount(threads)


def cpu_threads(trainer: Trainer) -> int | None:
    """The thread count that CPU results depend on, ``None`` when the work runs on an accelerator."""
    return torch.get_num_threads() if isinstance(trainer.accelerator, CPUAccelerator) else None


def check_same_threads(recorded: int | None, current: int | None, what: str) -> None:
    """Refuse to finish work begun at another CPU thread count: the parts would not add up to the result
    of either count. The counts are those of each member pass (:func:`cvdd.committee.passes.threads_per_pass`);
    passes one at a time with every thread give any count back."""
    if recorded is None or current is None or recorded == current:
        return
    raise ArtifactConflictError(
        f"{what} was begun with {recorded} CPU thread(s) per process and this run has {current}; on CPU the "
        f"thread count changes the rounding of some kernels, so the parts would not match. Resume with "
        f"hardware.threads={recorded} hardware.member_threads=1, or start over with overwrite=true"
    )


def device_type(accelerator: str) -> str:
    """``cpu`` or ``cuda`` for a Trainer ``accelerator`` setting (``auto``: CUDA when one is visible)."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def numerics_for(cfg: DictConfig, arch: str, workload: str) -> Numerics:
    """The numerics of network ``arch`` (a ``build_model`` name) for ``workload`` under ``cfg.hardware``."""
    hardware = cfg.hardware
    return choose_numerics(
        arch,
        workload,
        hardware.get("precision", "auto"),
        hardware.get("channels_last", "auto"),
        device_type(str(cfg.trainer.accelerator)),
    )


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated tensors on a CUDA device, the process's maximum RSS on CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def requested_workers(requested: int | str | None) -> int | None:
    """``hardware.member_threads`` checked: ``None`` (one pass per thread) or a positive integer."""
    if requested is None:
        return None
    try:
        workers = int(requested)
    except (TypeError, ValueError):
        workers = 0
    if workers < 1:
        raise ConfigError(
            f"hardware.member_threads={requested!r} must be a positive integer, or null for one pass per CPU thread"
        )
    return workers
