"""data.synthetic: determinism, labels, geometry, on-disk layout, overwrite protection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data import synthetic

SIZE = 64  # small phantoms keep the test fast; the generator is size-independent otherwise
N_SCANS = 5  # the custom loader needs at least one scan per fold


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(out, n_scans=N_SCANS, seed=5, size=SIZE, progress=False)
    return out


def test_same_seed_same_bytes(phantom_dir: Path, tmp_path: Path) -> None:
    synthetic.generate(tmp_path, n_scans=N_SCANS, seed=5, size=SIZE, progress=False)
    for path in sorted(phantom_dir.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_other_seed_other_data_and_scan_independent_of_count(phantom_dir: Path, tmp_path: Path) -> None:
    cfg = synthetic.PhantomConfig(size=SIZE)
    a, _ = synthetic.make_phantom(synthetic.scan_rng(5, 0), cfg)
    b, _ = synthetic.make_phantom(synthetic.scan_rng(6, 0), cfg)
    assert a.shape != b.shape or not np.array_equal(a, b)
    # scan 2 of a 2-scan set equals scan 2 of the 5-scan set
    synthetic.generate(tmp_path, n_scans=2, seed=5, size=SIZE, progress=False)
    assert (tmp_path / "image_2.nii.gz").read_bytes() == (phantom_dir / "image_2.nii.gz").read_bytes()


def test_layout_labels_and_geometry(phantom_dir: Path) -> None:
    names = {p.name for p in phantom_dir.iterdir()}
    expected = {f"{k}_{i}.nii.gz" for i in range(1, N_SCANS + 1) for k in ("image", "label")}
    assert expected | {"classmap_1.json", "classmap_100.json", "dataset.json"} == names
    cfg = synthetic.PhantomConfig(size=SIZE)
    classmap = json.loads((phantom_dir / "classmap_1.json").read_text(encoding="utf-8"))
    assert set(classmap) == {"BG", "LIVER", "RK", "LK", "SPLEEN"}
    for i in range(1, N_SCANS + 1):
        image = sitk.ReadImage(str(phantom_dir / f"image_{i}.nii.gz"))
        label = sitk.ReadImage(str(phantom_dir / f"label_{i}.nii.gz"))
        assert image.GetSize() == label.GetSize()
        nx, ny, nz = image.GetSize()
        assert (nx, ny) == (SIZE, SIZE) and cfg.min_slices <= nz <= cfg.max_slices
        assert image.GetSpacing() == pytest.approx((1.25 * 256 / SIZE, 1.25 * 256 / SIZE, 7.7))
        assert label.GetSpacing() == pytest.approx(image.GetSpacing())
        assert label.GetOrigin() == pytest.approx(image.GetOrigin())
        img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
        assert 0 <= img.min() and img.max() <= cfg.max_intensity and img.max() > 800
        # anatomy: liver biggest, on the patient's right (low column index); spleen on the left;
        # kidneys paired on both sides, posterior (low row index) of the liver's centre
        cols = {c: np.nonzero(lab == c)[2].mean() for c in (1, 2, 3, 4)}
        rows = {c: np.nonzero(lab == c)[1].mean() for c in (1, 2, 3, 4)}
        volumes = {c: int((lab == c).sum()) for c in (1, 2, 3, 4)}
        assert volumes[1] == max(volumes.values())
        assert cols[1] < SIZE / 2 < cols[4] and cols[2] < SIZE / 2 < cols[3]
        assert rows[2] < rows[1] and rows[3] < rows[1]
        # organs are brighter than the body background, kidneys brighter than liver (T2)
        body_bg = img[(lab == 0) & (img > 100)].mean()
        assert img[lab == 1].mean() > body_bg and img[lab == 2].mean() > img[lab == 1].mean()
        # the classmap lists exactly the slices holding each class
        for name, c in (("LIVER", 1), ("RK", 2), ("LK", 3), ("SPLEEN", 4)):
            assert classmap[name][str(i)] == [int(z) for z in np.flatnonzero((lab == c).any(axis=(1, 2)))]


def test_dataset_json(phantom_dir: Path) -> None:
    spec = json.loads((phantom_dir / "dataset.json").read_text(encoding="utf-8"))
    assert spec["labels"] == {"1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}
    assert spec["test_labels"] == [1, 2, 3, 4] and spec["modality"] == "MR"


def test_never_overwrites_without_flag(phantom_dir: Path) -> None:
    before = (phantom_dir / "image_1.nii.gz").read_bytes()
    assert synthetic.main(["--out", str(phantom_dir), "--n-scans", "3", "--seed", "9", "--size", str(SIZE)]) == 2
    assert (phantom_dir / "image_1.nii.gz").read_bytes() == before


def test_overwrite_flag_replaces(tmp_path: Path) -> None:
    assert synthetic.main(["--out", str(tmp_path), "--n-scans", "1", "--size", "48"]) == 0
    assert synthetic.main(["--out", str(tmp_path), "--n-scans", "1", "--size", "48", "--seed", "1",
                           "--overwrite"]) == 0
    assert sitk.ReadImage(str(tmp_path / "image_1.nii.gz")).GetSize()[:2] == (48, 48)


def test_loads_through_custom_dataset_loader(phantom_dir: Path) -> None:
    from dataloaders.datasets import discover_scans, get_dataset, load_scan, resolve_image_dir

    spec = get_dataset("custom", phantom_dir)
    assert dict(spec.label_names) == synthetic.LABEL_NAMES
    assert list(spec.test_labels) == [1, 2, 3, 4] and spec.modality == "MR"
    assert spec.image_size == SIZE and spec.n_sv == synthetic.supervoxel_min_size(SIZE)
    assert resolve_image_dir(spec, phantom_dir) == phantom_dir
    scans = discover_scans(phantom_dir)
    assert [s.scan_id for s in scans] == list(range(1, N_SCANS + 1))
    scan = load_scan(spec, scans[0])
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "label_1.nii.gz")))
    assert scan.image.dtype == np.float32 and scan.image.shape == raw.shape
    assert abs(float(scan.image.mean())) < 1e-3  # z-scored
    np.testing.assert_array_equal(scan.label, raw.astype(np.int64))
