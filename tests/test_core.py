"""Small shared pieces: micro accuracy, the cosine schedule, atomic writes, fingerprints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cvdd.artifacts import atomic_write, fingerprint, load_json, save_json
from cvdd.models.registry import build_model
from cvdd.training.metrics import (
    TopOneCounts,
    evaluate_classifier,
    last_linear,
    penultimate_features,
    set_diversity,
    topk_accuracy,
    within_class_distance,
)
from cvdd.training.optim import cosine_schedule


def test_accuracy_is_micro_not_macro():
    # 3 samples of class 0 all right, 1 sample of class 2 wrong: micro 3/4, macro (1 + 0) / 2
    logits = torch.tensor([[5.0, 1, 0], [5.0, 1, 0], [5.0, 1, 0], [5.0, 1, 0]])
    labels = torch.tensor([0, 0, 0, 2])
    assert topk_accuracy(3, 1)(logits, labels).item() == pytest.approx(0.75)
    assert topk_accuracy(3, 2)(logits, labels).item() == pytest.approx(0.75)  # class 2 ranks third
    assert topk_accuracy(3, 3)(logits, labels).item() == pytest.approx(1.0)
    assert topk_accuracy(3, 5).top_k == 3


def test_the_curve_and_the_final_pass_report_the_same_accuracy_exactly():
    """109 of 360 right: the per-evaluation counts give the final pass's float64 109/360, not a float32 ratio (which
    differs from it in the 7th digit and made a curve's best disagree with the final top-1)."""
    labels = torch.arange(360) % 10
    logits = torch.nn.functional.one_hot((labels + (torch.arange(360) >= 109).long()) % 10, 10).float()
    counts = TopOneCounts()
    for batch in range(0, 360, 50):
        counts.update(logits[batch : batch + 50], labels[batch : batch + 50])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, labels), batch_size=64)
    final = evaluate_classifier(torch.nn.Identity(), loader, 10)
    assert counts.compute() == final["top1"] == 100.0 * 109 / 360 != 100.0 * float(torch.tensor(109 / 360))


def test_evaluation_runs_the_net_on_the_given_device_and_puts_it_back():
    """After ``Trainer.fit`` on a GPU Lightning leaves the module on the CPU; the final pass must move the net to the
    device its batches go to (it failed with 'Input type (torch.cuda.FloatTensor) and weight type
    (torch.FloatTensor)' on an H200) and leave it where it found it."""

    class Placed(torch.nn.Linear):
        moves: list = []

        def to(self, *args, **kwargs):
            self.moves.append(torch.device(args[0]))
            return super().to(*args, **kwargs)

    net = Placed(4, 3).double()  # where it lives: the CPU, in float64 (a dtype move would be visible)
    loader = [(torch.randn(5, 4, dtype=torch.float64), torch.arange(5) % 3)]
    evaluate_classifier(net.train(), loader, 3, device="cpu")
    assert net.moves == [torch.device("cpu"), torch.device("cpu")]  # to the pass's device, then back home
    assert net.training and net.weight.dtype == torch.float64


def test_cosine_schedule_with_warmup_and_stretch():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_schedule(opt, total_steps=4, stretch=2.0)  # η = 2: ends half way down the cosine
    factors = [sched.lr_lambdas[0](s) for s in range(5)]
    assert factors[4] == pytest.approx(0.5) and factors[0] == 1.0
    with pytest.raises(ValueError, match="stretch"):
        cosine_schedule(opt, total_steps=4, stretch=0)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path):
    target = tmp_path / "sub" / "a.json"
    save_json(target, {"x": 1})

    def boom(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, boom)
    assert load_json(target) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_fingerprint_ignores_key_order_but_not_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_within_class_distance_is_the_mean_pairwise_distance_per_class():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has one image: left out
    # class 0: one pair at 5; class 1: pairs at 1, 1, 0 → 2/3
    assert within_class_distance(x, labels) == pytest.approx((5 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="at least two images"):
        within_class_distance(x[:1], labels[:1])


def test_set_diversity_is_zero_for_copies_and_grows_with_differences():
    torch.manual_seed(0)
    net = build_model("convnet", 3, 16, 1, width=0.25)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    copies = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8).repeat_interleave(2, 0)
    varied = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    same = set_diversity(copies, labels, {"convnet": net}, [0.5], [0.25])
    assert same["pixels"] == 0 and same["features"] == pytest.approx(0, abs=1e-6)
    other = set_diversity(varied, labels, {"convnet": net}, [0.5], [0.25])
    assert other["pixels"] > 0.2 and other["features"] > 0.01
    assert penultimate_features(net, [torch.zeros(5, 1, 16, 16)]).shape == (5, last_linear(net).in_features)
    assert net.training  # restored
