"""BSSL: batch statistics during relabelling, teachers bit-identical afterwards."""

from __future__ import annotations

import copy

import pytest
import torch

from cvdd.labels.bssl import batch_statistics, soft_label_logits, stat_groups
from cvdd.labels.module import stack_batches
from cvdd.labels.plan import EpochPlan
from cvdd.models import build_model
from cvdd.runtime.precision import FP32, FP32_CL


def teacher(arch: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(arch, 10, 16, 1, width=0.25)
    net.train()
    with torch.no_grad():  # give the running statistics non-trivial values
        for _ in range(3):
            net(torch.randn(8, 1, 16, 16) * 2 + 1)
    return net.eval()


def test_bssl_uses_batch_statistics_and_leaves_the_teacher_bit_identical():
    net = teacher()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 1, 16, 16)
    logits = soft_label_logits({"t": net}, {"t": 1.0}, x, bssl=True)
    reference = copy.deepcopy(net).train()
    with torch.no_grad():
        expected = reference(x)  # a train-mode copy normalises by the batch's own statistics
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, net(x), atol=1e-3), "eval-mode labels differ from BSSL labels"
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running stats / weights must not change"
    assert not any(m.training for m in net.modules()), "teacher back in eval mode"


def test_halves_take_statistics_over_each_half_and_weights_combine_teachers():
    net = teacher()
    x = torch.randn(16, 1, 16, 16)
    halves = soft_label_logits({"t": net}, {"t": 1.0}, x, halves=True)
    with batch_statistics(net):
        first = net(x[:8])
    assert torch.allclose(halves[:8], first, atol=1e-5)
    assert not torch.allclose(halves, soft_label_logits({"t": net}, {"t": 1.0}, x), atol=1e-4)

    other = build_model("convnet", 10, 16, 1, width=0.25).eval()
    combined = soft_label_logits({"a": net, "b": other}, {"a": 0.7, "b": 0.3}, x)
    parts = [soft_label_logits({n: m}, {n: 1.0}, x) for n, m in (("a", net), ("b", other))]
    assert torch.allclose(combined, 0.7 * parts[0] + 0.3 * parts[1], atol=1e-5)
    assert torch.allclose(soft_label_logits({"t": net}, {"t": 1.0}, x, bssl=False), net(x), atol=1e-6)


def train_mode_logits(net: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The reference: a copy of the teacher with its BatchNorm layers (only: no dropout) in train mode, forwarded
    one batch at a time."""
    reference = copy.deepcopy(net).eval()
    for module in reference.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    with torch.no_grad():
        return torch.cat([reference(b) for b in batches])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("arch", ["resnet18", "densenet", "mobilenetv2", "shufflenetv2"])  # densenet: timm's BN+act
def test_stacked_batches_are_normalised_batch_by_batch(channels_last, arch):
    net = teacher(arch)
    numerics = {"t": FP32_CL if channels_last else FP32}
    torch.manual_seed(1)
    batches = [torch.randn(16, 1, 16, 16) * (1 + i) for i in range(3)]  # batches with different statistics
    stacked = soft_label_logits({"t": net}, {"t": 1.0}, torch.cat(batches), numerics=numerics, batch_sizes=[16] * 3)
    assert torch.allclose(stacked, train_mode_logits(net, batches), atol=1e-4)
    whole = soft_label_logits({"t": net}, {"t": 1.0}, torch.cat(batches))
    assert not torch.allclose(stacked, whole, atol=1e-2), "one batch of 48 would mix the three batches' statistics"


def test_stacked_halves_and_uneven_sizes_split_as_released():
    net = teacher()
    torch.manual_seed(2)
    batches = [torch.randn(9, 1, 16, 16), torch.randn(9, 1, 16, 16) * 3]  # odd: halves of n // 2 = 4, then 5
    stacked = soft_label_logits({"t": net}, {"t": 1.0}, torch.cat(batches), halves=True, batch_sizes=[9, 9])
    halves = [half for b in batches for half in (b[: len(b) // 2], b[len(b) // 2 :])]
    assert [len(h) for h in halves] == [4, 5, 4, 5]
    assert torch.allclose(stacked, train_mode_logits(net, halves), atol=1e-4)
    assert stat_groups([16, 4], halves=True) == [8, 8, 2, 2] and stat_groups([16, 4], halves=False) == [16, 4]


def test_stack_batches_packs_consecutive_batches_of_one_size():
    plan = EpochPlan(0, 100, 1, 16, (16, 16), "cutmix", (0.08, 1.0), False)
    batches = plan.epoch(0)
    assert [len(b.indices) for b in batches] == [16] * 6 + [4]
    stacks = stack_batches(batches, 64)
    assert [[len(b.indices) for b in s] for s in stacks] == [[16] * 4, [16] * 2, [4]]
    assert [b for s in stacks for b in s] == batches, "plan order kept"
    assert [len(s) for s in stack_batches(batches, 8)] == [1] * 7, "a batch above the limit goes alone"


def test_an_unknown_batch_norm_subclass_is_refused_not_guessed():
    class ScaledBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), ScaledBN(4))
    with pytest.raises(TypeError, match="BSSL does not know what ScaledBN does"), batch_statistics(net):
        pass
