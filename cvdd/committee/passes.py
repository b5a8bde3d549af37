"""Member passes, one after another or side by side in worker threads: recover's (one member's forward and
input gradient over its units) and relabel's (one teacher's logits).

A CPU-sized member at recover's batch (tens of 28-px images) keeps two intra-op threads only partly busy:
on this project's 2-core machine the five ``small`` members ran 1.39× faster as two threads of one
intra-op thread each than one after another with two (40 images per member; 1.52× at 10, 1.10× at 200).
Each pass computes its own gradient (``torch.autograd.grad``) and the caller sums them in a fixed order,
so results do not depend on which thread finished first. Autocast and the committee's BN capture are
thread-local, so passes of different members, or of one member on different groups, do not meet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from cvdd.runtime.hardware import requested_workers

Job = TypeVar("Job")
Result = TypeVar("Result")


def member_workers(requested: int | str | None, threads: int, device_type: str, members: int | None = None) -> int:
    """Passes run at once: ``requested``, or on CPU every thread its own pass (``threads``) but no more than the
    stage's distinct ``members`` (counted over the whole set, so every rank and resume agrees; one member alone —
    SRe2L++, a prior's measurement — keeps every thread in its one pass instead of leaving all but one idle);
    one on a GPU."""
    workers = requested_workers(requested)
    if device_type != "cpu":
        return 1
    if workers is None:
        return max(1, min(threads, members or threads))
    return workers


def threads_per_pass(workers: int, threads: int) -> int:
    """Intra-op threads of each pass when ``workers`` passes share ``threads``: what a pass's rounding depends on."""
    return max(1, threads // workers)


def plan_passes(requested: int | str | None, threads: int | None, members: int | None = None) -> tuple[int, int | None]:
    """``(passes at once, intra-op threads of each pass)`` for a stage whose processes run ``threads`` CPU
    threads over ``members`` distinct members; ``threads`` ``None`` (not on CPU) gives one pass at a time and no
    count to record."""
    if threads is None:
        return member_workers(requested, 1, "cuda"), None
    workers = member_workers(requested, threads, "cpu", members)
    return workers, threads_per_pass(workers, threads)


class MemberPasses:
    """Runs a step's passes: in order with every intra-op thread (``workers`` 1), or ``workers`` at a time, each
    in a thread of ``threads // workers`` intra-op threads, the costliest first (last step's times)."""

    def __init__(self, workers: int, threads: int):
        self.workers = workers
        self.pass_threads = threads_per_pass(workers, threads)
        self._pool = (
            ThreadPoolExecutor(workers, "cvdd-member", initializer=torch.set_num_threads, initargs=(self.pass_threads,))
            if workers > 1
            else None
        )
        self._seconds: dict[Hashable, float] = {}

    def run(self, jobs: Sequence[Job], work: Callable[[Job], Result], kind: Callable[[Job], Hashable]) -> list[Result]:
        """``[work(job) for job in jobs]``, in the order of ``jobs`` whichever ran first; ``kind`` names a job's
        cost class (its member) for the scheduling."""
        if self._pool is None:
            return [work(job) for job in jobs]

        def timed(job: Job) -> Result:
            started = time.perf_counter()
            result = work(job)
            self._seconds[kind(job)] = time.perf_counter() - started
            return result

        order = sorted(range(len(jobs)), key=lambda i: -self._seconds.get(kind(jobs[i]), float("inf")))
        futures = {i: self._pool.submit(timed, jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
