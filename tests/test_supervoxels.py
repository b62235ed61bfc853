"""3D Felzenszwalb supervoxels: kernel == NumPy oracle, published CHAOST2 files, CLI, bad input."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data.supervoxels import felzenszwalb_3d as ref
from data.supervoxels import generate_supervoxels as gen
from data.supervoxels.generate_supervoxels import SupervoxelError

from data.supervoxels import felzenszwalb_3d_cy as cy  # fails loudly when not built

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAOS_TEST_IDS = ("2", "21")  # the two smallest CHAOS scans (31 and 30 slices)


# ----------------------------------------------------------------------------- algorithm


def test_edge_classes_cover_the_26_neighbourhood_once():
    offsets = {tuple(np.subtract(c.a, c.b)) for c in ref.EDGE_CLASSES}
    both = offsets | {tuple(-np.array(o)) for o in offsets}
    neighbours = {(z, y, x) for z in (-1, 0, 1) for y in (-1, 0, 1) for x in (-1, 0, 1)} - {(0, 0, 0)}
    assert len(ref.EDGE_CLASSES) == len(offsets) == 13
    assert both == neighbours
    for c in ref.EDGE_CLASSES:  # the weight follows the number of steps across and within slices
        dz, dy, dx = np.abs(np.subtract(c.a, c.b))
        expected = ref.W_INPLANE if dz == 0 else [ref.W_Z, ref.W_Z1, ref.W_Z2][dy + dx]
        assert c.weight == expected, c.name


def test_edge_weights_follow_the_anisotropy():
    w = ref.edge_weights((7.7, 1.25, 1.25))
    s = 7.7 / 1.25
    np.testing.assert_allclose(w, [1, s**2, (1 + s**2) / 2, (2 + s**2) / 3], rtol=1e-14)
    np.testing.assert_allclose(ref.edge_weights((2.0, 2.0, 2.0)), [1, 1, 1, 1], rtol=1e-15)
    with pytest.raises(ValueError, match="positive"):
        ref.edge_weights((0.0, 1.0, 1.0))


def test_enumerated_edge_costs():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(3, 4, 5))
    edges, costs = ref.enumerate_edges(image, ref.edge_weights((3.0, 1.0, 1.0)))
    # every unordered pair of 26-neighbours exactly once
    coords = np.stack(np.unravel_index(np.arange(image.size), image.shape), 1)
    chebyshev = np.abs(coords[:, None] - coords[None]).max(axis=2)
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(chebyshev == 1)))}
    assert len(edges) == len(expected)
    assert {(min(e), max(e)) for e in edges.tolist()} == expected
    # cost sqrt(w) * |dI| with w = 1 in-plane, s^2 across, (1 + s^2) / 2, (2 + s^2) / 3 (s = 3)
    step = np.abs(coords[edges[:, 0]] - coords[edges[:, 1]])
    n_across = step[:, 0] * (1 + step[:, 1:].sum(axis=1))
    expected_w = np.choose(n_across, [1.0, 9.0, 5.0, 11 / 3])
    flat = image.ravel()
    np.testing.assert_allclose(costs, np.sqrt(expected_w) * np.abs(flat[edges[:, 0]] - flat[edges[:, 1]]))


def numpy1_known_cases():
    rng = np.random.default_rng(1)
    yield rng.integers(0, 4, size=700)  # heavy ties
    yield rng.integers(0, 10**6, size=1000)  # almost distinct
    yield np.sort(rng.integers(0, 30, size=900))[::-1].copy()  # descending with ties
    n = 512  # Musser's median-of-3 killer: drives introsort into its heapsort fallback
    killer = np.zeros(n, dtype=np.int64)
    for i in range(1, n // 2 + 1):
        if i % 2:
            killer[i - 1], killer[i] = i, n // 2 + i
        killer[n // 2 + i - 1] = 2 * i
    yield killer
    yield np.array([], dtype=np.int64)
    yield np.array([3, 1, 2])


@pytest.mark.parametrize("keys", list(numpy1_known_cases()), ids=lambda k: f"n{len(k)}")
def test_reference_argsort_python_equals_cython(keys):
    perm = ref.numpy1_argsort(keys.astype(float))
    np.testing.assert_array_equal(keys[perm], np.sort(keys))
    np.testing.assert_array_equal(cy.reference_argsort(keys), perm)
    # lazy, left-to-right evaluation in pieces gives the same permutation
    stops = [len(keys) // 7, len(keys) // 3, len(keys) // 3 + 1, len(keys) - 2]
    np.testing.assert_array_equal(cy.reference_argsort(keys, stops), perm)


def test_reference_argsort_is_not_stable_but_deterministic():
    keys = np.repeat([1, 0], 40)
    perm = ref.numpy1_argsort(keys)
    assert not np.array_equal(perm, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(perm, ref.numpy1_argsort(keys))


def random_volumes():
    rng = np.random.default_rng(2025)
    for trial in range(12):
        shape = tuple(int(n) for n in rng.integers(2, 8, size=3))
        if trial % 3 == 0:  # few levels, many ties
            image = rng.integers(0, 5, size=shape) * rng.uniform(3, 60)
        elif trial % 3 == 1:  # continuous
            image = rng.uniform(0, 255, size=shape)
        else:  # piecewise constant: overlapping boxes
            image = np.zeros(shape)
            for _ in range(4):
                z, y, x = (int(rng.integers(0, n)) for n in shape)
                image[z:, y:, x:] += int(rng.integers(1, 4)) * 25.0
        spacing = [(1.0, 1.0, 1.0), (7.7, 1.25, 1.25), (0.5, 2.0, 2.0), (3.0, 1.17, 1.17)][trial % 4]
        scale = [1.0, 300.0, 3000.0][trial % 3]
        min_size = int(rng.integers(0, 40))
        yield image, spacing, scale, min_size
    # more distinct intensities than the kernel's level table holds: the per-edge fallback path
    yield rng.uniform(0, 255, size=(3, 30, 30)), (5.0, 1.0, 1.0), 1.0, 20


@pytest.mark.parametrize("order", ref.EDGE_ORDERS)
def test_cython_equals_numpy(order):
    for image, spacing, scale, min_size in random_volumes():
        expected = ref.felzenszwalb_3d(image, spacing, scale, min_size, order)
        got = cy.felzenszwalb_3d(image, spacing, scale, min_size, order)
        assert got.dtype == expected.dtype == np.int32
        np.testing.assert_array_equal(got, expected, err_msg=f"{image.shape} {spacing} {scale}")
    assert cy.intensity_levels(np.arange(3000.0)) is None  # the last volume took the fallback


def test_min_size_and_scale_behave():
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, size=(4, 12, 12))
    for order in ref.EDGE_ORDERS:
        labels = cy.felzenszwalb_3d(image, (2.0, 1.0, 1.0), 1.0, 50, order)
        sizes = np.bincount(labels.ravel())
        assert sizes.min() >= 50 and labels.max() + 1 == len(sizes)
        # labels are numbered by first voxel in raster order
        firsts = [np.flatnonzero(labels.ravel() == k)[0] for k in range(len(sizes))]
        assert firsts == sorted(firsts)
    constant = np.full((3, 5, 5), 7.0)
    assert cy.felzenszwalb_3d(constant, min_size=0).max() == 0  # one segment
    single = cy.felzenszwalb_3d(np.zeros((1, 1, 1)), min_size=5)
    np.testing.assert_array_equal(single, [[[0]]])


# ----------------------------------------------------------------------------- pipeline pieces


def test_foreground_mask_largest_component_with_holes_filled():
    image = np.zeros((3, 12, 12))
    image[0, 1:9, 1:9] = 50  # big square with a hole
    image[0, 4:6, 4:6] = 0
    image[0, 10:12, 10:12] = 50  # small separate blob: dropped
    image[1, 2:4, 2:4] = 10  # not above the threshold
    mask = gen.foreground_mask(image, threshold=10)
    expected = np.zeros_like(mask)
    expected[0, 1:9, 1:9] = True
    np.testing.assert_array_equal(mask, expected)


def test_mask_supervoxels_renumbers_zero_and_clears_background():
    labels = np.array([[[0, 0, 1, 2]]])
    mask = np.array([[[True, True, False, True]]])
    np.testing.assert_array_equal(gen.mask_supervoxels(labels, mask), [[[3, 3, 0, 2]]])


def test_rescale_and_spacing():
    np.testing.assert_array_equal(gen.rescale_to_255(np.array([0, 128, 255], np.uint8)), [0, 128, 255])
    np.testing.assert_array_equal(gen.rescale_to_255(np.array([5.0, 5.0])), [0, 0])
    image = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    image.SetSpacing((1.25, 1.25, float(np.float32(7.7))))
    assert gen.reference_spacing(image) == (7.7, 1.25, 1.25)


def test_adjusted_rand_index():
    assert gen.adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3]) == 1.0
    assert gen.adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.5714285714285715)
    assert gen.adjusted_rand_index([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0
    assert gen.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- real data


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def chaos_subset(chaos_dir: Path, tmp_path_factory) -> Path:
    """A data folder with links to two CHAOS scans (links, never copies)."""
    folder = tmp_path_factory.mktemp("chaos_subset")
    for sid in CHAOS_TEST_IDS:
        (folder / f"image_{sid}.nii.gz").symlink_to(chaos_dir / f"image_{sid}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def first_run(chaos_subset: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("sv") / "supervoxels_5000"
    code = gen.main(["--data-dir", str(chaos_subset), "--out-dir", str(out)])
    assert code == 0
    return out


def test_reproduces_published_chaos_supervoxels(first_run: Path, chaos_sv_dir: Path):
    for sid in CHAOS_TEST_IDS:
        ours = read_array(first_run / f"superpix-MIDDLE_{sid}.nii.gz")
        published = read_array(chaos_sv_dir / f"superpix-MIDDLE_{sid}.nii.gz")
        assert ours.dtype == np.int32
        assert gen.adjusted_rand_index(ours, published) >= 0.95
        np.testing.assert_array_equal(ours, published)  # in fact bit for bit


def test_outputs_keep_geometry_and_summary(first_run: Path, chaos_dir: Path):
    summary = json.loads((first_run / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_sv"] == 5000 and summary["edge_order"] == "reference"
    assert [row["id"] for row in summary["scans"]] == list(CHAOS_TEST_IDS)
    for row in summary["scans"]:
        image = sitk.ReadImage(str(chaos_dir / f"image_{row['id']}.nii.gz"))
        out = sitk.ReadImage(str(first_run / row["output"]))
        assert out.GetSpacing() == image.GetSpacing()
        # NIfTI stores the direction as a float32 quaternion: equal up to that rounding
        np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), rtol=0, atol=1e-6)
        assert out.GetPixelID() == sitk.sitkInt32
        sv = sitk.GetArrayFromImage(out)
        ids, sizes = np.unique(sv[sv > 0], return_counts=True)
        assert row["status"] == "written" and row["seconds"] > 0
        assert row["n_ids"] == len(ids) and 15 <= len(ids) <= 45
        assert row["foreground_coverage"] == pytest.approx(np.count_nonzero(sv) / sv.size)
        assert row["segment_size_percentiles"]["p50"] == pytest.approx(np.median(sizes))
        assert row["segment_size_percentiles"]["p100"] == sizes.max()


def test_existing_outputs_are_kept_then_overwritten_identically(first_run, chaos_subset, capsys):
    paths = sorted(first_run.glob("superpix-MIDDLE_*.nii.gz"))
    before = {p: (p.stat().st_mtime_ns, read_array(p).tobytes()) for p in paths}
    assert gen.main(["--data-dir", str(chaos_subset), "--out-dir", str(first_run)]) == 0
    out = capsys.readouterr()
    assert out.out.count("kept (pass --overwrite to recompute)") + out.err.count(
        "kept (pass --overwrite to recompute)") == len(paths)
    assert all(p.stat().st_mtime_ns == before[p][0] for p in paths)
    summary = json.loads((first_run / "summary.json").read_text(encoding="utf-8"))
    assert {row["status"] for row in summary["scans"]} == {"kept"}

    # --overwrite, two worker processes: recomputed, identical arrays
    args = ["--data-dir", str(chaos_subset), "--out-dir", str(first_run), "--overwrite",
            "--workers", "2"]
    assert gen.main(args) == 0
    for p in paths:
        assert p.stat().st_mtime_ns != before[p][0]
        assert read_array(p).tobytes() == before[p][1]
    assert not [p for p in first_run.iterdir() if p.name.startswith(".")]  # no temp files left


def test_stable_order_is_deterministic_and_close_to_published(chaos_dir, chaos_sv_dir):
    image = sitk.ReadImage(str(chaos_dir / "image_21.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    spacing = gen.reference_spacing(image)
    a = gen.compute_supervoxels(array, spacing, edge_order="stable")
    b = gen.compute_supervoxels(array, spacing, edge_order="stable")
    assert a.tobytes() == b.tobytes()
    published = read_array(chaos_sv_dir / "superpix-MIDDLE_21.nii.gz")
    assert 0.9 <= gen.adjusted_rand_index(a, published) < 1.0


# ----------------------------------------------------------------------------- bad input


def run_cli(args, capsys) -> tuple[int, str]:
    code = gen.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


def write_nifti(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path), True)


def assert_nothing_written(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if "superpix" in p.name or p.name == "summary.json"
                 or p.name.startswith(".")]
    assert not leftovers, leftovers


def test_missing_and_empty_data_dir(tmp_path, capsys):
    code, err = run_cli(["--data-dir", tmp_path / "nope"], capsys)
    assert code == 1 and str(tmp_path / "nope") in err and "does not exist" in err
    assert "--data-dir" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["--data-dir", tmp_path / "empty"], capsys)
    assert code == 1 and "is empty" in err and str(tmp_path / "empty") in err
    assert_nothing_written(tmp_path)


def test_no_file_matches_pattern(tmp_path, capsys):
    (tmp_path / "scan_1.nii.gz").write_bytes(b"x")
    code, err = run_cli(["--data-dir", tmp_path], capsys)
    assert code == 1 and "matches --pattern 'image_*.nii.gz'" in err and "scan_1.nii.gz" in err
    code, err = run_cli(["--data-dir", tmp_path, "--pattern", "scan.nii.gz"], capsys)
    assert code == 1 and "exactly one '*'" in err
    assert_nothing_written(tmp_path)


def test_corrupt_and_truncated_images(tmp_path, capsys, chaos_dir):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "image_1.nii.gz").write_bytes(gzip.compress(b"not a nifti file" * 10))
    code, err = run_cli(["--data-dir", corrupt], capsys)
    assert code == 1 and str(corrupt / "image_1.nii.gz") in err and "corrupt" in err
    assert_nothing_written(corrupt)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (chaos_dir / "image_2.nii.gz").read_bytes()
    (truncated / "image_2.nii.gz").write_bytes(data[: len(data) // 2])
    code, err = run_cli(["--data-dir", truncated], capsys)
    assert code == 1 and str(truncated / "image_2.nii.gz") in err
    assert "truncated" in err and "Re-download or re-create" in err
    assert_nothing_written(truncated)


@pytest.mark.parametrize("shape", [(16, 16), (2, 3, 8, 8)], ids=["2D", "4D"])
def test_wrong_dimension(tmp_path, capsys, shape):
    write_nifti(tmp_path / "image_1.nii.gz", np.ones(shape, dtype=np.float32))
    code, err = run_cli(["--data-dir", tmp_path], capsys)
    assert code == 1 and str(tmp_path / "image_1.nii.gz") in err
    assert f"expected a 3D single-channel volume, got {len(shape)}D" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("n_sv", ["0", "-5"])
def test_non_positive_n_sv(tmp_path, capsys, n_sv):
    write_nifti(tmp_path / "image_1.nii.gz", np.ones((2, 8, 8), dtype=np.float32))
    code, err = run_cli(["--data-dir", tmp_path, "--n-sv", n_sv], capsys)
    assert code == 1 and f"expected --n-sv > 0, got {n_sv}" in err
    assert_nothing_written(tmp_path)


def test_extension_not_built(tmp_path, capsys, monkeypatch):
    write_nifti(tmp_path / "image_1.nii.gz", np.ones((2, 8, 8), dtype=np.float32))
    monkeypatch.setitem(sys.modules, gen.KERNEL_MODULE, None)  # import now fails as if not built
    code, err = run_cli(["--data-dir", tmp_path], capsys)
    assert code == 1 and "not built" in err
    assert "bash scripts/setup.sh" in err and "python data/supervoxels/setup.py build_ext --inplace" in err
    assert_nothing_written(tmp_path)


def test_failure_mid_batch_keeps_finished_outputs_whole(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_nifti(tmp_path / "image_1.nii.gz", rng.uniform(0, 100, size=(3, 20, 20)))
    write_nifti(tmp_path / "image_2.nii.gz", rng.uniform(0, 100, size=(3, 20, 20)))
    data = (tmp_path / "image_2.nii.gz").read_bytes()
    (tmp_path / "image_2.nii.gz").write_bytes(data[: len(data) - 200])  # header intact, data cut
    out = tmp_path / "out"
    code, err = run_cli(["--data-dir", tmp_path, "--out-dir", out, "--n-sv", "50"], capsys)
    assert code == 1 and str(tmp_path / "image_2.nii.gz") in err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "superpix-MIDDLE_1.nii.gz"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [row["id"] for row in summary["scans"]] == ["1"] and summary["incomplete"]["missing"] == ["2"]
    assert read_array(out / "superpix-MIDDLE_1.nii.gz").shape == (3, 20, 20)


@pytest.mark.parametrize("entry", [["data/supervoxels/generate_supervoxels.py"],
                                   ["-m", "data.supervoxels.generate_supervoxels"]],
                         ids=["script", "module"])
def test_command_line_entry_points(tmp_path, entry):
    result = subprocess.run([sys.executable, *entry, "--data-dir", str(tmp_path / "missing")],
                            cwd=REPO_ROOT, capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""}, encoding="utf-8")
    assert result.returncode == 1
    assert result.stderr.startswith("error: data directory") and "Traceback" not in result.stderr
