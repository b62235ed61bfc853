"""Pre-processing from raw downloads: the tests write the raw inputs in their true formats.

CHAOS: real DICOM series (pydicom, with position / orientation / spacing tags) plus 8-bit PNG masks
in the CHAOS grey values; Synapse: 512 x 512 NIfTI pairs in HU; CMR: MS-CMRSeg-named NIfTI pairs
with labels 200 / 500 / 600. Real data: a published CHAOST2 scan is turned back into DICOM + PNG to
test the flip rule and the whole chain on real anatomy, and verify must pass on the published
CHAOST2 and SABS folders.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from data.preprocess import chaos, generic, sabs
from data.preprocess.__main__ import main
from data.preprocess.common import (PreprocessError, grid_for_spacing, resample_image,
                                    resample_label, standardize_mr)
from data.preprocess.verify import verify_folder
from helpers import write_dicom_series

CHAOS_GREY = {1: 63, 2: 126, 3: 189, 4: 252}
ORGANS = {  # class id: (centre (x, y) as fractions of the width, radii (x, y) fractions, intensity)
    1: ((0.33, 0.45), (0.20, 0.17), 700.0),   # liver: large, on one side
    2: ((0.36, 0.75), (0.07, 0.08), 900.0),   # right kidney
    3: ((0.66, 0.75), (0.07, 0.08), 950.0),   # left kidney
    4: ((0.72, 0.45), (0.09, 0.11), 1100.0),  # spleen: other side
}


# ----------------------------------------------------------------------------------------------
# Raw-format writers
# ----------------------------------------------------------------------------------------------
def phantom(n_xy: int, n_z: int, organs: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen-like ``(Z, Y, X)`` MR phantom (int16) and its class-id label (uint8)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(n_z), np.arange(n_xy), np.arange(n_xy), indexing="ij")
    u, v, w = x / n_xy, y / n_xy, (z - (n_z - 1) / 2) / max(n_z / 2, 1)
    image = np.where(((u - 0.5) / 0.45) ** 2 + ((v - 0.55) / 0.38) ** 2 <= 1, 300.0, 20.0)
    label = np.zeros((n_z, n_xy, n_xy), np.uint8)
    for organ in organs:
        (cx, cy), (rx, ry), value = ORGANS[organ]
        inside = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 + (w / 0.9) ** 2 <= 1
        label[inside] = organ
        image[inside] = value
    image += rng.normal(0, 25, image.shape)
    image[rng.random(image.shape) < 0.002] = 4000.0  # a few bright spikes for the percentile clip
    return np.clip(image, 0, None).astype(np.int16), label


def write_chaos_scan(raw: Path, scan_id: int, image: sitk.Image, label: np.ndarray,
                     flip_rows: bool = False) -> Path:
    """``<raw>/<id>/T2SPIR/{DICOM_anon,Ground}``: DICOM series + CHAOS-grey PNG per slice."""
    base = raw / str(scan_id) / "T2SPIR"
    paths = write_dicom_series(image, base / "DICOM_anon")
    ground = base / "Ground"
    ground.mkdir(parents=True)
    grey = np.zeros(label.shape, np.uint8)
    for organ, value in CHAOS_GREY.items():
        grey[label == organ] = value
    if flip_rows:
        grey = grey[:, ::-1]
    for k, path in enumerate(paths):
        Image.fromarray(np.ascontiguousarray(grey[k])).save(ground / (path.stem + ".png"))
    return base


def sitk_volume(array: np.ndarray, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection(direction)
    return image


def synthetic_chaos_raw(raw: Path) -> dict[int, tuple[sitk.Image, np.ndarray]]:
    """Scan 1: 120 px at 2.7 mm (resampled 259 -> cropped 256), all organs. Scan 2: 100 px at
    3.0 mm (240 -> padded 256), no left kidney."""
    scans = {}
    for scan_id, n_xy, px, organs in ((1, 120, 2.7, (1, 2, 3, 4)), (2, 100, 3.0, (1, 2, 4))):
        array, label = phantom(n_xy, 6, organs, seed=scan_id)
        image = sitk_volume(array, (px, px, 9.0), origin=(-150.0, -140.0, -20.0 * scan_id))
        write_chaos_scan(raw, scan_id, image, label)
        scans[scan_id] = (image, label)
    return scans


def organ_centres(label: np.ndarray, image: sitk.Image) -> dict[int, tuple[float, ...]]:
    """Physical centre of each organ (mean voxel index mapped through ``image``'s geometry)."""
    out = {}
    for organ in np.unique(label[label > 0]):
        zyx = np.argwhere(label == organ).mean(axis=0)
        out[int(organ)] = image.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in zyx[::-1]))
    return out


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


