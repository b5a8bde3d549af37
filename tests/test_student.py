"""Validate's training semantics as released: micro-batches, weight decay on weights only, best and final top-1."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cvdd.labels.plan import EpochPlan, apply_batch
from cvdd.models import build_model
from cvdd.training.student import StudentModule, decay_groups, kd_loss

NUM_CLASSES, SIZE, BATCH = 4, 8, 16


def make_student(micro_batches: int, num_images: int = 24) -> tuple[StudentModule, torch.Tensor, EpochPlan]:
    torch.manual_seed(0)
    net = build_model("convnet", NUM_CLASSES, SIZE, 1, width=0.125, depth=2)
    images = torch.randn(num_images, 1, SIZE, SIZE)
    teacher = torch.randn(num_images * 100, NUM_CLASSES)  # any fixed logits per (epoch, batch) position
    plan = EpochPlan(0, num_images, 1, BATCH, (SIZE, SIZE))

    def soft(_epoch, b, batch, _x):
        return teacher[b * BATCH : b * BATCH + len(batch.indices)]

    module = StudentModule(
        net,
        images=images,
        targets=torch.zeros(num_images, dtype=torch.long),
        plan=plan,
        soft_labels=soft,
        temperature=20.0,
        lr=1e-2,
        weight_decay=0.01,
        stretch=1.0,
        micro_batches=micro_batches,
    )
    return module, teacher, plan


def fit_steps(module: StudentModule, steps: int) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(range(module.plan.batches_per_epoch()), batch_size=None))


@pytest.mark.parametrize("batch_index", [0, 1])  # a full batch of 16, then the last batch of 8
def test_micro_batches_equal_the_released_loop(batch_index: int):
    """Slices of 8 forwarded one after another, each loss / 2, one AdamW step (decay on weights only)."""
    module, teacher, plan = make_student(micro_batches=2)
    reference = copy.deepcopy(module.net)
    fit_steps(module, batch_index + 1)

    optimizer = torch.optim.AdamW(decay_groups(reference, 0.01), lr=1e-2)
    for b in range(batch_index + 1):
        batch = plan.epoch(0)[b]
        x = apply_batch(module.images, batch)
        target = teacher[b * BATCH : b * BATCH + len(x)]
        optimizer.zero_grad()
        for start in range(0, len(x), BATCH // 2):  # the released loop: small_bs = batch_size // accumulation
            out = reference(x[start : start + BATCH // 2])
            (kd_loss(out, target[start : start + BATCH // 2], 20.0) / 2).backward()
        optimizer.step()
        for group in optimizer.param_groups:  # the cosine factor of the next step, as the module's scheduler
            group["lr"] = 1e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (b + 1) / 2)).item())

    for (name, mine), theirs in zip(module.net.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6), name


def test_one_forward_of_sixteen_is_not_the_same_as_two_of_eight():
    """Student BatchNorm sees 8 images per slice: the running statistics show it."""
    whole, _, _ = make_student(micro_batches=1)
    sliced, _, _ = make_student(micro_batches=2)
    fit_steps(whole, 1)
    fit_steps(sliced, 1)
    bn = "features.1.running_var"
    assert not torch.allclose(whole.net.state_dict()[bn], sliced.net.state_dict()[bn])


def test_micro_batches_must_divide_the_planned_batch():
    with pytest.raises(ValueError, match=r"validate\.micro_batches=3 .*\(relabel\.batch_size=16\)"):
        make_student(micro_batches=3)


def test_weight_decay_skips_normalisation_and_biases():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decayed, plain = decay_groups(net, 0.01)
    assert {id(p) for p in decayed["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in plain["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    (everything,) = decay_groups(net, 0.01, decay_all=True)
    assert len(everything["params"]) == 6 and everything["weight_decay"] == 0.01
