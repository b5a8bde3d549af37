"""Initialisation of synthetic images: ``gaussian``, ``real`` and ``patches`` (RDED-style).

Every draw is keyed by the global seed and the unit/class, never by the order units are
processed in, so a unit starts from the same pixels on any rank, in any wave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cvdd.artifacts import ArtifactCorruptError, load_tensors, save_tensors
from cvdd.artifacts.patches import PatchCache
from cvdd.committee.committee import Committee
from cvdd.data.images import ImageSplit
from cvdd.labels.plan import crop_flip_theta, resized_crop, sample_crop_box
from cvdd.runtime import log
from cvdd.runtime.distributed import gather_objects, rank_and_world
from cvdd.runtime.errors import ConfigError, DataError
from cvdd.runtime.seeding import derive_seed

if TYPE_CHECKING:  # a type only: committee_voting imports this module
    from cvdd.methods.committee_voting.recover import Unit

INIT_MODES = ("gaussian", "real", "patches")
DIFFICULTIES = ("easy", "medium", "hard")


def class_generator(seed: int, class_index: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, class_index, salt))


REAL_ORDER_SALT = 0x4EA1


def real_image_order(targets: torch.Tensor, class_index: int, seed: int) -> torch.Tensor:
    """The class's training-image indices in one seeded order, shared by ``method=random_real`` (its first
    ``ipc``) and ``method.recover.init.mode=real`` (IPC index ``i`` starts from the ``i``-th): a recovered set with real
    initialisation starts from exactly the random-real set of the same seed, so the two compare pairwise."""
    idx = torch.nonzero(targets == class_index).flatten()
    if len(idx) == 0:
        raise DataError(f"no real training images of class {class_index}")
    return idx[torch.randperm(len(idx), generator=class_generator(seed, class_index, REAL_ORDER_SALT))]


@dataclass(frozen=True)
class PatchSettings:
    """RDED-style patch initialisation of a set with ``ipc`` images per class (``method.recover.init.*``).

    Each image takes ``factor²`` candidate crops, so a class needs ``ipc × factor²`` distinct candidates:
    the band of that many in score order (lowest CE for ``easy``, the middle for ``medium``, highest for
    ``hard``) is chosen once per class and dealt out to the IPC indices, so no two images start alike.
    """

    ipc: int
    difficulty: str = "medium"
    factor: int = 1
    candidates: int = 100
    scale: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise ConfigError(
                f"method.recover.init.difficulty={self.difficulty!r}; choose from {', '.join(DIFFICULTIES)}"
            )
        if self.factor < 1:
            raise ConfigError(f"method.recover.init.factor={self.factor} must be >= 1 (f x f crops per image)")
        if self.candidates < self.needed:
            raise ConfigError(
                f"method.recover.init.candidates={self.candidates} is too few for ipc={self.ipc} with "
                f"method.recover.init.factor={self.factor}: every image needs {self.factor}² distinct crops, "
                f"so raise method.recover.init.candidates to at least {self.needed}"
            )

    @property
    def needed(self) -> int:
        """Distinct candidate crops one class uses: ``ipc × factor²``."""
        return self.ipc * self.factor * self.factor


def difficulty_band(scores: torch.Tensor, settings: PatchSettings) -> torch.Tensor:
    """Candidate indices of one class for every IPC index: ``(ipc, factor²)``, all distinct.

    Candidates are sorted by committee cross-entropy (stable, so ties keep their draw order) and the
    ``settings.needed`` of them in the difficulty's band are taken; IPC index ``i`` gets the ``i``-th run
    of ``factor²`` inside the band.
    """
    n, needed = len(scores), settings.needed  # PatchSettings guarantees needed <= candidates == n
    start = {"easy": 0, "medium": (n - needed) // 2, "hard": n - needed}[settings.difficulty]
    order = torch.argsort(scores, stable=True)
    return order[start : start + needed].reshape(settings.ipc, settings.factor**2)


class Initializer:
    """Callable ``units → (U, B, C, H, W)`` initial images in normalised space."""

    def __init__(
        self,
        mode: str,
        seed: int,
        image_shape: tuple[int, int, int],
        real: ImageSplit | None = None,
        patches: PatchSettings | None = None,
        committee: Committee | None = None,
        cache: PatchCache | None = None,
    ):
        if mode not in INIT_MODES:
            raise ValueError(f"method.recover.init.mode={mode!r}; choose from {INIT_MODES}")
        if mode != "gaussian" and real is None:
            raise ValueError(f"method.recover.init.mode={mode} needs the real training images")
        if mode == "patches" and patches is None:
            raise ValueError(
                "method.recover.init.mode=patches needs PatchSettings (difficulty, factor, candidates, ipc)"
            )
        self.mode, self.seed, self.shape = mode, seed, image_shape
        self.real = real
        self.patches = patches
        self.committee = committee
        self.cache = cache
        self._by_class: dict[int, torch.Tensor] = {}
        self._bank: dict | None = None
        self._bands: dict[int, torch.Tensor] = {}

    def __call__(self, units: Sequence[Unit]) -> torch.Tensor:
        return torch.stack([torch.stack([self.image(u, c) for c in u.classes]) for u in units])

    def image(self, unit: Unit, class_index: int) -> torch.Tensor:
        if self.mode == "gaussian":
            gen = torch.Generator().manual_seed(derive_seed(unit.seed, class_index))
            return torch.randn(self.shape, generator=gen)
        if self.mode == "real":
            return self._real_image(class_index, unit.ipc_index)
        return self.patch_image(class_index, unit.ipc_index)

    # -- real ---------------------------------------------------------------------------------------------
    def _class_order(self, class_index: int) -> torch.Tensor:
        """The class's real images in :func:`real_image_order`: IPC index ``i`` takes the ``i``-th (no repeats)."""
        if class_index not in self._by_class:
            self._by_class[class_index] = real_image_order(self.real.targets, class_index, self.seed)
        return self._by_class[class_index]

    def _real_image(self, class_index: int, ipc_index: int) -> torch.Tensor:
        order = self._class_order(class_index)
        return self.real[int(order[ipc_index % len(order)])][0]

    # -- patches ------------------------------------------------------------------------------------------
    def _patch_pixels(self, source: int, box: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
        image = self.real[source][0].unsqueeze(0)
        theta = crop_flip_theta(torch.tensor([list(box)]), torch.tensor([False]), *image.shape[-2:])
        return resized_crop(image, theta, size)[0]

    def prepare(self) -> None:
        """Score the patch candidates before the first step (patches only), each rank a share of the classes: call
        it on every rank of a distributed run at once (recover's ``on_fit_start``)."""
        if self.mode == "patches":
            self._candidate_bank()

    def _candidate_bank(self) -> dict:
        """Candidate crops per class with committee cross-entropy scores; computed once, cached on disk. In a
        distributed run every rank takes part: each scores the classes ``rank, rank + W, …`` and all receive the
        whole bank; rank 0 writes the cache."""
        if self._bank is not None:
            return self._bank
        rank, _ = rank_and_world()
        p = self.patches
        identity = {"seed": self.seed, "candidates": p.candidates, "scale": p.scale, "sources": "distinct"}
        path = self.cache.path(identity) if self.cache else None
        if path is not None and path.is_file():
            try:
                self._bank = load_tensors(path, "it is rescored")
            except ArtifactCorruptError:  # a cache: score the candidates again and replace it
                log.warning("patch cache %s is damaged; scoring the candidates again", path)
        if not all(gather_objects(self._bank is not None)):  # one decision for all ranks: any miss rescores
            self._bank = self._score_bank()
            if path is not None and rank == 0:
                save_tensors(path, self._bank)
        return self._bank

    def _score_bank(self) -> dict:
        """Draw and score every class's candidates; a distributed run's ranks score a share of the classes each."""
        if self.committee is None:
            raise ValueError("patch initialisation needs the committee to score candidates")
        rank, world = rank_and_world()
        p = self.patches
        num_classes = int(self.real.targets.max()) + 1
        _, h, w = self.shape
        sources = torch.zeros(num_classes, p.candidates, dtype=torch.long)
        boxes = torch.zeros(num_classes, p.candidates, 4, dtype=torch.long)
        scores = torch.zeros(num_classes, p.candidates)
        device = next(self.committee.parameters()).device
        scored = {}
        for c in range(rank, num_classes, world):
            gen = class_generator(self.seed, c, 2)
            idx = torch.nonzero(self.real.targets == c).flatten()
            # distinct source images (cycled only when the class has fewer images than candidates)
            shuffled = idx[torch.randperm(len(idx), generator=gen)]
            class_sources = shuffled[torch.arange(p.candidates) % len(shuffled)]
            class_boxes = torch.tensor([sample_crop_box(gen, h, w, p.scale) for _ in range(p.candidates)])
            pairs = zip(class_sources.tolist(), class_boxes.tolist(), strict=True)
            crops = torch.stack([self._patch_pixels(s, b, (h, w)) for s, b in pairs])
            labels = torch.full((p.candidates,), c, dtype=torch.long, device=device)
            with torch.no_grad():
                ce = [
                    self.committee.losses(m, crops.to(device), labels, units=p.candidates)[0]
                    for m in self.committee.members
                ]
            scored[c] = (class_sources, class_boxes, torch.stack(ce).mean(dim=0).cpu())
        for part in gather_objects(scored):
            for c, (class_sources, class_boxes, class_scores) in part.items():
                sources[c], boxes[c], scores[c] = class_sources, class_boxes, class_scores
        return {"sources": sources, "boxes": boxes, "scores": scores}

    def patch_candidates(self, class_index: int, ipc_index: int) -> torch.Tensor:
        """The ``factor²`` candidate indices (into the class's scored bank) that image ``ipc_index`` starts from."""
        if class_index not in self._bands:
            self._bands[class_index] = difficulty_band(self._candidate_bank()["scores"][class_index], self.patches)
        return self._bands[class_index][ipc_index]

    def patch_image(self, class_index: int, ipc_index: int) -> torch.Tensor:
        bank, f = self._candidate_bank(), self.patches.factor
        _c, h, w = self.shape
        tiles = [
            self._patch_pixels(
                int(bank["sources"][class_index, j]), bank["boxes"][class_index, j].tolist(), (h // f, w // f)
            )
            for j in self.patch_candidates(class_index, ipc_index).tolist()
        ]
        rows = [torch.cat(tiles[r * f : (r + 1) * f], dim=-1) for r in range(f)]
        mosaic = torch.cat(rows, dim=-2)
        if mosaic.shape[-2:] != (h, w):
            mosaic = F.interpolate(mosaic.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0]
        return mosaic
