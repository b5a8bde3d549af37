"""Recover's automatic wave size: the per-image memory estimate, the choice, and waves chosen from free memory."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch

from cvdd.committee.committee import Committee
from cvdd.committee.passes import MemberPasses
from cvdd.methods.committee_voting.memory import (
    BUDGET_FRACTION,
    HEADROOM,
    auto_group_images,
    auto_wave_images,
    image_state_bytes,
    member_bytes_per_image,
    saved_bytes,
    wave_bytes_per_image,
)
from cvdd.methods.committee_voting.recover import GroupState, RecoverSettings, Unit, step_surrogate
from cvdd.models.registry import build_model
from cvdd.runtime.precision import BF16_CL, FP32, choose_numerics

SHAPE = (1, 16, 16)
ARCHS = ("convnet", "mobilenetv2", "resnet18")


def tiny_committee(numerics) -> Committee:
    torch.manual_seed(0)
    nets = {arch: build_model(arch, 10, SHAPE[-1], SHAPE[0], width=0.25) for arch in ARCHS}
    return Committee(nets, dict.fromkeys(nets, 1.0), 10.0, dict.fromkeys(nets, numerics))


def test_the_per_image_estimate_predicts_what_a_group_saves_for_backward():
    committee = tiny_committee(FP32)
    member = {m: member_bytes_per_image(committee, m, SHAPE, "cpu") for m in committee.members}
    pairs = [("convnet", "mobilenetv2"), ("convnet", "resnet18"), ("mobilenetv2", "resnet18"), ("convnet", "resnet18")]
    units = [Unit(i, 0, tuple(range(10)), pair, (0.5, 0.5), i) for i, pair in enumerate(pairs)]
    group = GroupState(units, torch.randn(len(units), 10, *SHAPE), RecoverSettings(1, 0.1, 0.01, 2), grouping=True)
    measured = saved_bytes(lambda: step_surrogate([group], committee, 0.01, MemberPasses(1, 1)))
    predicted = sum(len(u.classes) * sum(member[m] for m in u.members) for u in units)
    # The rest: the augmentation's saved input and the group's stacking.
    assert 0.95 < measured / predicted < 1.15, (measured, predicted)


def test_bf16_members_save_about_half_the_bytes():
    fp32, bf16 = tiny_committee(FP32), tiny_committee(BF16_CL)
    for arch in ARCHS:
        ratio = member_bytes_per_image(bf16, arch, SHAPE, "cpu") / member_bytes_per_image(fp32, arch, SHAPE, "cpu")
        assert 0.4 < ratio < 0.8, (arch, ratio)


def test_auto_wave_images_fits_the_budget_within_one_group_and_all_the_work():
    per_image = 2**20
    free = 1000 * 2**20
    fits = int(BUDGET_FRACTION * free / (HEADROOM * per_image))
    assert auto_wave_images(per_image, free, smallest=100, largest=10_000) == fits
    assert auto_wave_images(per_image, free, smallest=100, largest=300) == 300
    assert auto_wave_images(per_image, free, smallest=fits + 50, largest=10_000) == fits + 50
    assert wave_bytes_per_image({"a": 10.0, "b": 5.0, "c": 1.0}, [("a", "c"), ("b", "c")], 2) == 13.0


@pytest.mark.parametrize(
    ("dataset", "size", "classes", "group"),
    [("imagenet1k", 224, 1000, 100), ("tiny_imagenet", 64, 200, 100), ("cifar100", 32, 100, 200)],
)
def test_groups_from_free_memory_fit_a_24_gb_card_in_bf16(make_cfg, dataset, size, classes, group):
    """The paper's pool in its GPU numerics (bf16, channels-last), ``method.recover.group_images=null``: the group
    chosen on a roomy device (an H200's 139 GiB free) is the one a 24 GB card takes (23 GiB free after the CUDA context
    and the weights), the largest power of two of units whose costliest pair fits that card's budget; twice as many
    would not. Tiny-ImageNet's 100-image unit alone is at the budget (18.4 GiB estimated, an upper bound): one unit,
    the floor, as ``class_block`` decides the results (the default 500 was 92 GiB)."""
    cfg = make_cfg("distill", f"dataset={dataset}", "committee=cvdd")
    assert cfg.method.recover.group_images is None
    torch.manual_seed(0)
    nets = {arch: build_model(arch, classes, size, 3) for arch in cfg.committee.members}
    numerics = {arch: choose_numerics(arch, "recover", "auto", "auto", "cuda") for arch in nets}
    committee = Committee(nets, dict.fromkeys(nets, 1.0), 10.0, numerics)
    member = {m: member_bytes_per_image(committee, m, (3, size, size), "cpu") for m in nets}
    per_image = wave_bytes_per_image(member, itertools.combinations(nets, 2), image_state_bytes((3, size, size)))
    unit = int(cfg.method.recover.class_block)
    chosen = auto_group_images(per_image, 139 * 2**30, unit)
    assert chosen == auto_group_images(per_image, 23 * 2**30, unit) == group, per_image / 2**20
    budget = BUDGET_FRACTION * 23 * 2**30
    assert budget < HEADROOM * per_image * 2 * chosen
    if chosen > unit:
        assert HEADROOM * per_image * chosen <= budget
    else:
        assert HEADROOM * per_image * chosen < 1.01 * budget


def test_group_sizes_change_the_images_by_rounding_only_and_not_the_recipe(make_cfg, workdir: Path, caplog):
    from cvdd.stages.distill import distill
    from tests.test_recover import FAST, images_of

    common = (*FAST, "ipc=4", "hardware.precision=32")
    one = distill(make_cfg("distill", *common, "set=one", "method.recover.group_images=10"))
    with caplog.at_level(logging.INFO, logger="cvdd"):
        auto = distill(make_cfg("distill", *common, "set=auto"))
    assert "method.recover.group_images=null: 40 images per group" in caplog.text, "4 units fit: one group"
    assert [u["group_images"] for u in one["units"]] == [10] * 4 and [u["group_images"] for u in auto["units"]] == [
        40
    ] * 4
    assert one["fingerprint"] == auto["fingerprint"]
    difference = (images_of(workdir, "one") - images_of(workdir, "auto")).abs().max()
    assert difference < 1e-4, "units stacked differently: the same images up to float rounding"


def test_waves_sized_from_free_memory_give_the_same_images(make_cfg, workdir: Path, caplog, monkeypatch):
    from cvdd.stages.distill import distill
    from tests.test_recover import FAST, images_of

    common = (*FAST, "ipc=3", "method.recover.group_images=10")
    with caplog.at_level(logging.INFO, logger="cvdd"):
        distill(make_cfg("distill", *common, "set=roomy"))
    assert "method.recover.wave_images=null: 30 images per wave" in caplog.text
    caplog.clear()
    monkeypatch.setattr(
        "cvdd.methods.committee_voting.recover.free_bytes", lambda device, processes=1: 0
    )  # no room: one group per wave
    with caplog.at_level(logging.INFO, logger="cvdd"):
        distill(make_cfg("distill", *common, "set=cramped"))
    assert "method.recover.wave_images=null: 10 images per wave" in caplog.text
    assert "Lower method.recover.group_images" in caplog.text
    assert sum(r.getMessage().startswith("wave ") for r in caplog.records) == 3
    assert torch.equal(images_of(workdir, "roomy"), images_of(workdir, "cramped"))


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_wave_below_one_group_is_refused(make_cfg, value):
    from cvdd.methods.committee_voting.options import RecoverOptions

    options = RecoverOptions.parse(make_cfg("distill", f"method.recover.wave_images={value}").method.recover)
    with pytest.raises(ValueError, match=rf"method\.recover\.wave_images={value} is below one image"):
        options.check()
