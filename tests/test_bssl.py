"""BSSL: batch statistics during relabelling, teachers bit-identical afterwards."""

from __future__ import annotations

import copy

import torch

from cvdd.bssl import batch_statistics, soft_label_logits
from cvdd.models import build_model


def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("resnet18", 10, 16, 1, width=0.25)
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