# ----------------------------------------------------------------------------------------------
# CHAOS
# ----------------------------------------------------------------------------------------------
def test_chaos_end_to_end_geometry_labels_and_outputs(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    scans = synthetic_chaos_raw(raw)
    manifest = chaos.run(raw, out, progress=False)
    folder = out / "chaos_MR_T2_normalized"
    assert sorted(s["id"] for s in manifest["scans"]) == [1, 2]
    for scan_id, (raw_image, raw_label) in scans.items():
        image_array, image = read(folder / f"image_{scan_id}.nii.gz")
        label_array, label = read(folder / f"label_{scan_id}.nii.gz")
        # 6 slices x 9 mm = 54 mm -> round(54 / 7.7) = 7 slices; 256 x 256 after crop / pad
        assert image_array.shape == label_array.shape == (7, 256, 256)
        assert image.GetSpacing() == pytest.approx((1.25, 1.25, 7.7))
        assert label.GetSpacing() == image.GetSpacing()
        assert label.GetOrigin() == pytest.approx(image.GetOrigin())
        assert image.GetDirection() == pytest.approx((1, 0, 0, 0, -1, 0, 0, 0, 1))  # LAS
        assert image.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
        # codes by value range: scan 2 has no left kidney and its spleen is still 4
        expected = {1: [0, 1, 2, 3, 4], 2: [0, 1, 2, 4]}[scan_id]
        assert sorted(np.unique(label_array).tolist()) == expected
        # geometry kept through reorientation, resampling and crop/pad: each organ's physical
        # centre lands on that organ in the output
        for organ, point in organ_centres(raw_label, raw_image).items():
            index = label.TransformPhysicalPointToIndex(point)
            assert label_array[index[2], index[1], index[0]] == organ
        # intensities: clipped at the raw 99.5th percentile, never below the raw minimum
        raw_array = sitk.GetArrayFromImage(raw_image).astype(np.float32)
        assert image_array.max() <= np.percentile(raw_array, 99.5) + 1e-3
        assert image_array.min() >= raw_array.min() - 1e-3
        notes = manifest["scans"][[s["id"] for s in manifest["scans"]].index(scan_id)]["notes"]
        assert notes["gt_flip"] == "none" and notes["mask_pairing"] == "file_stem"
    # scan 2 (240 px) was padded: 8 columns of the image minimum, label 0
    image_array, _ = read(folder / "image_2.nii.gz")
    label_array, _ = read(folder / "label_2.nii.gz")
    assert np.all(image_array[:, :, :8] == image_array.min()) and np.all(label_array[:, :, :8] == 0)
    # classmaps count pixels of each class; the missing organ has no slices
    cmap = json.loads((folder / "classmap_1.json").read_text(encoding="utf-8"))
    assert cmap["LK"]["2"] == [] and cmap["LK"]["1"] and set(cmap) == {"BG", "LIVER", "RK", "LK", "SPLEEN"}
    label_array, _ = read(folder / "label_1.nii.gz")
    assert cmap["SPLEEN"]["1"] == [z for z in range(7) if (label_array[z] == 4).sum() >= 1]
    assert {p.name for p in folder.iterdir()} >= {"manifest.json", "pixel_counts.json",
                                                 "classmap_100.json", "classmap_400.json"}
    assert verify_folder(folder).ok


def test_chaos_real_scan_roundtrip_and_flip_rule(chaos_dir: Path, tmp_path: Path) -> None:
    """A published CHAOST2 scan (already on the target grid) written back as DICOM + PNG in the
    DICOM pixel order comes back unchanged apart from the clip; with the masks row-flipped (as the
    reference's dcm2nii step needed), the overlap rule finds the flip and the result is the same."""
    published = sitk.ReadImage(str(chaos_dir / "image_1.nii.gz"))
    published_label = sitk.ReadImage(str(chaos_dir / "label_1.nii.gz"))
    dicom_order = sitk.DICOMOrient(published, "LPS")  # the layout of the scanner's pixel data
    label_order = sitk.GetArrayFromImage(sitk.DICOMOrient(published_label, "LPS")).astype(np.uint8)
    expected_image = sitk.GetArrayFromImage(published)
    expected_image = np.minimum(expected_image, np.percentile(expected_image, 99.5))
    for flip_rows, name in ((False, "none"), (True, "rows")):
        raw, out = tmp_path / f"raw_{name}", tmp_path / f"out_{name}"
        write_chaos_scan(raw, 1, dicom_order, label_order, flip_rows=flip_rows)
        manifest = chaos.run(raw, out, progress=False, min_tps=(1,))
        notes = manifest["scans"][0]["notes"]
        assert notes["gt_flip"] == name and not notes["interpolated"]
        image_array, image = read(out / "chaos_MR_T2_normalized" / "image_1.nii.gz")
        label_array, _ = read(out / "chaos_MR_T2_normalized" / "label_1.nii.gz")
        np.testing.assert_allclose(image_array, expected_image, atol=1e-3)
        np.testing.assert_array_equal(label_array, sitk.GetArrayFromImage(published_label))
        assert image.GetOrigin() == pytest.approx(published.GetOrigin(), abs=1e-3)
        assert image.GetDirection() == pytest.approx(published.GetDirection(), abs=1e-6)


def test_standardize_is_identity_on_a_real_chaost2_scan(chaos_dir: Path) -> None:
    """Resample + crop on a scan already at 1.25 x 1.25 x 7.7 mm, 256 x 256: only the clip acts."""
    image = sitk.ReadImage(str(chaos_dir / "image_3.nii.gz"))
    label = sitk.ReadImage(str(chaos_dir / "label_3.nii.gz"))
    label = sitk.Cast(label, sitk.sitkUInt8)
    out_image, out_label, info = standardize_mr(image, label, spacing=(1.25, 1.25, 7.7),
                                                crop_xy=(256, 256), clip_percentile_value=99.5)
    array = sitk.GetArrayFromImage(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out_image),
                               np.minimum(array, np.percentile(array, 99.5)), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out_label), sitk.GetArrayFromImage(label))
    assert out_image.GetOrigin() == image.GetOrigin() and out_image.GetSpacing() == image.GetSpacing()
    assert not info["interpolated"]
    assert info["clip_threshold"] < array.max()  # the clip did act


