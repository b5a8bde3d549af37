"""Recover's member passes: how many run at once, with how many threads, and results in job order."""

from __future__ import annotations

import threading

import pytest
import torch

from cvdd.committee.passes import MemberPasses, member_workers, plan_passes, threads_per_pass
from cvdd.runtime.trainer import build_trainer


def test_workers_default_to_one_pass_per_cpu_thread_and_one_on_a_gpu():
    assert member_workers(None, 2, "cpu") == 2
    assert member_workers(None, 1, "cpu") == 1
    assert member_workers("3", 2, "cpu") == 3
    assert member_workers(None, 16, "cuda") == member_workers(4, 16, "cuda") == 1
    assert [threads_per_pass(w, 8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    # what a stage records: passes at once and each pass's intra-op threads (none off CPU)
    assert plan_passes(None, 2) == (2, 1) and plan_passes(1, 2) == (1, 2) and plan_passes(None, None) == (1, None)
    # never more passes than members: one member alone keeps every thread, an explicit count is honoured
    assert member_workers(None, 8, "cpu", members=5) == 5 and member_workers(None, 2, "cpu", members=5) == 2
    assert plan_passes(None, 2, members=1) == (1, 2) and plan_passes(2, 2, members=1) == (2, 1)


@pytest.mark.parametrize("bad", [0, -1, "many"])
def test_a_bad_worker_count_names_the_setting(bad):
    with pytest.raises(ValueError, match=r"hardware\.member_threads"):
        member_workers(bad, 2, "cpu")
    with pytest.raises(ValueError, match=r"hardware\.member_threads"):
        member_workers(bad, 2, "cuda")  # a GPU run ignores the count but not a typo in it


def test_a_job_with_a_bad_worker_count_stops_before_any_work(make_cfg):
    with pytest.raises(ValueError, match=r"hardware\.member_threads=0 must be a positive integer"):
        build_trainer(make_cfg("distill", "hardware.member_threads=0"))


def test_passes_run_side_by_side_with_their_share_of_threads_and_return_in_job_order():
    own_threads = torch.get_num_threads()
    passes = MemberPasses(2, 4)
    together = threading.Barrier(2, timeout=10)  # passes only if two jobs are in flight at once
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(job: str) -> str:
        if job in ("a", "b"):
            together.wait()
        with lock:
            seen.append((threading.current_thread().name, torch.get_num_threads()))
        return job

    try:
        for _ in range(2):  # the second round is scheduled by the first round's times
            together.reset()
            assert passes.run(["a", "c", "b"], work, kind=lambda job: job) == ["a", "c", "b"]
    finally:
        passes.close()
    assert len(seen) == 6 and all(name.startswith("cvdd-member") and threads == 2 for name, threads in seen)
    assert torch.get_num_threads() == own_threads, "the calling thread keeps its own count"


def test_one_worker_runs_the_passes_in_the_calling_thread():
    passes = MemberPasses(1, torch.get_num_threads())
    names = passes.run([1, 2], lambda job: threading.current_thread().name, kind=lambda job: job)
    assert names == [threading.current_thread().name] * 2 and passes.pass_threads == torch.get_num_threads()
