"""CPU threads per process: the share of the cores, explicit counts, bad values named."""

from __future__ import annotations

import pytest
import torch

from cvdd.runtime.hardware import ThreadCount, available_cores, configure_threads, threads_per_process


def test_processes_share_the_cores():
    cores = available_cores()
    assert threads_per_process(None, 1) == cores
    assert threads_per_process(None, cores) == 1
    assert threads_per_process(None, 4 * cores) == 1, "never below one thread"
    assert threads_per_process(3, 1) == threads_per_process("3", 8) == 3


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_a_bad_thread_count_names_the_key(bad):
    with pytest.raises(ValueError, match=r"hardware\.threads=.* must be a positive integer"):
        threads_per_process(bad, 1)


def test_configure_sets_the_count_now_and_in_every_rank():
    before = torch.get_num_threads()
    try:
        callback = configure_threads(1, 2)
        assert torch.get_num_threads() == 1 and isinstance(callback, ThreadCount)
        torch.set_num_threads(2)  # what a launcher may do inside a rank
        callback.setup(None, None, "fit")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