def test_resampling_keeps_the_field_of_view_without_zero_slices() -> None:
    """39 slices x 9 mm -> round(45.6) = 46 slices at 7.7 mm; the last one lies just past the raw
    extent and copies the nearest raw slice (the reference's int(x + 1) rule wrote a zero slice)."""
    image = sitk_volume(np.full((39, 8, 8), 5.0, np.float32), (1.25, 1.25, 9.0))
    grid = grid_for_spacing(image, (1.25, 1.25, 7.7))
    assert grid.size == (8, 8, 46)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resample_image(image, grid)), 5.0)


def test_resample_label_matches_full_volume_rule() -> None:
    """Bounding-box per-class resampling == resampling each full-volume indicator (rint, higher
    value wins), on an oblique grid with touching classes."""
    rng = np.random.default_rng(0)
    array = np.zeros((9, 40, 50), np.uint8)
    array[2:7, 5:25, 5:30] = 1
    array[3:6, 15:35, 20:45] = 3          # overlaps class 1's box: 3 wins where both round to 1
    array[rng.random(array.shape) < 0.01] = 2
    label = sitk_volume(array, (1.1, 0.9, 5.0), origin=(10.0, -5.0, 2.0),
                        direction=(0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0))
    grid = grid_for_spacing(label, (0.7, 0.7, 3.0))
    expected = np.zeros(tuple(reversed(grid.size)), np.uint8)
    for value in (1, 2, 3):
        indicator = sitk.GetImageFromArray((array == value).astype(np.float32))
        indicator.CopyInformation(label)
        expected[np.rint(sitk.GetArrayFromImage(resample_image(indicator, grid))) == 1] = value
    got = sitk.GetArrayFromImage(resample_label(label, grid))
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got).tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------------
# SABS and CMR
# ----------------------------------------------------------------------------------------------
def write_synapse_pair(root: Path, number: int, n_z: int, spacing: float, seed: int) -> tuple[sitk.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 30, (n_z, 512, 512))
    hu[:, :40, :] = -1000.0                                       # air at the top border
    label = np.zeros((n_z, 512, 512), np.uint8)
    label[:, 200:300, 150:260] = 6                                # liver box
    label[:, 220:260, 330:380] = 1                                # spleen box
    label[1:3, 300:330, 200:230] = 13                             # left adrenal
    hu[label == 6] = 80.0
    hu[label == 1] = 300.0                                        # above the window: clipped
    image = sitk_volume(hu.astype(np.int16), (spacing, spacing, 2.5), origin=(-170.0, -180.0, 30.0))
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(root / "img" / f"img{number:04d}.nii.gz"))
    lab = sitk_volume(label, (spacing, spacing, 2.5), origin=(-170.0, -180.0, 30.0))
    sitk.WriteImage(lab, str(root / "label" / f"label{number:04d}.nii.gz"))
    return image, label


