"""Datasets, folds and episodic loaders for few-shot medical image segmentation.

- :mod:`dataloaders.datasets`: dataset definitions (:data:`DATASETS`, custom ``dataset.json``),
  scan discovery, folds, volume reading; CLI ``python -m dataloaders.datasets``.
- :mod:`dataloaders.resolved`: :func:`resolve_dataset`, a run's dataset resolved once from its config
  (:class:`ResolvedDataset`), which the two datasets below take.
- :mod:`dataloaders.train_dataset`: :class:`TrainDataset`, episodes as a pure function of (seed, step).
- :mod:`dataloaders.eval_dataset`: :class:`EvalDataset`, the evaluation protocol.
- :mod:`dataloaders.transforms`: gamma and joint affine + elastic augmentation.

Names are imported lazily, so that ``python -m dataloaders.datasets`` runs the module only once.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DATASETS": "dataloaders.datasets",
    "DatasetSpec": "dataloaders.datasets",
    "Scan": "dataloaders.datasets",
    "discover_scans": "dataloaders.datasets",
    "fold_scan_ids": "dataloaders.datasets",
    "get_dataset": "dataloaders.datasets",
    "resolve_image_dir": "dataloaders.datasets",
    "EvalDataset": "dataloaders.eval_dataset",
    "ProtocolKeys": "dataloaders.eval_dataset",
    "ResolvedDataset": "dataloaders.resolved",
    "resolve_dataset": "dataloaders.resolved",
    "EpisodeKeys": "dataloaders.train_dataset",
    "to_model_input": "dataloaders.eval_dataset",
    "Augmentation": "dataloaders.train_dataset",
    "StepSampler": "dataloaders.train_dataset",
    "TrainDataset": "dataloaders.train_dataset",
    "worker_init_fn": "dataloaders.train_dataset",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dataloaders' has no attribute {name!r}")
