"""Datasets, folds, training episodes and the test protocol, on the real CHAOST2 / SABS data."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader

from dataloaders.datasets import (
    DATASETS,
    discover_scans,
    fold_scan_ids,
    get_dataset,
    load_custom_spec,
    main as datasets_main,
    make_folds,
    read_label,
    resolve_image_dir,
)
from dataloaders.eval_dataset import chunk_bounds, support_fractions, to_model_input
from dataloaders.train_dataset import (EpisodeKeys, StepSampler, TrainDataset, excluded_slices, valid_windows,
                                       worker_init_fn)
from dataloaders.transforms import AffineElastic, gamma_transform, random_affine_matrix, warp_pair
from helpers import eval_dataset, train_dataset

CHAOS_IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]
# a few training scans of fold 0 keep the TrainDataset fixtures fast
FEW_TRAIN_IDS = [10, 13, 19, 21]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def chaos_gt(chaos_dir: Path) -> dict[int, np.ndarray]:
    """Ground-truth label volumes of every CHAOST2 scan, read once."""
    spec = DATASETS["CHAOST2"]
    return {f.scan_id: read_label(spec, f.label) for f in discover_scans(chaos_dir)}


@pytest.fixture(scope="session")
def chaos_train(chaos_dir: Path, chaos_sv_dir: Path) -> TrainDataset:
    """Fold-0 supervoxel training set over all 15 training scans, augmentation on."""
    return train_dataset("CHAOST2", chaos_dir, 0, supervoxel_dir=chaos_sv_dir, seed=7)


@pytest.fixture(scope="session")
def chaos_train_plain(chaos_dir: Path, chaos_sv_dir: Path) -> TrainDataset:
    """Few scans, no augmentation: episodes can be compared with the volumes."""
    return train_dataset("CHAOST2", chaos_dir, 0, supervoxel_dir=chaos_sv_dir, augment=False,
                        scan_ids=FEW_TRAIN_IDS)


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)


def _toy_dataset(root: Path, ids=(1, 2, 3, 4, 5, 6), size: int = 16, depth: int = 6,
                 labels: dict | None = None, supervoxels: bool = True) -> Path:
    """A tiny custom dataset: a cube of class 1 and a slab of class 2 per scan, plus supervoxels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in ids:
        image = rng.normal(100.0, 20.0, size=(depth, size, size)).astype(np.float32)
        label = np.zeros((depth, size, size), dtype=np.uint8)
        label[1:5, 4:12, 4:12] = 1
        label[0:4, 0:3, :] = 2
        _write(root / f"image_{i}.nii.gz", image)
        _write(root / f"label_{i}.nii.gz", label)
        if supervoxels:
            (root / "supervoxels_50").mkdir(exist_ok=True)
            sv = np.ones_like(label, dtype=np.int32)
            sv[:, size // 2:, :] = 2
            _write(root / "supervoxels_50" / f"superpix-MIDDLE_{i}.nii.gz", sv)
    spec = {"labels": {"1": "cube", "2": "slab"}, "test_labels": [1], "n_sv": 50} if labels is None else labels
    (root / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------ datasets and folds
def test_fold_tables_follow_the_published_rule() -> None:
    assert DATASETS["CHAOST2"].folds == (
        (0, 1, 2, 3, 4), (4, 5, 6, 7, 8), (8, 9, 10, 11, 12), (12, 13, 14, 15, 16), (0, 16, 17, 18, 19))
    assert DATASETS["SABS"].folds[4] == (0, 24, 25, 26, 27, 28, 29)
    assert DATASETS["Prostate_MRI"].folds[1] == tuple(range(8, 17))
    assert DATASETS["CMR"].folds[3] == tuple(range(21, 29))
    for spec in DATASETS.values():
        assert make_folds(spec.n_scans) == spec.folds, spec.name
    assert make_folds(7) == ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4, 5, 6))  # last fold takes the rest


