"""Overlap metrics of binary 3D segmentations (per query scan, as in the FSMIS protocol).

Counts are summed over every voxel of the volume (the protocol's "3D Dice": TP, FP and FN over all
kept slices of a query scan, not a mean of per-slice scores).

Empty-mask policy (documented, tested):
- ground truth and prediction both empty: Dice and IoU are **undefined** and returned as ``nan``
  (pass ``empty=1.0`` to score perfect agreement instead). ``test.py`` excludes ``nan`` from means
  and reports how many scans were defined. In the standard protocol this never happens, because a
  query keeps only slices that hold the class.
- ground truth empty, prediction not (or the reverse): Dice = IoU = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Overlap:
    """Voxel counts of one binary comparison and the scores derived from them."""

    tp: int
    fp: int
    fn: int
    empty: float = float("nan")

    @property
    def dice(self) -> float:
        """``2 TP / (2 TP + FP + FN)`` in [0, 1]; ``empty`` when both masks are empty."""
        denom = 2 * self.tp + self.fp + self.fn
        return self.empty if denom == 0 else 2 * self.tp / denom

    @property
    def iou(self) -> float:
        """``TP / (TP + FP + FN)`` in [0, 1]; ``empty`` when both masks are empty."""
        denom = self.tp + self.fp + self.fn
        return self.empty if denom == 0 else self.tp / denom


def _as_bool(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(bool, copy=False)


def overlap(pred: ArrayLike, target: ArrayLike, empty: float = float("nan")) -> Overlap:
    """Compare two binary masks of the same shape (any dimensionality, e.g. ``Z x H x W``).

    Args:
        pred, target: masks; non-zero = foreground. numpy arrays or tensors.
        empty: score returned when both masks are empty (see the module's policy).

    Raises:
        ValueError: the shapes differ.
    """
    p, t = _as_bool(pred), _as_bool(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction and ground truth must have the same shape, got {p.shape} and {t.shape}")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return Overlap(tp=tp, fp=fp, fn=fn, empty=empty)
