"""The dataset of a run, resolved once from its config: :func:`resolve_dataset` -> :class:`ResolvedDataset`.

``train.py`` and ``test.py`` resolve the config's data keys (``dataset``, ``data_dir``,
``image_size``, ``test_label``, ``exclude_label``, ``setting``, ``exclude_mode``, and for training
``use_gt``, ``supervoxel_source``, ``supervoxel_dir``, ``n_sv``) here, once per run, and hand the
result to :class:`dataloaders.train_dataset.TrainDataset` and
:class:`dataloaders.eval_dataset.EvalDataset`, which take no data key of their own: the dataset
definition is read once (a custom dataset's ``dataset.json`` too), the image folder scanned once,
the labels and the image size decided once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from dataloaders.datasets import (DatasetSpec, ScanFiles, discover_scans, find_supervoxel_dir, get_dataset,
                                  model_image_size, resolve_image_dir)

EXCLUDE_MODES = ("any", "all")
SUPERVOXEL_SOURCES = ("folder", "generate")


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset as one run uses it.

    Attributes:
        spec: the :class:`DatasetSpec` (registered, or read from ``dataset.json``).
        image_dir: the folder of ``image_<id>`` / ``label_<id>`` files.
        scans: every scan's files, in numeric id order (fold positions index this order).
        image_size: the in-plane size ``S`` the model sees (``image_size`` key, else the native size).
        resample: True when ``image_size`` was given: slices are resampled to ``S`` on load; False:
            every scan must have the dataset's native size (checked on load).
        test_label: classes tested (and, with ``use_gt``, left out of the training classes).
        exclude_label: classes whose training slices are removed (setting 2); empty in setting 1.
        exclude_mode: ``'any'`` / ``'all'``: a removed slice holds any / all of ``exclude_label``.
        use_gt: training classes are ground-truth classes (else supervoxels).
        supervoxel_source: ``'folder'`` (``supervoxel_dir``'s ids) or ``'generate'`` (computed on load).
        supervoxel_dir: the supervoxel folder found for supervoxel training from a folder, else None.
        n_sv: supervoxel ``min_size`` (the folder ``supervoxels_<n_sv>``; ``'generate'``'s size).
    """

    spec: DatasetSpec
    image_dir: Path
    scans: tuple[ScanFiles, ...]
    image_size: int
    resample: bool
    test_label: tuple[int, ...]
    exclude_label: tuple[int, ...]
    exclude_mode: str
    use_gt: bool
    supervoxel_source: str
    supervoxel_dir: Path | None
    n_sv: int

    @property
    def regenerate(self) -> bool:
        """Supervoxel training with supervoxels computed on load (no folder)."""
        return self.supervoxel_source == "generate" and not self.use_gt

    @property
    def needs_supervoxel_dir(self) -> bool:
        """Supervoxel training from a folder."""
        return not self.use_gt and not self.regenerate


def resolve_labels(config: Mapping[str, Any], spec: DatasetSpec) -> tuple[list[int], list[int]]:
    """``(test_label, exclude_label)`` with the defaults filled in.

    ``test_label=None`` means the dataset's standard test classes; ``exclude_label=None`` follows
    ``setting``: nothing in setting 1, the test classes in setting 2.

    Raises:
        ValueError: a label id the dataset does not have (the message names the key).
    """
    test_label = spec.check_labels("test_label", config["test_label"] or list(spec.test_labels))
    if config["exclude_label"] is not None:
        exclude = spec.check_labels("exclude_label", config["exclude_label"])
    else:
        exclude = list(test_label) if config["setting"] == 2 else []
    return test_label, exclude


def resolve_dataset(config: Mapping[str, Any], training: bool) -> ResolvedDataset:
    """Resolve the data keys of a flat config (see the module docstring).

    Args:
        config: the run's flat config (``config.py``'s keys).
        training: also find the supervoxel folder (supervoxel training from a folder); test runs
            need no supervoxels.

    Raises:
        ValueError / FileNotFoundError: naming the key or file and the fix (unknown dataset, no
            images, unknown labels, bad ``exclude_mode`` / ``supervoxel_source`` / ``image_size``,
            no supervoxel folder).
    """
    spec = get_dataset(config["dataset"], config["data_dir"])
    image_dir = resolve_image_dir(spec, config["data_dir"])
    test_label, exclude_label = resolve_labels(config, spec)
    if config["exclude_mode"] not in EXCLUDE_MODES:
        raise ValueError(f"exclude_mode: expected one of {EXCLUDE_MODES}, got {config['exclude_mode']!r}")
    if config["supervoxel_source"] not in SUPERVOXEL_SOURCES:
        raise ValueError(f"supervoxel_source: expected one of {SUPERVOXEL_SOURCES}, "
                         f"got {config['supervoxel_source']!r}")
    n_sv = int(config["n_sv"] or spec.n_sv)
    data = ResolvedDataset(
        spec=spec, image_dir=image_dir, scans=tuple(discover_scans(image_dir)),
        image_size=model_image_size(spec, config["image_size"]), resample=config["image_size"] is not None,
        test_label=tuple(test_label), exclude_label=tuple(exclude_label), exclude_mode=config["exclude_mode"],
        use_gt=bool(config["use_gt"]), supervoxel_source=config["supervoxel_source"], supervoxel_dir=None,
        n_sv=n_sv)
    if training and data.needs_supervoxel_dir:
        folder = find_supervoxel_dir(image_dir, n_sv, config["supervoxel_dir"])
        data = replace(data, supervoxel_dir=folder)
    return data
