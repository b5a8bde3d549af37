"""LightningDataModule over the dataset registry (used to squeeze teachers on real data)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cvdd.data.registry import DatasetSpec, ImageDataset, get_spec, load_dataset


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
        self.spec: DatasetSpec = get_spec(self.dataset_cfg["name"])
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

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