def test_label_maps_and_defaults() -> None:
    assert DATASETS["SABS"].label_names[6] == "LIVER" and len(DATASETS["SABS"].label_names) == 13
    assert DATASETS["SABS"].test_labels == (1, 2, 3, 6) and DATASETS["SABS"].image_size == 257
    assert DATASETS["Prostate_MRI"].folder == "prostate_MR_normalized"
    assert len(DATASETS["Prostate_MRI"].label_names) == 8
    assert DATASETS["Prostate_MRI"].test_labels == (1, 2, 4, 7)
    assert DATASETS["CMR"].folder == "cmr_MR_normalized" and DATASETS["CMR"].n_sv == 1000
    assert DATASETS["CMR"].label_remap == {200: 1, 500: 2, 600: 3}
    assert DATASETS["CMR"].stored_label_values == [0, 200, 500, 600]


def test_discovery_sorts_numerically_and_pairs_by_id(chaos_dir: Path, chaos_sv_dir: Path) -> None:
    scans = discover_scans(chaos_dir, chaos_sv_dir)
    assert [s.scan_id for s in scans] == CHAOS_IDS
    for s in scans:
        assert s.image.name == f"image_{s.scan_id}.nii.gz"
        assert s.label.name == f"label_{s.scan_id}.nii.gz"
        assert s.supervoxel.name == f"superpix-MIDDLE_{s.scan_id}.nii.gz"


def test_resolve_image_dir_accepts_root_dataset_folder_and_image_folder(data_root: Path, chaos_dir: Path) -> None:
    for data_dir in (data_root, data_root / "CHAOST2", chaos_dir):
        assert resolve_image_dir("CHAOST2", data_dir) == chaos_dir


def test_fold_membership_of_real_scans(chaos_dir: Path, sabs_dir: Path, capsys) -> None:
    spec = DATASETS["CHAOST2"]
    assert fold_scan_ids(spec, CHAOS_IDS, 0) == [1, 2, 3, 5, 8]
    assert fold_scan_ids(spec, CHAOS_IDS, 2) == [19, 20, 21, 22, 31]
    assert fold_scan_ids(spec, CHAOS_IDS, 4) == [1, 36, 37, 38, 39]
    sabs_ids = [s.scan_id for s in discover_scans(sabs_dir)]
    assert sabs_ids == list(range(30))
    assert fold_scan_ids(DATASETS["SABS"], sabs_ids, 4) == [0, 24, 25, 26, 27, 28, 29]
    datasets_main(["--dataset", "CHAOST2", "--data-dir", str(chaos_dir), "--folds"])
    out = capsys.readouterr().out
    assert "fold 4: positions [0, 16, 17, 18, 19] -> scan ids [1, 36, 37, 38, 39]" in out
    assert "fold 0: positions [0, 1, 2, 3, 4] -> scan ids [1, 2, 3, 5, 8]" in out


def test_training_scans_are_outside_the_test_fold(chaos_train: TrainDataset) -> None:
    assert sorted(s.scan_id for s in chaos_train.scans) == CHAOS_IDS[5:]
    assert chaos_train.skipped_scan_ids == []


# ------------------------------------------------------------------------------ Setting 2
def _reference_excluded(gt: np.ndarray, exclude_label: list[int]) -> np.ndarray:
    """The ADNet/Q-Net/QAMP rule, written as in their loaders: AND over the excluded labels."""
    idx = np.arange(gt.shape[0])
    exclude = np.full(gt.shape[0], True, dtype=bool)
    for lab in exclude_label:
        exclude = exclude & (np.sum(gt == lab, axis=(1, 2)) > 0)
    return np.isin(np.arange(gt.shape[0]), idx[exclude])


def test_excluded_slices_rules(chaos_gt: dict[int, np.ndarray]) -> None:
    gt = chaos_gt[10]
    for labels in ([2, 3], [1, 2, 3, 4], [4]):
        np.testing.assert_array_equal(excluded_slices(gt, labels, "all"), _reference_excluded(gt, labels))
        any_rule = np.zeros(gt.shape[0], dtype=bool)
        for z in range(gt.shape[0]):
            any_rule[z] = bool(np.isin(gt[z], labels).any())
        np.testing.assert_array_equal(excluded_slices(gt, labels, "any"), any_rule)
    assert not excluded_slices(gt, [], "any").any()