def test_sabs_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "RawData" / "Training"
    pairs = {number: write_synapse_pair(root, number, 4, px, number)
             for number, px in ((7, 0.7), (2, 0.8))}
    manifest = sabs.run(tmp_path, tmp_path / "out", progress=False)
    folder = tmp_path / "out" / "sabs_CT_normalized"
    assert manifest["id_map"] == {"0": "RawData/Training/img/img0002.nii.gz",
                                  "1": "RawData/Training/img/img0007.nii.gz"}
    for new_id, number in ((0, 2), (1, 7)):
        raw_image, raw_label = pairs[number]
        image_array, image = read(folder / f"image_{new_id}.nii.gz")
        label_array, label = read(folder / f"label_{new_id}.nii.gz")
        assert image_array.shape == label_array.shape == (4, 257, 257)  # z kept
        px = raw_image.GetSpacing()[0]
        assert image.GetSpacing() == pytest.approx((px * 448 / 256, px * 448 / 256, 2.5))
        assert image.GetOrigin() == pytest.approx(raw_image.TransformIndexToPhysicalPoint((32, 32, 0)))
        assert label.GetOrigin() == pytest.approx(image.GetOrigin())
        assert 0.0 <= image_array.min() and image_array.max() <= 255.0
        assert image_array[:, 0, :].max() == pytest.approx(0.0, abs=1e-3)  # air -> 0 after window
        spleen = image_array[label_array == 1]
        assert spleen.min() == pytest.approx(255.0, abs=1e-3)  # 300 HU > 275: top of the window
        assert sorted(np.unique(label_array).tolist()) == [0, 1, 6, 13]
        for organ, point in organ_centres(raw_label, raw_image).items():
            index = label.TransformPhysicalPointToIndex(point)
            assert label_array[index[2], index[1], index[0]] == organ
    assert verify_folder(folder).ok


