"""Patch initialisation: every image of a class starts from its own candidates, in the difficulty's band."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
import torch

from cvdd.artifacts.patches import PatchCache
from cvdd.committee.committee import load_committee
from cvdd.data import load_dataset
from cvdd.methods.committee_voting.recover import Unit, class_blocks
from cvdd.methods.init_images import DIFFICULTIES, Initializer, PatchSettings, difficulty_band
from cvdd.stages.distill import distill

IPC = 10


@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_difficulty_bands_are_distinct_and_ordered(ipc: int, factor: int):
    scores = torch.rand(400, generator=torch.Generator().manual_seed(ipc * 10 + factor))
    mean = {}
    for difficulty in DIFFICULTIES:
        band = difficulty_band(scores, PatchSettings(ipc, difficulty, factor, candidates=400))
        assert band.shape == (ipc, factor * factor)
        assert len(band.flatten().unique()) == ipc * factor * factor, "a candidate is used twice"
        mean[difficulty] = scores[band].mean()
    assert mean["easy"] < mean["medium"] < mean["hard"]


@pytest.fixture(scope="module")
def digits_committee(teachers: Path):
    data = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    members = sorted(p.stem for p in teachers.glob("*.ckpt"))
    committee = load_committee(teachers.parents[1], "digits", members, data.classes, None, 10.0)
    return data, committee


@pytest.mark.parametrize("factor", [1, 2])
def test_every_image_of_a_class_starts_from_its_own_patches(digits_committee, tmp_path: Path, factor: int):
    """With the committee's real scores: IPC indices of one class never share a candidate (nor pixels),
    and the easy band scores lower than the medium band, which scores lower than the hard band."""
    data, committee = digits_committee
    units = [Unit(i, b, classes, (), (), i) for i in range(IPC) for b, classes in enumerate(class_blocks(10, 10))]
    mean_score = {}
    for difficulty in DIFFICULTIES:
        init = Initializer(
            "patches",
            0,
            (1, 16, 16),
            real=data.view("train"),
            patches=PatchSettings(IPC, difficulty, factor, candidates=100),
            committee=committee,
            cache=PatchCache(tmp_path, "digits", {}),  # scored once, reused by the other difficulties
        )
        images = init(units)  # (IPC, classes, C, H, W)
        scores = init._candidate_bank()["scores"]
        used = []
        for c in range(10):
            chosen = [init.patch_candidates(c, i) for i in range(IPC)]
            flat = torch.cat(chosen)
            assert len(flat.unique()) == IPC * factor * factor, f"class {c}: a candidate starts two images"
            for a, b in combinations(range(IPC), 2):
                assert not torch.equal(images[a, c], images[b, c]), f"class {c}: IPC {a} and {b} start alike"
            used.append(scores[c, flat])
        mean_score[difficulty] = torch.cat(used).mean()
    assert mean_score["easy"] < mean_score["medium"] < mean_score["hard"]


def test_patch_settings_are_checked_with_the_key_to_fix():
    with pytest.raises(ValueError, match=r"method\.recover\.init\.difficulty='medum'.*easy, medium, hard"):
        PatchSettings(10, "medum")
    with pytest.raises(ValueError, match=r"raise method\.recover\.init\.candidates to at least 200"):
        PatchSettings(50, "medium", factor=2, candidates=100)
    with pytest.raises(ValueError, match=r"method\.recover\.init\.factor=0"):
        PatchSettings(10, "medium", factor=0)


def test_distill_rejects_a_bad_difficulty_before_any_work(make_cfg, tmp_path: Path):
    """No teachers exist here: the config error must come first, not a squeeze or a missing-teacher error."""
    with pytest.raises(ValueError, match=r"method\.recover\.init\.difficulty"):
        distill(make_cfg("distill", "method.recover.init.difficulty=medum", "committee.train_missing=false"))
    with pytest.raises(ValueError, match=r"method\.recover\.init\.mode='noise'"):
        distill(make_cfg("distill", "method.recover.init.mode=noise", "committee.train_missing=false"))
    assert not (tmp_path / "artifacts").exists()


def test_ranks_score_a_share_of_the_classes_each_and_get_the_whole_bank(digits_committee, monkeypatch):
    """Two ranks simulated in turn: each scores only its classes (rank r: r, r + 2, …), the gathered bank equals the
    bank one process scores, and nothing is scored again once it is prepared."""
    import cvdd.methods.init_images as init_module

    data, committee = digits_committee
    scored: list[int] = []
    original = committee.losses
    monkeypatch.setattr(
        committee, "losses", lambda m, x, y, units: scored.append(int(y[0])) or original(m, x, y, units)
    )

    def initializer() -> Initializer:
        settings = PatchSettings(IPC, "medium", 1, candidates=20)
        return Initializer("patches", 0, (1, 16, 16), real=data.view("train"), patches=settings, committee=committee)

    whole = initializer()
    whole.prepare()
    members = len(committee.members)
    assert scored == [c for c in range(10) for _ in range(members)]
    parts = {}
    for rank in (0, 1):
        scored.clear()
        monkeypatch.setattr(init_module, "rank_and_world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(init_module, "gather_objects", lambda obj: [obj, obj] if isinstance(obj, bool) else [obj])
        shard = initializer()
        shard.prepare()
        assert sorted(set(scored)) == list(range(rank, 10, 2)), f"rank {rank} scores its own classes only"
        parts[rank] = shard._candidate_bank()
    for key in ("sources", "boxes", "scores"):
        gathered = torch.where(
            (torch.arange(10) % 2 == 0).view(-1, *[1] * (whole._bank[key].dim() - 1)), parts[0][key], parts[1][key]
        )
        assert torch.equal(gathered, whole._bank[key]), f"the ranks' shares make up one process's {key}"
    scored.clear()
    whole.patch_image(3, 0)
    assert scored == [], "prepared once: a step scores nothing"