@pytest.mark.parametrize("mode", ["any", "all"])
def test_setting2_training_slices(mode: str, chaos_dir: Path, chaos_sv_dir: Path,
                                  chaos_gt: dict[int, np.ndarray]) -> None:
    excluded = [2, 3]  # the kidneys: plenty of slices hold one but not the other
    ds = train_dataset("CHAOST2", chaos_dir, 0, supervoxel_dir=chaos_sv_dir, exclude_label=excluded,
                      exclude_mode=mode, scan_ids=FEW_TRAIN_IDS, augment=False)
    holds_one_only = 0
    for scan in ds.scans:
        gt = chaos_gt[scan.scan_id]
        holds = np.stack([(gt == lab).any(axis=(1, 2)) for lab in excluded])
        expected = holds.any(axis=0) if mode == "any" else _reference_excluded(gt, excluded)
        np.testing.assert_array_equal(~scan.allowed, expected)
        used = ds.candidate_slices(scan.scan_id)
        assert used.size > 0
        assert not np.isin(used, np.flatnonzero(expected)).any()
        holds_one_only += int((holds.any(axis=0)[used] & ~holds.all(axis=0)[used]).sum())
    if mode == "any":
        assert holds_one_only == 0
    else:  # the reference rule keeps slices holding one kidney only
        assert holds_one_only > 0
    for step in range(40):
        ep = ds.episode(step)
        gt = chaos_gt[ep["scan_id"]]
        assert not np.isin(gt[ep["slices"].numpy()], excluded).any() or mode == "all"


# ------------------------------------------------------------------------------ episodes
def test_episode_shapes_dtypes_and_ranges(chaos_train: TrainDataset) -> None:
    for step in range(12):
        ep = chaos_train[step]
        assert ep["support_images"].shape == (1, 3, 256, 256) and ep["support_images"].dtype == torch.float32
        assert ep["support_masks"].shape == (1, 256, 256) and ep["support_masks"].dtype == torch.float32
        assert ep["query_images"].shape == (1, 3, 256, 256) and ep["query_images"].dtype == torch.float32
        assert ep["query_labels"].shape == (1, 256, 256) and ep["query_labels"].dtype == torch.int64
        support_masks, query_labels = ep["support_masks"].numpy(), ep["query_labels"].numpy()
        assert set(np.unique(support_masks)) <= {0.0, 1.0} and set(np.unique(query_labels)) <= {0, 1}
        assert support_masks.sum() > 0 or query_labels.sum() > 0
        for key in ("support_images", "query_images"):
            x = ep[key].numpy()
            assert np.isfinite(x).all() and np.abs(x).max() < 50  # z-scored intensities
            assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
        assert isinstance(ep["scan_id"], int) and isinstance(ep["class_id"], int) and ep["class_id"] > 0
        assert abs(int(ep["slices"][1]) - int(ep["slices"][0])) == 1


def test_episode_content_matches_volumes(chaos_train_plain: TrainDataset, chaos_sv_dir: Path) -> None:
    ds = chaos_train_plain
    reversed_count = 0
    n = 200
    for step in range(n):
        ep = ds.episode(step)
        scan = next(s for s in ds.scans if s.scan_id == ep["scan_id"])
        z = ep["slices"].numpy()
        reversed_count += int(z[1] < z[0])
        np.testing.assert_array_equal(ep["support_images"][0, 0].numpy(), scan.image[z[0]])
        np.testing.assert_array_equal(ep["query_images"][0, 0].numpy(), scan.image[z[1]])
        if step < 10:  # masks against the supervoxel file itself
            sv = sitk.GetArrayFromImage(sitk.ReadImage(str(chaos_sv_dir / f"superpix-MIDDLE_{scan.scan_id}.nii.gz")))
            np.testing.assert_array_equal(ep["support_masks"][0].numpy(), sv[z[0]] == ep["class_id"])
            np.testing.assert_array_equal(ep["query_labels"][0].numpy(), sv[z[1]] == ep["class_id"])
        areas = [int((scan.pseudo[zz] == ep["class_id"]).sum()) for zz in z]
        assert min(areas) > 0 and max(areas) >= ds.min_size
        assert ep["scan_id"] in FEW_TRAIN_IDS
    assert 0.35 < reversed_count / n < 0.65


