"""utils.metrics: 3D overlap counts, Dice / IoU, and the documented empty-mask policy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.metrics import overlap


def test_counts_and_scores_on_a_hand_made_volume() -> None:
    target = np.zeros((2, 4, 4), dtype=np.uint8)
    target[0, :2, :2] = 1  # 4 voxels on slice 0
    target[1, 0, 0] = 1  # 1 voxel on slice 1
    pred = np.zeros_like(target)
    pred[0, :2, :1] = 1  # 2 of the 4
    pred[1, 3, 3] = 1  # a false positive on slice 1
    scores = overlap(pred, target)
    assert (scores.tp, scores.fp, scores.fn) == (2, 1, 3)
    assert scores.dice == pytest.approx(2 * 2 / (2 * 2 + 1 + 3))
    assert scores.iou == pytest.approx(2 / (2 + 1 + 3))


def test_counts_are_summed_over_slices_not_averaged() -> None:
    """3D Dice: slice 0 perfect (Dice 1), slice 1 a miss (Dice 0) -> not 0.5 but 2*9/(2*9+1)."""
    target = np.zeros((2, 3, 3), dtype=bool)
    target[0] = True
    target[1, 1, 1] = True
    pred = np.zeros_like(target)
    pred[0] = True
    assert overlap(pred, target).dice == pytest.approx(18 / 19)


def test_tensors_and_label_values_are_accepted() -> None:
    target = torch.tensor([[0, 2, 2], [0, 0, 2]])
    pred = torch.tensor([[0, 1, 0], [0, 0, 1]])
    scores = overlap(pred, target)
    assert (scores.tp, scores.fp, scores.fn) == (2, 0, 1)


def test_empty_policy() -> None:
    empty = np.zeros((3, 5, 5), dtype=bool)
    both = overlap(empty, empty)
    assert math.isnan(both.dice) and math.isnan(both.iou)
    assert overlap(empty, empty, empty=1.0).dice == 1.0
    some = empty.copy()
    some[1, 2, 2] = True
    assert overlap(some, empty).dice == 0.0  # prediction where the truth is empty
    assert overlap(empty, some).iou == 0.0  # nothing predicted where the truth is not empty


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2, 4, 4\) and \(2, 4, 5\)"):
        overlap(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
