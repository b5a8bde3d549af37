"""The epoch plan: deterministic from its seed, complete every epoch, and applied as planned."""

from __future__ import annotations

import pytest
import torch

from cvdd.labels.plan import EpochPlan, apply_batch, sample_crop_box


def plan(**kw) -> EpochPlan:
    args = {"seed": 0, "num_images": 23, "epochs": 3, "batch_size": 8, "image_size": (16, 16)} | kw
    return EpochPlan(**args)


def test_plan_is_rebuilt_identically_from_its_seed():
    a, b = plan(), plan()
    assert a.identity() == b.identity()
    for e in range(3):
        assert EpochPlan.epoch_digest(a.epoch(e)) == EpochPlan.epoch_digest(b.epoch(e))
        for x, y in zip(a.epoch(e), b.epoch(e), strict=True):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.boxes, y.boxes) and x.lam == y.lam
    for other in (plan(seed=1), plan(batch_size=4), plan(mix="mixup"), plan(epochs=4), plan(crop_scale=(0.5, 1))):
        assert other.identity() != a.identity()
    assert len({EpochPlan.epoch_digest(a.epoch(e)) for e in range(3)}) == 3, "each epoch has its own digest"
    assert EpochPlan.epoch_digest(plan(seed=1).epoch(0)) != EpochPlan.epoch_digest(a.epoch(0))


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_rows_of_a_batch_equal_those_rows_of_the_whole_batch(mix: str):
    """A rank that forwards one slice makes only its rows (from their images and mixing partners), bit for bit."""
    images = torch.randn(23, 3, 16, 16)
    for batch in plan(mix=mix).epoch(1):
        whole = apply_batch(images, batch)
        for rows in (torch.arange(0, 4), torch.arange(4, len(batch.indices)), torch.tensor([2])):
            assert torch.equal(apply_batch(images, batch, rows), whole[rows])


def test_every_epoch_covers_each_image_once_in_batches():
    p = plan()
    for e in range(3):
        batches = p.epoch(e)
        assert [len(b.indices) for b in batches] == [8, 8, 7] == [8, 8, 7][: p.batches_per_epoch()]
        assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(23))
    assert not torch.equal(p.epoch(0)[0].indices, p.epoch(1)[0].indices), "epochs are shuffled differently"
    with pytest.raises(IndexError):
        p.epoch(3)


def test_crop_boxes_lie_inside_the_image_and_cutmix_lambda_is_the_kept_area():
    for b in plan(num_images=64, batch_size=16).epoch(0):
        top, left, h, w = b.boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 16).all() and (left + w <= 16).all()
        bt, bl, bh, bw = b.mix_box
        assert b.lam == pytest.approx(1 - bh * bw / 256)
        assert bt >= 0 and bt + bh <= 16 and bl >= 0 and bl + bw <= 16


def test_apply_batch_pastes_the_partner_region_and_mixup_blends():
    images = torch.arange(23, dtype=torch.float32).view(23, 1, 1, 1).expand(23, 1, 16, 16).contiguous()
    p = plan(crop_scale=(1.0, 1.0), hflip=False)  # full-image crops: pixel values stay the image index
    batch = next(b for b in p.epoch(0) if b.mix_box[2] * b.mix_box[3] > 0)
    out = apply_batch(images, batch)
    top, left, h, _w = batch.mix_box
    src = batch.indices.float()
    assert torch.allclose(out[:, 0, top, left], src[batch.permutation], atol=1e-4)
    outside = (top + h) % 16 if top + h < 16 else (top - 1 if top > 0 else None)
    if outside is not None:
        assert torch.allclose(out[:, 0, outside, left], src, atol=1e-4)
    mix = EpochPlan(0, 23, 1, 8, (16, 16), mix="mixup", crop_scale=(1.0, 1.0), hflip=False).epoch(0)[0]
    blended = apply_batch(images, mix)[:, 0, 0, 0]
    expected = mix.lam * mix.indices.float() + (1 - mix.lam) * mix.indices.float()[mix.permutation]
    assert torch.allclose(blended, expected, atol=1e-4)


def test_crop_sampler_is_deterministic_per_generator():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_crop_box(g1, 32, 32) for _ in range(5)] == [sample_crop_box(g2, 32, 32) for _ in range(5)]


def test_bad_plan_arguments_are_named():
    with pytest.raises(ValueError, match="mix="):
        plan(mix="fmix")
    with pytest.raises(ValueError, match="batch_size=0"):
        plan(batch_size=0)
