"""The student under DDP: each rank forwards its share of every step's slices and the result is one process's."""

from __future__ import annotations

import copy
import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_cli

from cvdd.labels.plan import apply_batch
from cvdd.models import build_model
from cvdd.runtime.distributed import ShardSampler
from cvdd.training.bn_merge import BatchNormMerge
from cvdd.training.student import rank_slices


def test_rank_slices_cover_a_batch_once_in_contiguous_rank_blocks():
    for count, size, world in [(16, 8, 2), (16, 2, 8), (16, 8, 8), (4, 8, 2), (16, 4, 3), (10, 5, 1)]:
        blocks = [rank_slices(count, size, r, world) for r in range(world)]
        flat = [s for block in blocks for s in block]
        assert flat == [(start, min(start + size, count)) for start in range(0, count, size)], (count, size, world)
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert rank_slices(16, 8, 1, 2) == [(8, 16)] and rank_slices(4, 8, 0, 2) == []  # a short last batch: one slice


def test_shard_sampler_covers_every_item_once_without_padding():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11)) and [len(s) for s in shards] == [4, 4, 3]
    assert len(ShardSampler(11, 2, 3)) == 3


@pytest.mark.parametrize("rank", [0, 1])
def test_each_of_two_ranks_forwards_its_own_slice_of_a_batch(rank: int, monkeypatch: pytest.MonkeyPatch):
    """Rank r of 2 forwards only the r-th slice of 8 images (made from its own rows), with its loss counted twice;
    the two ranks' losses average to the one-process loss."""
    from test_student import make_student

    module, _, plan = make_student(micro_batches=2)
    whole = module.training_step(torch.tensor(0), 0)
    seen: list[torch.Tensor] = []
    module.net.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    monkeypatch.setattr("cvdd.training.student.rank_and_world", lambda: (rank, 2))
    mine = module.training_step(torch.tensor(0), 0)
    (x,) = seen
    rows = torch.arange(8 * rank, 8 * rank + 8)
    assert torch.equal(x, apply_batch(module.images, plan.epoch(0)[0], rows)) and module.forwards == 1
    other = 1 - rank
    monkeypatch.setattr("cvdd.training.student.rank_and_world", lambda: (other, 2))
    theirs = module.training_step(torch.tensor(0), 0)
    assert ((mine + theirs) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("rank", [0, 1])
def test_with_ddp_split_batches_each_rank_takes_whole_planned_batches(rank: int, monkeypatch: pytest.MonkeyPatch):
    """``validate.ddp_split=batches``, 2 ranks, 40 images in planned batches of 16, 16 and 8 (slices of 8): step s
    gives rank r batch 2s + r whole (all its slices, its loss unscaled, so DDP's average is the mean over the two
    batches), an epoch has 2 steps, and on the last step the second rank idles with a zero loss."""
    from test_student import make_student

    module, _, plan = make_student(micro_batches=2, num_images=40)
    module.hparams.ddp_split = "batches"
    one_process = [module.training_step(torch.tensor(b), 0) for b in range(3)]  # world 1: batch b at step b
    monkeypatch.setattr("cvdd.training.student.rank_and_world", lambda: (rank, 2))
    assert len(module.train_dataloader()) == 2, "3 batches over 2 ranks: 2 steps"
    seen: list[torch.Tensor] = []
    module.net.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    loss = module.training_step(torch.tensor(0), 0)
    assert module.forwards == 2 and loss.item() == pytest.approx(one_process[rank].item(), rel=1e-6)
    rows = torch.cat(seen)
    assert torch.equal(rows, apply_batch(module.images, plan.epoch(0)[rank])), "its own planned batch, whole"
    last = module.training_step(torch.tensor(1), 0)
    if rank == 0:
        assert module.forwards == 1 and last.item() == pytest.approx(one_process[2].item(), rel=1e-6)
    else:
        assert module.forwards == 0 and last.item() == 0.0


def test_an_unknown_ddp_split_is_refused():
    from test_student import make_student

    module, _, plan = make_student(micro_batches=2)
    with pytest.raises(ValueError, match=r"validate\.ddp_split='rows'; choose from slices, batches"):
        type(module)(
            module.net,
            images=module.images,
            targets=module.targets,
            plan=plan,
            soft_labels=None,
            ddp_split="rows",
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_worker(rank: int, world: int, port: int, slices: torch.Tensor, counts: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = build_model("convnet", 4, 8, 1, width=0.125, depth=2)
    merge = BatchNormMerge(net)
    merge.snapshot()
    first = sum(counts[:rank])
    for x in slices[first : first + counts[rank]]:  # this rank's contiguous block of the step's slices
        net(x)
    merge.merge(counts[rank])
    torch.save({k: v for k, v in net.state_dict().items() if "running" in k or "tracked" in k}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("counts", [[1, 1], [2, 1], [0, 2]])
def test_batchnorm_merge_gives_the_running_statistics_of_one_process(tmp_path: Path, counts: list[int]):
    slices = torch.randn(sum(counts), 8, 1, 8, 8) * 3 + 1
    mp.spawn(merge_worker, args=(2, free_port(), slices, counts, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = build_model("convnet", 4, 8, 1, width=0.125, depth=2)
    reference = copy.deepcopy(net)
    for x in slices:  # one process: every slice in order
        reference(x)
    expected = {k: v for k, v in reference.state_dict().items() if "running" in k or "tracked" in k}
    for rank in range(2):
        merged = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for key, value in expected.items():
            assert torch.allclose(merged[key].double(), value.double(), rtol=1e-6, atol=1e-7), (rank, key)
        assert merged.keys() == expected.keys()
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in expected.items()), "the slices moved the stats"


def test_batchnorm_without_momentum_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, momentum=None))
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNormMerge(net)


CHAIN = ("ipc=2", "method.recover.init.mode=real", "relabel.epochs=3", "relabel.batch_size=8", "hardware.threads=1")


def run_record(logs: Path) -> tuple[dict, list[float]]:
    """A run's result.json and the loss it logged at every step."""
    (result,) = logs.rglob("result.json")
    (metrics,) = logs.rglob("metrics.csv")
    with metrics.open() as fh:
        rows = list(csv.DictReader(fh))
    return json.loads(result.read_text()), [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_ddp_cpu_student_equals_one_process_at_the_same_thread_count(workdir: Path):
    """Two ranks each forward one of the two slices of every planned batch (20 images in batches of 8: the last
    batch of 4 is one slice, so one rank idles on it): the same loss at every step and the same test top-1 and
    top-5 after every epoch as one process forwarding both slices."""
    run_cli(
        "distill.py",
        "ipc=2",
        "method.recover.iterations=2",
        "method.recover.init.mode=real",
        "logger=none",
        cwd=workdir,
    )
    run_cli("relabel.py", *CHAIN, "logger=none", cwd=workdir)
    student = (*CHAIN, "validate.micro_batches=2", "validate.eval_every=1", "logger=csv")
    run_cli("evaluate.py", *student, "paths.logs=one", cwd=workdir)
    run_cli("evaluate.py", *student, "hardware=ddp_cpu", "paths.logs=two", cwd=workdir)
    (single, single_loss), (ddp, ddp_loss) = run_record(workdir / "one"), run_record(workdir / "two")
    assert len(single_loss) == len(ddp_loss) == 9  # 3 epochs of 3 planned batches
    assert ddp_loss == pytest.approx(single_loss, rel=1e-6, abs=1e-7)
    assert single["test_top1_curve"] == ddp["test_top1_curve"] and len(ddp["test_top1_curve"]) == 3
    assert (single["test_top1"], single["test_top5"]) == (ddp["test_top1"], ddp["test_top5"])
    assert ddp["test_samples"] == single["test_samples"] == 360, "each test image counted once over both ranks"


def evaluate_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from cvdd.training.metrics import evaluate_classifier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = build_model("convnet", 7, 8, 1, width=0.125, depth=2)
    data = TensorDataset(torch.randn(101, 1, 8, 8), torch.randint(0, 7, (101,)))
    loader = DataLoader(data, batch_size=16, sampler=ShardSampler(len(data), rank, world))
    torch.save(evaluate_classifier(net, loader, 7, distributed=True), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_distributed_evaluation_equals_one_process_on_the_test_set(tmp_path: Path):
    """101 test images over 3 ranks (34 + 34 + 33, nothing padded): every rank reports the one-device numbers."""
    from torch.utils.data import DataLoader, TensorDataset

    from cvdd.training.metrics import evaluate_classifier

    mp.spawn(evaluate_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    torch.manual_seed(0)
    net = build_model("convnet", 7, 8, 1, width=0.125, depth=2)
    data = TensorDataset(torch.randn(101, 1, 8, 8), torch.randint(0, 7, (101,)))
    one = evaluate_classifier(net, DataLoader(data, batch_size=16), 7)
    assert one["samples"] == 101
    for rank in range(3):
        assert torch.load(tmp_path / f"{rank}.pt") == one
