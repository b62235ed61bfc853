"""GIN, the random-network intensity augmentation of the pre-training (dataloaders/transforms.py):
its numbers, its draws, and that episodes without it are the reference's exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.transforms import GIN_OUT_CHANNELS, gin_transform
from helpers import train_dataset


def test_gin_keeps_the_norm_draws_from_the_generator_and_changes_contrast() -> None:
    image = np.random.default_rng(0).standard_normal((40, 48)).astype(np.float32)
    out = gin_transform(image, np.random.default_rng(1))
    assert out.shape == (GIN_OUT_CHANNELS, 40, 48) and out.dtype == np.float32 and np.isfinite(out).all()
    # rescaled to the Frobenius norm of the image repeated to 3 channels
    assert np.linalg.norm(out) == pytest.approx(np.sqrt(3) * np.linalg.norm(image), rel=1e-5)
    assert np.array_equal(out, gin_transform(image, np.random.default_rng(1)))  # a pure function of the draws
    other = gin_transform(image, np.random.default_rng(2))
    assert not np.allclose(out, other)  # a fresh network per call
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])  # three different channels
    assert np.array_equal(image, np.random.default_rng(0).standard_normal((40, 48)).astype(np.float32))  # input kept


def test_gin_of_a_constant_region_is_constant_inside_it() -> None:
    # 1 x 1 or 3 x 3 kernels, 4 layers: a pixel sees at most 4 px around it, so the interior of a flat
    # square stays flat (intensities remapped, shapes kept)
    image = np.zeros((32, 32), np.float32)
    image[8:24, 8:24] = 1.0
    out = gin_transform(image, np.random.default_rng(5))
    inner = out[:, 12:20, 12:20]
    assert np.allclose(inner, inner[:, :1, :1], atol=1e-5)


PHANTOM_KEYS = {"image_size": 32, "supervoxel_source": "generate", "min_size": 20}


def test_episodes_with_gin_off_are_unchanged_and_on_are_remapped_per_slice(phantoms48) -> None:
    plain = train_dataset("custom", phantoms48, 0, **PHANTOM_KEYS)
    off = train_dataset("custom", phantoms48, 0, gin_prob=0.0, **PHANTOM_KEYS)
    on = train_dataset("custom", phantoms48, 0, gin_prob=1.0, **PHANTOM_KEYS)
    for step in (0, 3):
        a, b, c = plain.episode(step), off.episode(step), on.episode(step)
        for key in ("support_images", "support_masks", "query_images", "query_labels", "slices"):
            assert torch.equal(a[key], b[key])
        # the same slices and masks (GIN's draws come last), other intensities, channels no longer copies
        assert torch.equal(a["slices"], c["slices"]) and torch.equal(a["query_labels"], c["query_labels"])
        assert torch.equal(a["support_masks"], c["support_masks"])
        assert not torch.allclose(a["query_images"], c["query_images"])
        assert not torch.allclose(c["support_images"][0, 0], c["support_images"][0, 1])
        assert torch.equal(c["query_images"], on.episode(step)["query_images"])  # pure in (seed, step)


def test_gin_prob_is_refused_out_of_range_or_without_augmentation(phantoms48) -> None:
    with pytest.raises(ValueError, match="gin_prob"):
        train_dataset("custom", phantoms48, 0, gin_prob=1.5, **PHANTOM_KEYS)
    with pytest.raises(ValueError, match="augment=False"):
        train_dataset("custom", phantoms48, 0, gin_prob=0.5, augment=False, **PHANTOM_KEYS)


def test_gin_on_chaost2_episodes_keeps_masks_and_each_slice_norm(chaos_dir, chaos_sv_dir) -> None:
    """Real data (the pre-training's episodes, at cpu_budget's 64 px): GIN changes the intensities of
    every slice and nothing else; each slice keeps the norm of its 3-channel original."""
    keys = {"supervoxel_dir": chaos_sv_dir, "image_size": 64, "seed": 7, "scan_ids": [10, 13]}
    plain = train_dataset("CHAOST2", chaos_dir, 0, **keys)
    gin = train_dataset("CHAOST2", chaos_dir, 0, gin_prob=1.0, **keys)
    for step in range(4):
        a, b = plain.episode(step), gin.episode(step)
        assert a["scan_id"] == b["scan_id"] and a["class_id"] == b["class_id"]
        assert torch.equal(a["slices"], b["slices"]) and torch.equal(a["support_masks"], b["support_masks"])
        assert torch.equal(a["query_labels"], b["query_labels"])
        for key in ("support_images", "query_images"):
            assert torch.isfinite(b[key]).all() and not torch.allclose(a[key], b[key])
            norms = lambda x: x.flatten(1).norm(dim=1)  # noqa: E731 (per slice, over 3 channels)
            torch.testing.assert_close(norms(b[key]), norms(a[key]), rtol=1e-4, atol=1e-3)