def test_use_gt_classes_exclude_test_labels_on_sabs(sabs_dir: Path) -> None:
    ds = train_dataset("SABS", sabs_dir, 0, use_gt=True, test_label=[1, 2, 3, 6], scan_ids=[7, 8])
    seen = set()
    for step in range(30):
        ep = ds.episode(step)
        assert ep["query_images"].shape == (1, 3, 257, 257)
        assert ep["support_masks"].shape == (1, 257, 257)
        seen.add(ep["class_id"])
    assert seen and not seen & {1, 2, 3, 6} and seen <= set(range(1, 14))


def test_n_shot_window(chaos_dir: Path, chaos_sv_dir: Path) -> None:
    ds = train_dataset("CHAOST2", chaos_dir, 0, supervoxel_dir=chaos_sv_dir, n_shot=3, scan_ids=[10])
    ep = ds.episode(3)
    assert ep["support_images"].shape == (3, 3, 256, 256) and ep["query_images"].shape == (1, 3, 256, 256)
    z = ep["slices"].numpy()
    assert len(z) == 4 and np.all(np.abs(np.diff(z)) == 1)


def test_valid_windows_weights_follow_reference_sampler() -> None:
    # one class, slices 0-2 and 5-6 hold it: runs of starts [0, 1] and [5]
    areas = np.array([[300], [300], [300], [0], [0], [300], [300]])
    starts, cols, weights = valid_windows(areas, np.ones(7, dtype=bool), 2, 200)
    np.testing.assert_array_equal(starts, [0, 1, 5])
    np.testing.assert_allclose(weights, [0.25, 0.25, 0.5])  # run 1/2, then start 1/len(run)
    areas[0, 0] = areas[1, 0] = 100  # window 0 now below min_size (max(100, 100) < 200)
    starts, _, weights = valid_windows(areas, np.ones(7, dtype=bool), 2, 200)
    np.testing.assert_array_equal(starts, [1, 5])
    np.testing.assert_allclose(weights, [0.25, 0.5])


# ------------------------------------------------------------------------------ determinism
def _assert_same_episode(batch: dict, episode: dict) -> None:
    """``batch`` may carry a leading batch dimension of 1 (DataLoader batch_size=1)."""
    assert batch.keys() == episode.keys()
    for key, value in episode.items():
        got = torch.as_tensor(batch[key])
        assert torch.equal(got.reshape(torch.as_tensor(value).shape), torch.as_tensor(value)), key


def test_episodes_are_pure_in_seed_and_step_with_0_and_2_workers(chaos_train: TrainDataset) -> None:
    direct = [chaos_train.episode(step) for step in range(6)]
    _assert_same_episode(chaos_train[3], direct[3])
    for workers in (0, 2):
        loader = DataLoader(chaos_train, batch_size=1, sampler=StepSampler(0, 6), num_workers=workers,
                            worker_init_fn=worker_init_fn)
        for step, batch in enumerate(loader):
            assert batch["query_images"].shape == (1, 1, 3, 256, 256)
            _assert_same_episode(batch, direct[step])
    resumed = list(DataLoader(chaos_train, batch_size=None, sampler=StepSampler(4, 6), num_workers=0))
    _assert_same_episode(resumed[0], direct[4])
    # another step, or another seed, gives another episode
    assert not torch.equal(direct[0]["query_images"], direct[1]["query_images"])
    other_seed = TrainDataset.__new__(TrainDataset)
    other_seed.__dict__.update(chaos_train.__dict__, seed=chaos_train.seed + 1)
    assert not torch.equal(other_seed.episode(0)["query_images"], direct[0]["query_images"])


