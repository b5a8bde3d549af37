"""The distilled set's writer: pieces streamed into ``images.pt`` one at a time, PNGs exported per rank."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

import cvdd.artifacts.distilled as distilled
from cvdd.artifacts import file_digest, load_tensors
from cvdd.artifacts.distilled import DistilledArtifact, SetPiece, png_files, read_images, write_set

NAMES = ["zero", "one", "two"]
MEAN, STD = [0.5], [0.25]


def unit_pieces(alive: list[weakref.ref]) -> list[SetPiece]:
    """Three units of one IPC index each, in IPC-major order (as recover finishes them); every load makes a new
    tensor and checks that no earlier piece is still held."""

    def loader(ipc_index: int):
        def load() -> torch.Tensor:
            assert all(ref() is None for ref in alive), "an earlier piece is still in memory"
            images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(ipc_index)).clamp(-2, 2)
            alive.append(weakref.ref(images))
            return images

        return load

    return [SetPiece(torch.arange(3), torch.full((3,), i), loader(i)) for i in range(3)]


def test_pieces_are_streamed_into_a_class_major_file_one_at_a_time(tmp_path: Path):
    artifact = DistilledArtifact(tmp_path, "digits", "streamed")
    stale = artifact.folder / "0009_old" / "0000.png"  # left by an earlier set: not part of this one
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    alive: list[weakref.ref] = []
    manifest = write_set(
        artifact, unit_pieces(alive), class_names=NAMES, mean=MEAN, std=STD, seed=0, fields={"method": "test"}
    )

    saved = load_tensors(artifact.tensors, "test")
    whole = torch.cat(
        [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(i)).clamp(-2, 2) for i in range(3)]
    )
    labels, ipc_index = torch.arange(3).repeat(3), torch.arange(3).repeat_interleave(3)
    order = torch.argsort(labels * 3 + ipc_index)
    assert torch.equal(saved["images"], whole[order])
    assert saved["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert saved["ipc_index"].tolist() == [0, 1, 2] * 3
    pngs = [name for name in manifest["files"] if name != "grid.png" and name.endswith(".png")]
    assert len(pngs) == 9 and "0009_old/0000.png" not in manifest["files"]
    for name in ("images.pt", "grid.png", *pngs):
        assert manifest["files"][name] == file_digest(artifact.folder / name), f"{name} is recorded as written"
    assert manifest["images"] == 9 and manifest["method"] == "test"
    names, _, _ = png_files(manifest["files"])
    pixels = read_images(artifact, manifest, "png", lambda _: True)
    expected = distilled.to_pixels(whole[order], MEAN, STD)
    assert names == pngs and torch.equal(pixels, expected), "the PNGs hold the images in the file's order"


def test_same_pieces_give_the_same_bytes(tmp_path: Path):
    digests = []
    for name in ("a", "b"):
        artifact = DistilledArtifact(tmp_path, "digits", name)
        digests.append(
            write_set(artifact, unit_pieces([]), class_names=NAMES, mean=MEAN, std=STD, seed=0, fields={})["files"][
                "images.pt"
            ]
        )
    assert digests[0] == digests[1]


def test_a_rank_exports_its_share_of_the_pngs_and_leaves_the_rest_to_rank_0(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(distilled, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(distilled, "gather_objects", lambda obj: [{}, obj])
    artifact = DistilledArtifact(tmp_path, "digits", "rank1")
    assert write_set(artifact, unit_pieces([]), class_names=NAMES, mean=MEAN, std=STD, seed=0, fields={}) == {}
    written = sorted(p.relative_to(artifact.folder).as_posix() for p in artifact.folder.rglob("*.png"))
    assert written == ["0000_zero/0001.png", "0001_one/0001.png", "0002_two/0001.png"], "piece 1 of 3, and no more"
    assert not artifact.tensors.exists() and not artifact.manifest.exists()


def test_a_failed_fill_leaves_no_tensor_file(tmp_path: Path):
    artifact = DistilledArtifact(tmp_path, "digits", "broken")
    pieces = unit_pieces([])
    calls = {"n": 0}

    def fail_late() -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 1:  # the PNG export passes; filling images.pt fails
            raise OSError("disk full")
        return torch.zeros(3, 1, 8, 8)

    pieces[2] = SetPiece(pieces[2].labels, pieces[2].ipc_index, fail_late)
    with pytest.raises(OSError, match="disk full"):
        write_set(artifact, pieces, class_names=NAMES, mean=MEAN, std=STD, seed=0, fields={})
    assert not artifact.tensors.exists() and not list(artifact.folder.glob(".images.pt.*"))
    assert not artifact.manifest.exists()


def test_large_images_are_shown_at_most_112_px_in_the_grid():
    from cvdd.artifacts.grid import LABEL_WIDTH, MAX_TILE, distilled_grid

    pixels = torch.stack([torch.full((3, 224, 224), 40 * (k + 1), dtype=torch.uint8) for k in range(4)])
    labels, ipc_index = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    grid = distilled_grid(pixels, labels, ipc_index, ["a", "b"])
    assert (grid.width, grid.height) == (LABEL_WIDTH + 2 * (MAX_TILE + 2) + 2, 2 * (MAX_TILE + 2) + 2)
    tile = grid.crop((LABEL_WIDTH + 2 + MAX_TILE + 2, 2, LABEL_WIDTH + 2 * (MAX_TILE + 2), MAX_TILE + 2))
    assert tile.getcolors() == [(MAX_TILE * MAX_TILE, (80, 80, 80))], "class 0, IPC 1: its own pixels, downscaled"
