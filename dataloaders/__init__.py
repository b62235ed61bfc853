"""Datasets, folds and episodic loaders for few-shot medical image segmentation.

- :mod:`dataloaders.datasets`: dataset definitions (:data:`DATASETS`, custom ``dataset.json``),
  scan discovery, folds, volume reading.
- :mod:`dataloaders.train_dataset`: :class:`TrainDataset`, episodes as a pure function of (seed, step).
- :mod:`dataloaders.test_dataset`: :class:`TestDataset`, the evaluation protocol.
- :mod:`dataloaders.transforms`: gamma and joint affine + elastic augmentation.
"""
from dataloaders.datasets import (
    DATASETS,
    DatasetSpec,
    Scan,
    discover_scans,
    fold_scan_ids,
    get_dataset,
    resolve_image_dir,
)
from dataloaders.test_dataset import TestDataset, to_model_input
from dataloaders.train_dataset import StepSampler, TrainDataset

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Scan",
    "StepSampler",
    "TestDataset",
    "TrainDataset",
    "discover_scans",
    "fold_scan_ids",
    "get_dataset",
    "resolve_image_dir",
    "to_model_input",
]