def test_cmr_end_to_end(tmp_path: Path) -> None:
    raw = tmp_path / "MS-CMRSeg"
    for number in (3, 1):
        array, label = phantom(96, 8, (1, 2, 4), seed=number)
        cmr_label = np.select([label == 1, label == 2, label == 4], [200, 500, 600], 0).astype(np.uint16)
        image = sitk_volume(array, (1.5, 1.5, 10.0))
        lab = sitk_volume(cmr_label, (1.5, 1.5, 10.0))
        (raw / "c0t2lge").mkdir(parents=True, exist_ok=True)
        (raw / "labels").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(raw / "c0t2lge" / f"patient{number}_C0.nii.gz"))
        sitk.WriteImage(lab, str(raw / "labels" / f"patient{number}_C0_manual.nii.gz"))
    assert main(["cmr", "--raw", str(raw), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    folder = tmp_path / "out" / "cmr_MR_normalized"
    for scan_id in (1, 3):
        image_array, image = read(folder / f"image_{scan_id}.nii.gz")
        label_array, label = read(folder / f"label_{scan_id}.nii.gz")
        assert image_array.shape == (round(80 / 7.99), 256, 256)
        assert image.GetSpacing() == pytest.approx((1.25, 1.25, 7.99))
        assert sorted(np.unique(label_array).tolist()) == [0, 200, 500, 600]
        assert label.GetPixelID() == sitk.sitkUInt16
    cmap = json.loads((folder / "classmap_1.json").read_text(encoding="utf-8"))
    assert set(cmap) == {"BG", "LV-MYO", "LV-BP", "RV"} and cmap["RV"]["1"]
    assert main(["verify", str(folder)]) == 0


def test_generic_label_map_and_spacing(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir(parents=True)
    for case in ("case_a", "case_b"):
        array, label = phantom(64, 5, (1, 4), seed=len(case))
        sitk.WriteImage(sitk_volume(array, (2.0, 2.0, 4.0)), str(raw / "images" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk_volume((label > 0).astype(np.uint8) * 255, (2.0, 2.0, 4.0)),
                        str(raw / "labels" / f"{case}.nii.gz"))
    manifest = generic.run(raw, tmp_path / "out", dataset="pelvis", spacing=(1.0, 1.0, 0),
                           crop_xy=(96, 96), label_map={0: 0, 255: 1}, progress=False)
    assert manifest["id_map"] == {"0": "case_a", "1": "case_b"}  # non-numeric ids renumbered
    image_array, image = read(tmp_path / "out" / "pelvis_normalized" / "image_0.nii.gz")
    label_array, _ = read(tmp_path / "out" / "pelvis_normalized" / "label_0.nii.gz")
    assert image_array.shape == (5, 96, 96) and image.GetSpacing() == pytest.approx((1.0, 1.0, 4.0))
    assert sorted(np.unique(label_array).tolist()) == [0, 1]
    custom = json.loads((tmp_path / "out" / "pelvis_normalized" / "dataset.json").read_text(encoding="utf-8"))
    assert custom == {"name": "pelvis", "modality": "MR", "labels": {"1": "CLASS_1"}, "image_size": 96}


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
def test_verify_passes_on_the_published_chaost2_and_sabs(chaos_dir: Path, sabs_dir: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(chaos_dir), "--dataset", "CHAOST2"]) == 0
    assert main(["--verify", str(sabs_dir)]) == 0
    text = capsys.readouterr().out
    assert "PASS: 20 scans" in text and "PASS: 30 scans" in text
    assert "legacy_label_sum" in text  # the published CHAOST2 classmaps use the legacy rule


def test_verify_detects_damage(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    synthetic_chaos_raw(raw)
    chaos.run(raw, out, progress=False)
    folder = out / "chaos_MR_T2_normalized"
    cmap = json.loads((folder / "classmap_1.json").read_text(encoding="utf-8"))
    cmap["LIVER"]["1"] = cmap["LIVER"]["1"][1:]
    (folder / "classmap_1.json").write_text(json.dumps(cmap), encoding="utf-8")
    label_array, label = read(folder / "label_2.nii.gz")
    label_array[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(label_array)
    bad.CopyInformation(label)
    sitk.WriteImage(bad, str(folder / "label_2.nii.gz"))
    report = verify_folder(folder)
    problems = "\n".join(report.failures)
    assert not report.ok
    assert "classmap_1.json" in problems and "unexpected label values [7]" in problems
    assert "sha256" in problems
    (folder / "image_1.nii.gz").unlink()
    assert main(["verify", str(folder)]) == 1


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def chaos_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    synthetic_chaos_raw(raw)
    return raw


def test_error_missing_folders(chaos_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="folder not found"):
        chaos.run(tmp_path / "nowhere", tmp_path / "out", progress=False)
    shutil.rmtree(chaos_raw / "2" / "T2SPIR" / "Ground")
    with pytest.raises(PreprocessError, match=r"missing folder .*2/T2SPIR/Ground"):
        chaos.run(chaos_raw, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "chaos_MR_T2_normalized").exists()


def test_error_two_dicom_series(chaos_raw: Path, tmp_path: Path) -> None:
    extra = sitk_volume(np.zeros((2, 100, 100), np.int16), (3.0, 3.0, 9.0))
    write_dicom_series(extra, chaos_raw / "2" / "T2SPIR" / "DICOM_anon", stem="IMG-0003-{:05d}")
    with pytest.raises(PreprocessError, match=r"holds 2 DICOM series .* expected exactly one"):
        chaos.run(chaos_raw, tmp_path / "out", progress=False)


def test_error_png_count(chaos_raw: Path, tmp_path: Path) -> None:
    next(iter(sorted((chaos_raw / "1" / "T2SPIR" / "Ground").iterdir()))).unlink()
    with pytest.raises(PreprocessError, match="5 PNG masks but the DICOM series has 6 slices"):
        chaos.run(chaos_raw, tmp_path / "out", progress=False)


def test_error_unreadable_files(chaos_raw: Path, tmp_path: Path) -> None:
    png = sorted((chaos_raw / "1" / "T2SPIR" / "Ground").iterdir())[2]
    png.write_bytes(b"not a png")
    with pytest.raises(PreprocessError, match=f"cannot read ground-truth mask .*{png.name}"):
        chaos.run(chaos_raw, tmp_path / "out", progress=False)
    shutil.rmtree(chaos_raw / "1")
    (chaos_raw / "2" / "T2SPIR" / "DICOM_anon" / "IMG-0002-00099.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(PreprocessError, match=r"not readable as part of the series .*IMG-0002-00099"):
        chaos.run(chaos_raw, tmp_path / "out2", progress=False)
    root = tmp_path / "syn"
    write_synapse_pair(root, 1, 2, 0.7, 0)
    (root / "img" / "img0001.nii.gz").write_bytes(b"truncated")
    assert main(["sabs", "--raw", str(root), "--out", str(tmp_path / "o3"), "--quiet"]) == 2


def test_error_unexpected_label_values(chaos_raw: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    png = sorted((chaos_raw / "2" / "T2SPIR" / "Ground").iterdir())[3]
    mask = np.asarray(Image.open(png)).copy()
    mask[0, 0] = 30
    Image.fromarray(mask).save(png)
    with pytest.raises(PreprocessError, match=r"unexpected mask values \[30\]"):
        chaos.run(chaos_raw, tmp_path / "out", progress=False)
    root = tmp_path / "syn"
    write_synapse_pair(root, 1, 2, 0.7, 0)
    lab = sitk.ReadImage(str(root / "label" / "label0001.nii.gz"))
    array = sitk.GetArrayFromImage(lab)
    array[0, 0, 0] = 14
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(root / "label" / "label0001.nii.gz"))
    assert main(["sabs", "--raw", str(root), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "unexpected label values [14]" in capsys.readouterr().err


def test_error_wrong_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "download"
    (raw / "Training" / "img").mkdir(parents=True)
    (raw / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(PreprocessError) as err:
        chaos.run(raw, tmp_path / "out", progress=False)
    assert "expected <raw>/<id>/T2SPIR/DICOM_anon" in str(err.value)
    assert "'Training/'" in str(err.value) and "'notes.txt'" in str(err.value)
    assert main(["sabs", "--raw", str(raw), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "expected <raw>/img/img<NNNN>.nii.gz" in message and "Training/" in message
    regdata = tmp_path / "reg"
    (regdata / "img").mkdir(parents=True)
    (regdata / "label").mkdir()
    (regdata / "img" / "img0001-0002.nii.gz").write_bytes(b"")
    with pytest.raises(PreprocessError, match="RegData"):
        sabs.run(regdata, tmp_path / "out", progress=False)
    with pytest.raises(PreprocessError, match=r"found 0 images and 0 labels"):
        generic.run(raw, tmp_path / "out", dataset="CMR", progress=False)


def test_never_overwrites_and_failed_runs_leave_no_trace(chaos_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    chaos.run(chaos_raw, out, progress=False)
    folder = out / "chaos_MR_T2_normalized"
    before = (folder / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        chaos.run(chaos_raw, out, progress=False)
    # a failing run with --overwrite keeps the old folder and leaves no partial folder behind
    (sorted((chaos_raw / "1" / "T2SPIR" / "Ground").iterdir())[0]).write_bytes(b"broken")
    with pytest.raises(PreprocessError):
        chaos.run(chaos_raw, out, overwrite=True, progress=False)
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["chaos_MR_T2_normalized"]


# ----------------------------------------------------------------------------------------------
# one grid rule, one orientation fact
# ----------------------------------------------------------------------------------------------
def test_one_grid_rule_for_preprocessing_verify_and_predict() -> None:
    """utils.io.grid_differences is the rule of every image / label check: within a thousandth of a
    voxel (origin), a relative 1e-4 (spacing) and 1e-4 (direction) the grids are the same."""
    from dataloaders.predict_io import InputError, check_same_grid as predict_check
    from data.preprocess.common import Grid, check_same_grid as preprocess_check
    from utils.io import grid_differences

    image = sitk.Image(8, 8, 4, sitk.sitkFloat32)
    image.SetSpacing((2.0, 2.0, 5.0))
    image.SetOrigin((-100.0, 50.0, 10.0))

    def moved(origin=(0.0, 0.0, 0.0), spacing=1.0, direction=0.0) -> sitk.Image:
        other = sitk.Image(image)
        other.SetOrigin(tuple(o + d for o, d in zip(image.GetOrigin(), origin)))
        other.SetSpacing(tuple(s * spacing for s in image.GetSpacing()))
        other.SetDirection((1.0, direction, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return other

    same = [moved((0.0019, 0.0, 0.0)), moved(spacing=1 + 0.9e-4), moved(direction=0.9e-4)]
    differ = [moved((0.0021, 0.0, 0.0)), moved(spacing=1 + 1.1e-4), moved(direction=1.1e-4),
              sitk.Image(8, 8, 5, sitk.sitkFloat32)]
    for other in same:
        assert grid_differences(image, other) == [] and Grid.of(image).matches(other)
        preprocess_check(image, other, "image", "label")
        predict_check(image, other, "image", "label")
    for other, what in zip(differ, ("origin", "spacing", "direction", "size")):
        assert [d.split()[0] for d in grid_differences(image, other)][:1] == [what]
        assert not Grid.of(image).matches(other)
        with pytest.raises(PreprocessError, match=f"not on the same grid: .*{what}"):
            preprocess_check(image, other, "image", "label")
        with pytest.raises(InputError, match=f"not on the grid of its image .*{what}"):
            predict_check(image, other, "image", "label")


def test_registry_orientation_is_that_of_the_shipped_scans(chaos_dir: Path, sabs_dir: Path) -> None:
    """DatasetSpec.orientation of CHAOST2 (LAS) and SABS (LPS) is what every shipped scan's header says."""
    from data.registry import DATASETS
    from utils.io import orientation_code, read_image_header

    for name, folder in (("CHAOST2", chaos_dir), ("SABS", sabs_dir)):
        codes = {orientation_code(read_image_header(p).GetDirection()) for p in folder.glob("image_*.nii.gz")}
        assert codes == {DATASETS[name].orientation}, name
    assert chaos.DEFAULTS["orientation"] == DATASETS["CHAOST2"].orientation
