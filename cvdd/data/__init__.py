"""Datasets: registry, on-disk formats, transforms and the Lightning DataModule."""

from cvdd.data.datamodule import ImageDataModule
from cvdd.data.formats import DatasetNotFoundError, RawData
from cvdd.data.registry import DATASETS, ImageDataset, dataset_spec, get_spec, load_dataset
from cvdd.data.spec import DatasetSpec

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageDataModule",
    "ImageDataset",
    "RawData",
    "dataset_spec",
    "get_spec",
    "load_dataset",
]
