"""Committee maths on fixed tensors: BN loss, CE per unit, voting weights, schedules, class order."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvdd.artifacts import TeacherArtifact, save_json, save_tensors
from cvdd.committee.committee import (
    ClassOrderMismatchError,
    Committee,
    load_teacher,
    select_members,
    voting_weights,
)

R18, R50, SV2, MBV2, D121 = "resnet18", "resnet50", "shufflenetv2", "mobilenetv2", "densenet121"
POOL = [R18, R50, SV2, MBV2, D121]
# reference.md, "Committee schedule by IPC", IPC 10
PAPER_IPC10_PAIRS = [
    (R18, R50), (R18, SV2), (R18, MBV2), (R18, D121), (R50, SV2),
    (R50, MBV2), (R50, D121), (SV2, MBV2), (SV2, D121), (MBV2, D121),
]  # fmt: skip
TINY_PRIORS = {R18: 46.5, R50: 28.3, SV2: 43.6, MBV2: 44.8, D121: 41.5}


def two_bn_net() -> nn.Module:
    """BN(2) → identity 1×1 conv → BN(2) → linear: small enough to compute the BN loss by hand."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 1, bias=False)
    conv.weight.data = torch.eye(2).view(2, 2, 1, 1)
    net = nn.Sequential(nn.BatchNorm2d(2), conv, nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    net[0].running_mean.copy_(torch.tensor([0.5, -1.0]))
    net[0].running_var.copy_(torch.tensor([2.0, 0.5]))
    net[2].running_mean.copy_(torch.tensor([0.1, 0.2]))
    net[2].running_var.copy_(torch.tensor([1.5, 0.7]))
    return net.eval()


def hand_bn_term(x: torch.Tensor, mean_run: torch.Tensor, var_run: torch.Tensor) -> torch.Tensor:
    mu = x.mean(dim=(0, 2, 3))
    var = ((x - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    return torch.sqrt(((mu - mean_run) ** 2).sum()) + torch.sqrt(((var - var_run) ** 2).sum())


def test_bn_loss_and_ce_per_unit_match_hand_computation():
    net = two_bn_net()
    committee = Committee({"m": net}, {"m": 1.0}, first_bn_multiplier=10.0)
    x = torch.randn(2 * 3, 2, 3, 3, generator=torch.Generator().manual_seed(1))  # 2 units of 3 images
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ce, bn = committee.losses("m", x, labels, units=2)
    bn0, bn1 = net[0], net[2]
    for u in range(2):
        xu = x[u * 3 : (u + 1) * 3]
        first = hand_bn_term(xu, bn0.running_mean, bn0.running_var)
        second_in = (xu - bn0.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn0.running_var.view(1, -1, 1, 1) + 1e-5)
        second_in = second_in * bn0.weight.view(1, -1, 1, 1) + bn0.bias.view(1, -1, 1, 1)
        second = hand_bn_term(second_in, bn1.running_mean, bn1.running_var)
        assert bn[u].item() == pytest.approx((10 * first + second).item(), rel=1e-5)
        assert ce[u].item() == pytest.approx(F.cross_entropy(net(xu), labels[u * 3 : (u + 1) * 3]).item(), rel=1e-5)


def test_committee_is_frozen_in_eval_mode_and_stays_there():
    committee = Committee({"m": two_bn_net()}, {"m": 1.0})
    assert not any(p.requires_grad for p in committee.parameters())
    holder = nn.Module()
    holder.committee = committee
    holder.train()  # what a training loop does to its module
    committee.assert_frozen()
    committee.members["m"][0].train()  # something flipping a layer behind our back is caught
    with pytest.raises(AssertionError, match="left eval mode"):
        committee.assert_frozen()


def test_prior_voting_weights_are_softmax_of_priors_over_temperature():
    w = voting_weights([R18, R50], {R18: 63.0, R50: 65.3}, "prior", 5.0, (0, 0, 0))
    expected_r50 = 1 / (1 + math.exp(-(65.3 - 63.0) / 5))
    assert w[1] == pytest.approx(expected_r50, abs=1e-9) and sum(w) == pytest.approx(1.0)
    assert voting_weights([R18, R50, SV2], {}, "equal", 5.0, (0,)) == pytest.approx([1 / 3] * 3)
    r1 = voting_weights([R18, R50], {}, "random", 5.0, (0, 1, 0))
    assert r1 == voting_weights([R18, R50], {}, "random", 5.0, (0, 1, 0)) and sum(r1) == pytest.approx(1.0)
    assert r1 != voting_weights([R18, R50], {}, "random", 5.0, (0, 2, 0))
    with pytest.raises(ValueError, match="weighting"):
        voting_weights([R18], {}, "vote", 5.0, (0,))


def test_cycle_schedule_matches_the_paper_table_at_ipc10():
    assert select_members(POOL, 2, "cycle", 10, 0, TINY_PRIORS) == PAPER_IPC10_PAIRS
    assert select_members(POOL, 2, "auto", 10, 0, TINY_PRIORS) == PAPER_IPC10_PAIRS


def test_fixed_schedule_at_ipc1_uses_config_pair_or_top_priors():
    # CIFAR-10 / ImageNette preset pair
    assert select_members(POOL, 2, "auto", 1, 0, TINY_PRIORS, fixed=[D121, MBV2]) == [(MBV2, D121)]
    # otherwise the two highest priors (Tiny-ImageNet: ResNet18 46.5, MobileNetV2 44.8)
    assert select_members(POOL, 2, "auto", 1, 0, TINY_PRIORS) == [(R18, MBV2)]
    assert select_members([R18], 1, "fixed", 3, 0, {R18: 1.0}) == [(R18,)] * 3  # SRe2L++
    with pytest.raises(ValueError, match="must name 2 members"):
        select_members(POOL, 2, "fixed", 1, 0, TINY_PRIORS, fixed=["vgg"])


def test_random_schedule_at_ipc50_is_seeded_pairs():
    a = select_members(POOL, 2, "auto", 50, 0, TINY_PRIORS)
    assert a == select_members(POOL, 2, "random", 50, 0, TINY_PRIORS)
    assert len(a) == 50 and all(len(set(p)) == 2 and set(p) <= set(POOL) for p in a)
    assert len(set(a)) > 5, "pairs vary across IPC indices"
    assert a != select_members(POOL, 2, "random", 50, 1, TINY_PRIORS)


def test_class_order_mismatch_names_the_first_differing_class(tmp_path):
    art = TeacherArtifact(tmp_path, "digits", "convnet_small")
    net = two_bn_net()
    save_tensors(art.weights, net.state_dict())
    classes = ["n01", "n02", "n03", "n04"]
    save_json(art.record, {"num_classes": 4, "classes": classes, "net": {}, "image_size": 3, "in_chans": 2})
    with pytest.raises(ClassOrderMismatchError, match=r"first differ at class index 2: the teacher's is 'n03'"):
        load_teacher(art, ["n01", "n02", "n04", "n03"])
    with pytest.raises(ClassOrderMismatchError, match=r"now has 5; .* index 4: the teacher's is '\(none\)'"):
        load_teacher(art, [*classes, "n05"])


def test_groups_are_a_fixed_partition_and_waves_pack_whole_groups():
    from cvdd.methods.committee_voting.recover import Unit, class_blocks, plan_groups, plan_waves

    blocks = class_blocks(25, 10)
    assert [len(b) for b in blocks] == [10, 10, 5]
    units = [Unit(i, b, blk, ("a",), (1.0,), i * 10 + b) for i in range(4) for b, blk in enumerate(blocks)]
    groups = plan_groups(units, group_images=30, grouping=True)
    assert sorted((u.ipc_index, u.block) for g in groups for u in g) == sorted((u.ipc_index, u.block) for u in units)
    for group in groups:
        assert len({len(u.classes) for u in group}) == 1 and sum(len(u.classes) for u in group) <= 30
    assert plan_groups(units[::-1], 30, True) == groups, "the partition does not depend on the order units come in"
    for max_images in (30, 60, 1000):
        waves = plan_waves(groups, max_images)
        assert [g for w in waves for g in w] == groups, "waves keep groups whole and in order"
        assert all(sum(len(u.classes) for g in w for u in g) <= max_images for w in waves)
    assert plan_groups(units, 30, grouping=False) == [[u] for u in sorted(units, key=lambda u: (u.ipc_index, u.block))]


def test_recover_module_keeps_the_committee_out_of_checkpoints():
    from cvdd.methods.committee_voting.recover import RecoverModule, RecoverSettings
    from cvdd.methods.init_images import Initializer

    committee = Committee({"m": two_bn_net()}, {"m": 1.0})
    module = RecoverModule(
        committee,
        units=[],
        init_images=Initializer("gaussian", 0, (1, 4, 4)),
        settings=RecoverSettings(1, 0.1, 0.01, 0),
        pixel_range=((0.0, 0.0), (1.0, 1.0)),
        on_unit_done=lambda *a: None,
    )
    assert not [k for k in module.state_dict() if k.startswith("committee.")]
    assert any(k.startswith("committee.") for k in nn.Module.state_dict(module))
