"""LightningDataModule over the dataset registry (used to squeeze teachers on real data)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from cvdd.data.registry import ImageDataset, dataset_spec, load_dataset
from cvdd.data.spec import DatasetSpec
from cvdd.runtime.seeding import derive_seed


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """The training order of one epoch, from ``(seed, epoch)`` only, this rank's share of it, as ``(epoch, index)``
    keys for :class:`EpochKeyedImages`. A run resumed at an epoch boundary (Lightning calls :meth:`set_epoch`
    before each epoch) sees what an uninterrupted run sees; the shares of ``W`` ranks are padded to equal
    length by repeating the start of the order, like ``DistributedSampler``."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return math.ceil(self.size / self._rank_world()[1])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self._rank_world()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A3F))
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: len(self) * world - len(order)]
        return iter([(self.epoch, i) for i in order[rank::world]])


class EpochKeyedImages(Dataset):
    """Item ``(epoch, index)`` of a dataset with its random augmentation drawn from ``(seed, epoch, index)``:
    the same in any process, worker, rank or resumed run."""

    def __init__(self, images: Dataset, seed: int):
        self.images, self.seed = images, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        torch.default_generator.manual_seed(derive_seed(self.seed, epoch, index))  # CPU transforms draw from it
        return self.images[index]


class ImageDataModule(L.LightningDataModule):
    """Real train/test data with the squeeze augmentation; the test split doubles as validation.

    The spec (classes, size, channels) is known before any data is read, so models can be
    built first; the class order is available after :meth:`setup`.
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__()
        self.dataset_cfg = dict(dataset)
        self.spec: DatasetSpec = dataset_spec(self.dataset_cfg)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.data: ImageDataset | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place a download may happen.
        if self.dataset_cfg.get("download"):
            load_dataset(self.dataset_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = load_dataset(self.dataset_cfg)
            self.train_set = self.data.view("train", augment=True)
            self.test_set = self.data.view("test")

    @property
    def classes(self) -> list[str]:
        if self.data is None:
            raise RuntimeError("call setup() before asking for the class order")
        return self.data.classes

    def _loader(self, dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled and augmented per ``(seed, epoch, sample)``, sharded over ranks by the sampler itself (the
        trainer's ``use_distributed_sampler`` is off in ``train.yaml``)."""
        keyed = EpochKeyedImages(self.train_set, self.seed)
        return self._loader(keyed, self.batch_size, EpochSeededSampler(len(keyed), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
