"""Evaluation data: one support scan and the query scans of a fold.

Protocol (docs/METHOD.md §6, ``eval_mode='protocol'``, the default of every table in the
field): the fold's scans in numeric order; the support is the scan at position ``supp_idx``, the
others are queries. For a class with ``C`` support slices holding it, the support slices are
``int(p * C)`` for ``p`` in ``[1/6, 1/2, 5/6]`` (``n_part`` = 3; in general
``p_i = 1/(2n) + i (1 - 1/n)/(n - 1)``, ``p = [1/2]`` for n = 1). A query keeps its ``C_q`` slices
holding the class, split at ``linspace(0, C_q, n_part + 1).astype(int)``; chunk k is segmented with
support slice k.

``eval_mode='all_slices'``: the leak-free alternative: the query's labels are not used to choose
slices: every slice of the query is segmented, chunks split the whole volume the same way.

Scans stay on their native grid (Dice, NIfTI and overlays are native); ``image_size`` only says
what the model sees: :meth:`EvalDataset.model_images` / :meth:`EvalDataset.model_masks` resample
slices to it (image bilinear, masks nearest), and predictions go back with
``utils.resample.resize_probabilities``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.resample import resize_image, resize_labels
from dataloaders.datasets import DatasetSpec, Scan, fold_positions, load_scan
from dataloaders.resolved import ResolvedDataset

EVAL_MODES = ("protocol", "all_slices")

__all__ = ["EVAL_MODES", "Scan", "EvalDataset", "ProtocolKeys", "chunk_bounds", "pick_support_slices", "split_chunks",
           "support_fractions", "to_model_input"]


def support_fractions(n_part: int) -> np.ndarray:
    """Relative positions of the support slices: ``1/(2n) + i (1 - 1/n)/(n - 1)``; ``[0.5]`` for n = 1."""
    if n_part < 1:
        raise ValueError(f"n_part: expected an integer >= 1, got {n_part}")
    if n_part == 1:
        return np.array([0.5])
    half = 1.0 / (2 * n_part)
    interval = (1.0 - 1.0 / n_part) / (n_part - 1)
    return np.array([half + interval * i for i in range(n_part)])


def chunk_bounds(n_slices: int, n_part: int) -> np.ndarray:
    """``linspace(0, n_slices, n_part + 1).astype(int)``: chunk k is ``[b[k], b[k+1])``."""
    return np.linspace(0, n_slices, n_part + 1).astype(int)


def pick_support_slices(label: np.ndarray, class_id: int, n_part: int) -> list[int]:
    """The support slices of ``class_id`` in a label volume (Z x H x W): the ``int(p * C)``-th of its C
    slices holding the class, for each ``p`` of :func:`support_fractions` (empty when C = 0)."""
    labelled = np.flatnonzero((label == class_id).any(axis=(1, 2)))
    if labelled.size == 0:
        return []
    picks = (support_fractions(n_part) * labelled.size).astype(int)
    return [int(z) for z in labelled[picks]]


def split_chunks(slices: np.ndarray, n_part: int) -> list[np.ndarray]:
    """``slices`` split, in order, into ``n_part`` chunks at :func:`chunk_bounds` (some may be empty)."""
    bounds = chunk_bounds(slices.size, n_part)
    return [slices[bounds[k]:bounds[k + 1]] for k in range(n_part)]


def to_model_input(slices: np.ndarray) -> torch.Tensor:
    """z-scored slices float32 (N x H x W) -> float32 tensor (N x 3 x H x W) (slice repeated 3 times)."""
    tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    return tensor.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class ProtocolKeys:
    """The config keys of the evaluation protocol (``config.py`` holds their defaults and meaning).

    Attributes:
        n_part: support slices per class = query chunks.
        eval_mode: ``'protocol'`` or ``'all_slices'`` (see module docstring).
    """

    n_part: int
    eval_mode: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ProtocolKeys":
        """The keys of a flat config."""
        return cls(**{f.name: config[f.name] for f in fields(cls)})


class EvalDataset(Dataset):
    """Support and query scans of fold ``eval_fold``; ``ds[i]`` is query :class:`Scan` i.

    Args:
        data: the run's dataset (``dataloaders.resolved.resolve_dataset``): scans, the image size the
            model sees (native size checked on load unless resampled), the classes to evaluate.
        keys: the protocol keys (:class:`ProtocolKeys`).
        eval_fold: 0..4.
        supp_idx: position of the support scan within the fold (numeric id order).
        scan_ids: explicit scans (numeric ids) instead of fold ``eval_fold``'s, e.g. the validation
            scans of a training run; ``supp_idx`` indexes this list in numeric order.

    Attributes:
        support: the support :class:`Scan`; queries: list of query :class:`Scan` (numeric id order);
        fold_scans: every scan of the fold (numeric id order).
    """

    def __init__(self, data: ResolvedDataset, keys: ProtocolKeys, eval_fold: int, supp_idx: int,
                 scan_ids: Sequence[int] | None = None) -> None:
        self.spec: DatasetSpec = data.spec
        spec = self.spec
        if keys.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode: expected one of {EVAL_MODES}, got {keys.eval_mode!r}")
        if not isinstance(keys.n_part, (int, np.integer)) or keys.n_part < 1:
            raise ValueError(f"n_part: expected an integer >= 1, got {keys.n_part!r}")
        self.eval_mode = keys.eval_mode
        self.n_part = int(keys.n_part)
        self.eval_fold = spec.check_fold(eval_fold)
        self.test_label = list(data.test_label)
        self.image_dir = data.image_dir
        self.image_size = data.image_size
        files = list(data.scans)
        if scan_ids is None:
            fold_files = [files[pos] for pos in fold_positions(spec, len(files), self.eval_fold)]
        else:
            by_id = {f.scan_id: f for f in files}
            missing = sorted({int(i) for i in scan_ids} - set(by_id))
            if missing or len(set(scan_ids)) < 2:
                raise ValueError(f"scan_ids: expected at least 2 distinct scan ids of {self.image_dir}, got "
                                 f"{list(scan_ids)} (unknown: {missing}); available: {sorted(by_id)}")
            fold_files = [by_id[i] for i in sorted({int(i) for i in scan_ids})]
        if not isinstance(supp_idx, (int, np.integer)) or not 0 <= supp_idx < len(fold_files):
            raise ValueError(
                f"supp_idx: expected an integer in 0..{len(fold_files) - 1} (fold {self.eval_fold} "
                f"holds scans {[f.scan_id for f in fold_files]}), got {supp_idx!r}"
            )
        self.fold_scans: list[Scan] = [load_scan(spec, f, check_size=not data.resample) for f in fold_files]
        self._set_support(int(supp_idx))

    def _set_support(self, supp_idx: int) -> None:
        self.supp_idx = supp_idx
        self.support: Scan = self.fold_scans[supp_idx]
        self.queries: list[Scan] = [s for i, s in enumerate(self.fold_scans) if i != supp_idx]

    def with_support(self, supp_idx: int) -> "EvalDataset":
        """The same fold with another support scan, sharing the loaded volumes (for averaging over
        every ``supp_idx``)."""
        if not isinstance(supp_idx, (int, np.integer)) or not 0 <= supp_idx < len(self.fold_scans):
            raise ValueError(
                f"supp_idx: expected an integer in 0..{len(self.fold_scans) - 1}, got {supp_idx!r}"
            )
        other = copy.copy(self)
        other._set_support(int(supp_idx))
        return other

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> Scan:
        return self.queries[index]

    @staticmethod
    def _slices_with(scan: Scan, class_id: int) -> np.ndarray:
        return np.flatnonzero((scan.label == class_id).any(axis=(1, 2)))

    def support_slices(self, class_id: int) -> list[int]:
        """``n_part`` z-indices of the support scan for ``class_id``, at ``int(p * C)`` of its C labelled slices.

        Raises:
            ValueError: the class is not a test label, or the support scan has no slice of it.
        """
        self.spec.check_labels("class_id", [class_id])
        picks = pick_support_slices(self.support.label, class_id, self.n_part)
        if not picks:
            raise ValueError(
                f"support scan {self.support.scan_id} (supp_idx={self.supp_idx}, fold {self.eval_fold}) "
                f"has no slice of class {class_id} ({self.spec.label_names[class_id]}); choose another supp_idx"
            )
        return picks

    def model_images(self, slices: np.ndarray) -> torch.Tensor:
        """Native z-scored slices ``N x H x W`` -> model input float32 ``N x 3 x S x S`` (bilinear)."""
        return to_model_input(resize_image(slices, self.image_size))

    def model_masks(self, masks: np.ndarray) -> torch.Tensor:
        """Native binary masks ``N x H x W`` -> float32 ``N x S x S`` in {0, 1} (nearest)."""
        return torch.from_numpy(resize_labels(np.asarray(masks, dtype=np.uint8), self.image_size).astype(np.float32))

    def support_input(self, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Support images float32 (n_part x 3 x S x S) and masks float32 (n_part x S x S) in {0, 1},
        on the model grid (``S = image_size``)."""
        z = self.support_slices(class_id)
        return self.model_images(self.support.image[z]), self.model_masks(self.support.label[z] == class_id)

    def query_slices(self, scan: Scan, class_id: int) -> np.ndarray:
        """Slices of ``scan`` to segment: those holding the class ('protocol') or all ('all_slices')."""
        if self.eval_mode == "all_slices":
            return np.arange(scan.image.shape[0])
        return self._slices_with(scan, class_id)

    def query_chunks(self, scan: Scan, class_id: int) -> list[np.ndarray]:
        """``n_part`` arrays of z-indices of ``scan``; chunk k is segmented with support slice k.

        In 'protocol' mode a query without the class gives ``n_part`` empty arrays.
        """
        return split_chunks(self.query_slices(scan, class_id), self.n_part)
