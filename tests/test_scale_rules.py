"""Spatial constants at the authors' scale for any ``image_size``: QAMP's edge bands
(``models.mgsp.band_iterations``) and the augmentation's pixel lengths (``AffineElastic.scaled``).
SSL-ALPNet's windows are tested in test_baselines.py. Measured on CHAOST2: bench/scale_rules.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NATIVE, SIZE, train_dataset
from dataloaders.transforms import AffineElastic
from models import ModelConfig, QAMP
from models.mgsp import band_iterations, edge_bands


@pytest.mark.parametrize("size, iterations", [(64, 1), (128, 1), (256, 2), (257, 2), (512, 4)])
def test_band_iterations_follow_the_authors_width_relative_to_the_slice(size: int, iterations: int) -> None:
    # the authors: cv2.erode / dilate, 3 x 3 ones, iterations=2 on 256 px slices (QAMP models/qamp.py L296, L329)
    assert band_iterations(None, 3, (size, size)) == iterations
    assert band_iterations(2, 3, (size, size)) == 2  # an explicit count is used as given
    assert band_iterations(None, 5, (256, 256)) == 1  # 2 px = one step of a 5 x 5 kernel


def square_masks(size: int) -> torch.Tensor:
    """A centred square of half the slice side, ``1 x size x size``."""
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: size // 4 + size // 2, size // 4: size // 4 + size // 2] = 1
    return mask


def band_fraction(size: int, iterations: int) -> tuple[float, float]:
    inner, outer = edge_bands(square_masks(size), 3, iterations)
    area = float(square_masks(size).sum())
    return float(inner.sum()) / area, float(outer.sum()) / area


def test_bands_at_128_px_cover_what_the_authors_bands_cover_at_256() -> None:
    authors = band_fraction(256, 2)  # inner: 1 - (124/128)^2; outer: (132/128)^2 - 1
    assert authors == pytest.approx((1 - (124 / 128) ** 2, (132 / 128) ** 2 - 1))
    assert band_fraction(128, band_iterations(None, 3, (128, 128))) == pytest.approx(authors)
    # at 64 px the authors' band would be half a pixel: one pixel is the nearest band there is, much
    # nearer than the authors' two iterations in pixels (which cover 4 x the authors' width)
    at_64 = band_fraction(64, band_iterations(None, 3, (64, 64)))
    unscaled = band_fraction(64, 2)
    for rule, fixed, reference in zip(at_64, unscaled, authors):
        assert abs(rule - reference) < abs(fixed - reference)
        assert rule == pytest.approx(2 * reference, rel=0.1)


def test_qamp_resolves_the_band_once_and_keeps_the_authors_count_at_256() -> None:
    tiny = {"backbone": "resnet50", "n_mlp_fg": 4, "n_keep_fg": 2, "n_query_fg": 2, "n_edge": 2, "n_mlp_bg": 4,
            "n_keep_bg": 2, "n_query_bg": 2, "feature_dim": 16}
    assert ModelConfig().edge_iters is None
    assert QAMP(ModelConfig.from_config(tiny), (256, 256)).edge_iters == 2
    assert QAMP(ModelConfig.from_config(tiny), (64, 64)).edge_iters == 1
    assert QAMP(ModelConfig.from_config({**tiny, "edge_iters": 2}), (64, 64)).edge_iters == 2
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="edge_iters"):
            ModelConfig.from_config({"edge_iters": bad})


def test_augmentation_lengths_scale_with_the_slice() -> None:
    reference = AffineElastic()
    assert (reference.shift, reference.alpha, reference.sigma) == (5.0, 10.0, 5.0)  # datasets.py L183-185
    assert reference.scaled(1.0) is reference
    quarter = reference.scaled(0.25)  # 256 -> 64 px
    assert (quarter.shift, quarter.alpha, quarter.sigma) == (1.25, 2.5, 1.25)
    assert (quarter.rotate, quarter.shear, quarter.scale) == (reference.rotate, reference.shear, reference.scale)
    with pytest.raises(ValueError, match="factor"):
        reference.scaled(0.0)
    # the same draws: the displacement of a scaled transform is the reference's times the factor
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    from dataloaders.transforms import random_affine_matrix

    full = random_affine_matrix(rng_a, (64, 64), reference.rotate, reference.shift, reference.shear, reference.scale)
    small = random_affine_matrix(rng_b, (64, 64), quarter.rotate, quarter.shift, quarter.shear, quarter.scale)
    np.testing.assert_allclose(small[:2, :2], full[:2, :2])  # rotation, shear, zoom unchanged


def test_training_scans_carry_the_augmentation_of_their_grid(phantoms48: Path) -> None:
    resampled = train_dataset("custom", phantoms48, 0, image_size=SIZE, supervoxel_source="generate", min_size=20,
                              n_steps=2)
    factor = SIZE / NATIVE
    for scan in resampled.scans:
        assert scan.geometric.shift == pytest.approx(5.0 * factor)
        assert scan.geometric.sigma == pytest.approx(5.0 * factor)
        assert scan.geometric.alpha == pytest.approx(10.0 * factor)
    native = train_dataset("custom", phantoms48, 0, supervoxel_source="generate", min_size=20, n_steps=2)
    assert all(scan.geometric == AffineElastic() for scan in native.scans)