class _GlobalDraws(torch.utils.data.Dataset):
    """Returns a draw of the legacy global numpy RNG and the worker id (what worker_init_fn seeds)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, int]:
        return float(np.random.random()), torch.utils.data.get_worker_info().id


def test_worker_init_fn_seeds_worker_rngs_from_the_run_seed() -> None:
    def draws() -> list[tuple[float, int]]:
        loader = DataLoader(_GlobalDraws(), batch_size=None, num_workers=2, worker_init_fn=worker_init_fn,
                            generator=torch.Generator().manual_seed(2025))
        return [(float(x), int(w)) for x, w in loader]

    first = draws()
    assert first == draws()  # same run seed, same draws
    by_worker = {w: x for x, w in first}
    assert len(by_worker) == 2 and by_worker[0] != by_worker[1]  # workers do not repeat each other


# ------------------------------------------------------------------------------ transforms
def test_gamma_keeps_the_intensity_range() -> None:
    x = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    y = gamma_transform(x, np.random.default_rng(1))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert abs(y.min() - x.min()) < 1e-4 and abs(y.max() - x.max()) < 1e-4
    assert not np.allclose(x, y)
    np.testing.assert_array_equal(y, gamma_transform(x, np.random.default_rng(1)))
    np.testing.assert_allclose(gamma_transform(x, np.random.default_rng(1), (1.0, 1.0)), x, atol=1e-4)


def test_affine_elastic_identity_and_joint_warp() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64), dtype=np.float32)
    image[20:44, 16:40] = 1.0
    mask = (image > 0).astype(np.uint8)
    identity = AffineElastic(rotate=0, shift=0, shear=0, scale=(1.0, 1.0), alpha=0)
    out_image, out_mask = identity(image, mask, rng)
    np.testing.assert_allclose(out_image, image, atol=1e-5)
    np.testing.assert_array_equal(out_mask, mask)
    for seed in range(5):
        out_image, out_mask = AffineElastic()(image, mask, np.random.default_rng(seed))
        assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
        agree = ((out_image > 0.5) == (out_mask > 0)).mean()
        assert agree > 0.99  # image and mask moved together
        again = AffineElastic()(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[0], out_image)


def test_affine_shift_moves_the_mask_by_the_drawn_offset() -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[24:40, 24:40] = 1
    matrix = random_affine_matrix(np.random.default_rng(3), mask.shape, rotate=0, shift=5, shear=0, scale=(1, 1))
    tx, ty = matrix[0, 2], matrix[1, 2]
    assert 0 < max(abs(tx), abs(ty)) <= 5
    _, moved = warp_pair(mask.astype(np.float32), mask, matrix)
    ys, xs = np.nonzero(moved)
    assert abs(xs.mean() - (31.5 + tx)) < 0.6 and abs(ys.mean() - (31.5 + ty)) < 0.6


# ------------------------------------------------------------------------------ test protocol
def test_support_slices_follow_the_formula(chaos_dir: Path, chaos_gt: dict[int, np.ndarray]) -> None:
    tds = eval_dataset("CHAOST2", chaos_dir, eval_fold=0, supp_idx=2, test_label=[1, 2, 3, 4])
    assert tds.support.scan_id == 3 and [q.scan_id for q in tds.queries] == [1, 2, 5, 8]
    np.testing.assert_allclose(support_fractions(3), [1 / 6, 1 / 2, 5 / 6])
    assert tds.support_slices(1) == [12, 18, 24]  # scan 3, liver: known values
    for cls in (1, 2, 3, 4):
        labelled = np.flatnonzero((chaos_gt[3] == cls).any(axis=(1, 2)))
        c = labelled.size
        assert tds.support_slices(cls) == [int(labelled[int(p * c)]) for p in (1 / 6, 1 / 2, 5 / 6)]
        for query in tds.queries:
            chunks = tds.query_chunks(query, cls)
            kept = np.flatnonzero((chaos_gt[query.scan_id] == cls).any(axis=(1, 2)))
            bounds = np.linspace(0, kept.size, 4).astype(int)
            assert len(chunks) == 3
            for k in range(3):
                np.testing.assert_array_equal(chunks[k], kept[bounds[k]:bounds[k + 1]])
    images, masks = tds.support_input(2)
    assert images.shape == (3, 3, 256, 256) and masks.shape == (3, 256, 256)
    np.testing.assert_array_equal(masks.numpy(), chaos_gt[3][tds.support_slices(2)] == 2)
    query = tds[0]
    assert query.image.dtype == np.float32 and query.label.dtype == np.int64
    assert abs(float(query.image.mean())) < 1e-3 and abs(float(query.image.std()) - 1) < 1e-3
    ref = sitk.ReadImage(str(chaos_dir / "image_1.nii.gz"))
    assert query.reference.GetSpacing() == ref.GetSpacing() and query.reference.GetOrigin() == ref.GetOrigin()
    assert query.reference.GetSize() == query.image.shape[::-1]


def test_all_slices_mode_uses_every_query_slice(chaos_dir: Path) -> None:
    tds = eval_dataset("CHAOST2", chaos_dir, eval_fold=4, supp_idx=0, eval_mode="all_slices")
    assert tds.support.scan_id == 1 and [q.scan_id for q in tds.queries] == [36, 37, 38, 39]
    query = tds.queries[1]
    empty = query.label.copy()
    query.label[:] = 0  # the query's labels must not matter in this mode
    chunks = tds.query_chunks(query, 2)
    query.label[:] = empty
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(query.image.shape[0]))
    np.testing.assert_array_equal([c.size for c in chunks], np.diff(chunk_bounds(query.image.shape[0], 3)))
    assert to_model_input(query.image[:2]).shape == (2, 3, 256, 256)
    # another support of the same fold reuses the loaded volumes
    other = tds.with_support(3)
    assert other.support.scan_id == 38 and [q.scan_id for q in other.queries] == [1, 36, 37, 39]
    assert other.support is tds.fold_scans[3] and tds.support.scan_id == 1
    with pytest.raises(ValueError, match="supp_idx"):
        tds.with_support(5)


# ------------------------------------------------------------------------------ custom dataset
def test_custom_dataset_built_from_chaos_files(tmp_path: Path, chaos_dir: Path, chaos_sv_dir: Path) -> None:
    ids = [2, 10, 13, 19, 20, 21]
    (tmp_path / "supervoxels_5000").mkdir()
    for i in ids:
        for kind in ("image", "label"):
            os.symlink(chaos_dir / f"{kind}_{i}.nii.gz", tmp_path / f"{kind}_{i}.nii.gz")
        os.symlink(chaos_sv_dir / f"superpix-MIDDLE_{i}.nii.gz",
                   tmp_path / "supervoxels_5000" / f"superpix-MIDDLE_{i}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"name": "chaos_subset", "labels": {"1": "liver", "2": "rk", "3": "lk", "4": "spleen"},
         "test_labels": [1, 4]}), encoding="utf-8")
    spec = get_dataset("custom", tmp_path)
    assert spec.image_size == 256 and spec.n_sv == 5000 and spec.test_labels == (1, 4)
    assert spec.folds == make_folds(6)
    train = train_dataset("custom", tmp_path, 0)
    assert sorted(s.scan_id for s in train.scans) == [13, 19, 20, 21]
    assert train.episode(0)["query_images"].shape == (1, 3, 256, 256)
    test = eval_dataset("custom", tmp_path, 0, supp_idx=1)
    assert test.support.scan_id == 10 and [q.scan_id for q in test.queries] == [2]
    assert len(test.support_slices(1)) == 3
    # explicit folds, as scan ids
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"1": "liver", "2": "rk", "3": "lk", "4": "spleen"},
         "folds": [[2, 10], [10, 13], [13, 19], [19, 20], [20, 21, 2]]}), encoding="utf-8")
    spec = load_custom_spec(tmp_path)
    assert spec.folds[4] == (0, 4, 5) and spec.test_labels == (1, 2, 3, 4)


def test_custom_label_remap(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "cmr", labels={"labels": {"1": "myo", "2": "lv"}, "n_sv": 50,
                                                   "label_remap": {"200": 1, "500": 2}})
    for i in range(1, 7):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / f"label_{i}.nii.gz")))
        _write(root / f"label_{i}.nii.gz", np.select([label == 1, label == 2], [200, 500], 0).astype(np.uint16))
    tds = eval_dataset("custom", root, 0, supp_idx=0, test_label=[1, 2])
    assert set(np.unique(tds.support.label)) == {0, 1, 2}


def test_check_cli_reports_scans_and_errors(tmp_path: Path, capsys) -> None:
    root = _toy_dataset(tmp_path / "toy")
    datasets_main(["--dataset", "custom", "--data-dir", str(root), "--check"])
    out = capsys.readouterr().out
    assert "scan 1: 6 slices, classes [1, 2], 2 supervoxels" in out and "ok: 6 scans load" in out
    _write(root / "label_6.nii.gz", np.full((6, 16, 16), 3, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"label_6.nii.gz: label values \[3\]"):
        datasets_main(["--dataset", "custom", "--data-dir", str(root), "--check"])


def test_tiny_custom_dataset_trains_and_tests(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "toy")
    ds = train_dataset("custom", root, 0, min_size=10, use_gt=False)
    ep = ds.episode(0)
    assert ep["query_images"].shape == (1, 3, 16, 16) and ep["class_id"] in (1, 2)
    gt = train_dataset("custom", root, 0, min_size=10, use_gt=True)
    assert {gt.episode(s)["class_id"] for s in range(10)} == {2}  # class 1 is the test label


# ------------------------------------------------------------------------------ bad input
def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known datasets: CHAOST2, SABS, Prostate_MRI, CMR, custom"):
        get_dataset("CHAOS")


def test_image_without_label_names_the_ids(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "d")
    (root / "label_3.nii.gz").unlink()
    (root / "label_5.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"scan ids \[3, 5\] have an image_<id> file but no label_<id>"):
        discover_scans(root)


def test_image_without_supervoxel_names_the_ids(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "d")
    (root / "supervoxels_50" / "superpix-MIDDLE_4.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"scan ids \[4\] have no superpix-MIDDLE_<id>.*generate_supervoxels.py"):
        train_dataset("custom", root, 0, min_size=10)


def test_missing_supervoxel_folder_names_the_command(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "d", supervoxels=False)
    with pytest.raises(FileNotFoundError, match="python data/supervoxels/generate_supervoxels.py --data-dir"):
        train_dataset("custom", root, 0, min_size=10)


def test_label_shape_mismatch(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "d")
    _write(root / "label_4.nii.gz", np.zeros((6, 16, 15), dtype=np.uint8))  # a training scan of fold 0
    with pytest.raises(ValueError, match=r"label_4.nii.gz: label shape \(6, 16, 15\).*does not match"):
        train_dataset("custom", root, 0, use_gt=True, min_size=10)


def test_label_values_outside_the_map(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "d")
    _write(root / "label_1.nii.gz", np.full((6, 16, 16), 7, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"label_1.nii.gz: label values \[7\] are outside.*dataset.json"):
        eval_dataset("custom", root, 0, supp_idx=0)


def test_unknown_test_and_exclude_labels(chaos_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"test_label: label ids \[5\] are not in dataset CHAOST2"):
        eval_dataset("CHAOST2", chaos_dir, 0, 2, test_label=[1, 5])
    with pytest.raises(ValueError, match=r"exclude_label: label ids \[9\] are not in dataset CHAOST2"):
        train_dataset("CHAOST2", chaos_dir, 0, exclude_label=[9])
    with pytest.raises(ValueError, match="exclude_mode"):
        train_dataset("CHAOST2", chaos_dir, 0, exclude_label=[1], exclude_mode="some")


@pytest.mark.parametrize("fold", [-1, 5])
def test_eval_fold_out_of_range(fold: int, chaos_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"eval_fold: expected an integer in 0..4"):
        train_dataset("CHAOST2", chaos_dir, fold)
    with pytest.raises(ValueError, match=r"eval_fold: expected an integer in 0..4"):
        eval_dataset("CHAOST2", chaos_dir, fold, 0)


def test_supp_idx_outside_the_fold(chaos_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"supp_idx: expected an integer in 0..4 \(fold 1 holds scans \[8, 10, 13, 15, 19\]\)"):
        eval_dataset("CHAOST2", chaos_dir, 1, supp_idx=5)


def test_no_class_big_enough_for_min_size(chaos_dir: Path, chaos_sv_dir: Path) -> None:
    with pytest.raises(ValueError, match="min_size: no class of the supervoxels"):
        train_dataset("CHAOST2", chaos_dir, 0, supervoxel_dir=chaos_sv_dir, min_size=256 * 256 + 1,
                     scan_ids=[10])


def test_custom_dataset_needs_dataset_json_and_numeric_ids(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "d")
    (root / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        get_dataset("custom", root)
    root = _toy_dataset(tmp_path / "e")
    (root / "image_1.nii.gz").rename(root / "image_case1.nii.gz")
    with pytest.raises(ValueError, match="scan ids must be integers"):
        discover_scans(root)


def test_custom_dataset_json_may_hold_comments_and_trailing_commas(tmp_path: Path) -> None:
    root = _toy_dataset(tmp_path / "c")
    (root / "dataset.json").write_text(
        '{\n  // hand-written: comments and trailing commas are fine (JSON5)\n'
        '  "labels": {"1": "cube", "2": "slab",},\n  test_labels: [1],  // unquoted key\n  "n_sv": 50,\n}\n',
        encoding="utf-8")
    spec = get_dataset("custom", root)
    assert spec.label_names == {1: "cube", 2: "slab"} and spec.test_labels == (1,) and spec.n_sv == 50
    (root / "dataset.json").write_text('{"labels": {"1": "cube"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_dataset("custom", root)


# ------------------------------------------------------------------------------ resolved once
def test_datasets_take_the_resolved_dataset_and_no_config_defaults() -> None:
    """TrainDataset / EvalDataset take the run's ResolvedDataset and one dataclass of episode keys,
    with no default of a config key of their own; train.py and test.py resolve the dataset once."""
    import inspect

    from config import cfg
    from dataloaders.eval_dataset import EvalDataset, ProtocolKeys
    from dataloaders.train_dataset import EpisodeKeys

    config_keys = set(dict(cfg()))
    for cls, keys in ((TrainDataset, EpisodeKeys), (EvalDataset, ProtocolKeys)):
        params = inspect.signature(cls.__init__).parameters
        assert list(params)[1:3] == ["data", "keys"], cls.__name__
        defaulted = {name for name, p in params.items() if p.default is not inspect.Parameter.empty}
        assert not defaulted & config_keys, (cls.__name__, defaulted & config_keys)
        assert {f.default for f in keys.__dataclass_fields__.values()} == {dataclasses.MISSING}
        assert set(keys.__dataclass_fields__) <= config_keys
    repo = Path(__file__).resolve().parents[1]
    for script in ("train.py", "test.py"):
        source = (repo / script).read_text(encoding="utf-8")
        assert source.count("resolve_dataset(") == 1, script
        assert "get_dataset(" not in source and "resolve_labels(" not in source, script


def test_resolved_dataset_holds_what_the_run_decides(tmp_path: Path, chaos_dir: Path) -> None:
    from dataloaders.resolved import resolve_dataset
    from helpers import config_with

    root = _toy_dataset(tmp_path / "toy")
    config = config_with(dataset="custom", data_dir=str(root), setting=2, image_size=32)
    data = resolve_dataset(config, training=True)
    assert data.image_dir == root and [f.scan_id for f in data.scans] == [1, 2, 3, 4, 5, 6]
    assert data.image_size == 32 and data.resample and data.spec.image_size == 16
    assert data.test_label == (1,) and data.exclude_label == (1,)  # setting 2: the test classes
    assert data.supervoxel_dir == root / "supervoxels_50" and data.n_sv == 50
    assert resolve_dataset(config, training=False).supervoxel_dir is None  # a test run needs none
    assert resolve_dataset({**config, "use_gt": True, "n_sv": None}, training=True).supervoxel_dir is None
    with pytest.raises(ValueError, match="resolve_dataset"):  # supervoxel training without the folder
        TrainDataset(resolve_dataset(config, training=False), EpisodeKeys.from_config(config), 0)
    with pytest.raises(ValueError, match="supervoxel_source: expected one of"):
        resolve_dataset({**config, "supervoxel_source": "magic"}, training=True)
