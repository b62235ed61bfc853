"""Each loss term against a hand computation (docs/METHOD.md §4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.losses import (boundary_f1_loss, nll_loss, prior_alignment_loss, prototype_consistency_loss,
                           regroup_by_origin)
from models.sampling import UpsampleGrid

EPS = float(np.finfo(np.float32).eps)


def test_query_nll_weights_and_ignore_index():
    probs = torch.tensor([[[[0.8, 0.3, 0.5, 0.0]], [[0.2, 0.7, 0.5, 1.0]]]])  # 1 x 2 x 1 x 4
    labels = torch.tensor([[[0, 1, 255, 1]]])
    p_last = 1.0 - EPS  # clamped
    expected = (0.1 * -math.log(0.8) + 1.0 * -math.log(0.7) + 1.0 * -math.log(p_last)) / (0.1 + 1.0 + 1.0)
    assert nll_loss(probs, labels, [0.1, 1.0]).item() == pytest.approx(expected, rel=1e-6)
    unweighted = (-math.log(0.8) - math.log(0.7) - math.log(p_last)) / 3
    assert nll_loss(probs, labels).item() == pytest.approx(unweighted, rel=1e-6)
    zero_prob = torch.tensor([[[[1.0]], [[0.0]]]])  # log(0) is clamped to log(eps)
    assert nll_loss(zero_prob, torch.tensor([[[1]]])).item() == pytest.approx(-math.log(EPS), rel=1e-6)


def _boundary_np(x: np.ndarray, k: int) -> np.ndarray:
    inv = 1 - x
    return ndimage.maximum_filter(inv, size=(1, k, k), mode="nearest") - inv


def test_boundary_f1_against_numpy():
    rng = np.random.default_rng(0)
    labels = np.zeros((1, 20, 24), dtype=np.int64)
    labels[0, 4:14, 6:17] = 1
    fg = ndimage.gaussian_filter((labels[0] == 1).astype(float), 1.5) * 0.9 + 0.05 * rng.random((20, 24))
    probs = np.stack([1 - fg, fg])[None].astype(np.float32)  # 1 x 2 x H x W
    one_hot = np.stack([labels[0] == 0, labels[0] == 1]).astype(np.float32)
    loss = []
    for c in range(2):
        pb, gb = _boundary_np(probs[0, c][None], 3)[0], _boundary_np(one_hot[c][None], 3)[0]
        pe = ndimage.maximum_filter(pb, size=5, mode="nearest")
        ge = ndimage.maximum_filter(gb, size=5, mode="nearest")
        P = (pb * ge).sum() / (pb.sum() + 1e-7)
        R = (pe * gb).sum() / (gb.sum() + 1e-7)
        loss.append(1 - 2 * P * R / (P + R + 1e-7))
    out = boundary_f1_loss(torch.from_numpy(probs), torch.from_numpy(labels), theta0=3, theta=5)
    assert out.item() == pytest.approx(float(np.mean(loss)), rel=1e-5)
    perfect = torch.from_numpy(one_hot[None])
    assert boundary_f1_loss(perfect, torch.from_numpy(labels)).item() == pytest.approx(0.0, abs=1e-6)


def test_regroup_by_origin_uses_head_size():
    forward = torch.arange(6.0)[:, None]  # head of 2 sampled from the query
    reverse = 10 + torch.arange(6.0)[:, None]  # head of 2 sampled from the support
    sup, qry = regroup_by_origin(forward, reverse, n_head=2)
    assert sup[:, 0].tolist() == [2, 3, 4, 5, 10, 11]
    assert qry[:, 0].tolist() == [0, 1, 12, 13, 14, 15]


def test_prototype_consistency_hand_example():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sup_fg = torch.stack([e1, e1]) * 3  # mean direction e1
    qry_fg = e2[None]
    sup_bg = torch.tensor([[1.0, 1.0]])
    qry_bg = e2[None] * 5
    # 2 - <e1,e2> - <(1,1)/sqrt2, e2> + max(0, <e1,(1,1)/sqrt2>) + max(0, <e2,e2>) = 2 - 0 - s + s + 1
    assert prototype_consistency_loss(sup_fg, qry_fg, sup_bg, qry_bg).item() == pytest.approx(3.0, rel=1e-6)
    # identical directions and orthogonal classes: 0; opposite classes are not penalised
    assert prototype_consistency_loss(e1[None], e1[None], -e1[None], -e1[None]).item() == pytest.approx(0.0, abs=1e-6)


def test_prior_alignment_loss_hand_computation():
    # identity grid (features at image resolution); one query row of 3 pixels, one support row of 3
    grid = UpsampleGrid((1, 3), (1, 3), torch.device("cpu"))
    q = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])  # vectors (1,0) (0,1) (1,1)
    pred = torch.tensor([[[[0.2, 0.9, 0.4]], [[0.8, 0.1, 0.6]]]])  # foreground at pixels 0 and 2
    s = torch.tensor([[[[2.0, 0.0, 1.0]], [[1.0, 3.0, 0.0]]]])
    masks = torch.tensor([[[1.0, 0.0, 1.0]]])
    t = torch.tensor([-4.0])
    proto = np.array([2.0, 1.0]) / (2 + 1e-5)  # MAP over pixels 0 and 2
    total = 0.0
    for vec, label in zip(([2.0, 1.0], [0.0, 3.0], [1.0, 0.0]), (1, 0, 1)):
        cos = np.dot(vec, proto) / (np.linalg.norm(vec) * np.linalg.norm(proto))
        p_fg = 1 - 1 / (1 + math.exp(-(0.5 * (-20 * cos + 4.0))))
        total += -math.log(min(max(p_fg if label else 1 - p_fg, EPS), 1 - EPS))
    out = prior_alignment_loss(q, pred, s, masks, t, grid, scaler=20.0, temperature=0.5)
    assert out.item() == pytest.approx(total / 3, rel=1e-5)
    empty_pred = torch.stack([torch.ones(1, 1, 3), torch.zeros(1, 1, 3)], dim=1)
    assert prior_alignment_loss(q, empty_pred, s, masks, t, grid, 20.0, 0.5).item() == 0.0
