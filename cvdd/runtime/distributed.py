"""Multi-process training that composes with Hydra multirun sweeps.

Lightning's script launcher re-executes ``sys.argv`` for ranks ≥ 1. Under ``-m`` that argv is
the whole sweep, so every child would start a sweep of its own (Lightning #11300, Hydra #2070).
:class:`HydraDDPStrategy` instead launches each child as a single Hydra *run* of the current
job: the job's own overrides, its output folder as ``hydra.run.dir``, no config written.
:func:`isolated_job` undoes what one DDP job leaves in the parent process (the process group
and the ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` variables that would make the next job in the
sweep think it was launched externally).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch.utils.data import Sampler


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that re-runs the current Hydra job (not the sweep) for ``local_rank``."""
    from hydra.core.hydra_config import HydraConfig

    import __main__

    hc = HydraConfig.get()
    if getattr(__main__, "__spec__", None) is not None:
        command = [sys.executable, "-m", __main__.__spec__.name]
    else:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    command += list(hc.overrides.task)
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    return command, hc.runtime.cwd


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Script launcher whose children run the current Hydra job, never the sweep."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            command, cwd = hydra_job_command(local_rank)
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))


class HydraDDPStrategy(DDPStrategy):
    """DDP launched per Hydra job.

    ``wrap_model=False`` keeps the process group, launcher and distributed sampler but leaves
    the LightningModule unwrapped: recover uses it so every rank optimises its own images with
    no parameter broadcast or gradient averaging (frozen-only modules cannot be DDP-wrapped).
    A wrapped module with ``broadcast_buffers = False`` keeps its buffers out of DDP's per-step broadcast.
    """

    def __init__(self, *args, wrap_model: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.wrap_model = wrap_model

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def configure_ddp(self) -> None:
        if not self.wrap_model:
            return
        if not getattr(self.lightning_module, "broadcast_buffers", True):
            # a module that keeps its ranks' buffers in step itself (the student's BatchNorm merge) must not have
            # rank 0's copied over them before every forward
            self._ddp_kwargs["broadcast_buffers"] = False
        super().configure_ddp()


@contextmanager
def isolated_job() -> Iterator[None]:
    """Run one job so that it leaves no distributed state behind for the next job in a sweep."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``0, 1`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small: digests, scores), in rank order; ``[obj]`` without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def raise_together(error: BaseException | None, what: str) -> None:
    """Raise on every rank if ``what`` failed on any: a rank that raised alone would leave the others waiting at
    their next collective until the process group's timeout. The failing rank raises its own error."""
    _, world = rank_and_world()
    if world > 1:
        failed = torch.tensor([error is not None], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            failed = failed.cuda()
        dist.all_reduce(failed)
        if error is None and int(failed.item()):
            raise RuntimeError(f"{what} failed on {int(failed.item())} other rank(s); their log says why")
    if error is not None:
        raise error


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, …`` of ``length`` items: the ranks' shards cover every item exactly once, with
    no padding (unlike ``DistributedSampler``, which repeats items to even the shards and so biases a test
    accuracy). Shards differ in length by at most one; evaluation needs no per-step collective, so that is fine."""

    def __init__(self, length: int, rank: int, world: int):
        self.length, self.rank, self.world = length, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))
