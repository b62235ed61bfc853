"""predict.py on synthetic phantoms (no external data): geometry round trips, multi-class output,
equality with test.py, determinism, and one clear error (nothing written) per bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from models import MODEL_KEYS, build_model
from tools.convert import PREFIX_MAP, convert_file
from dataloaders.predict_io import PlaneGrid, read_input
from helpers import SIZE, cli_help, experiment, write_stored_label
from engine.snapshot import read_snapshot_header

ex = experiment()


@pytest.fixture(scope="module")
def phantoms(phantoms48: Path) -> Path:
    """48 x 48 phantoms, 5 scans (conftest.py)."""
    return phantoms48


@pytest.fixture(scope="module")
def run_dir(tiny_run: dict) -> Path:
    """The shared 4-step training run at image_size 32 (conftest.py)."""
    return Path(tiny_run["run_dir"])


def args(run_dir: Path, phantoms: Path, out: Path, *extra: str, query: list[Path] | None = None,
         support: int = 1) -> list[str]:
    argv = ["--snapshot", str(run_dir), "--support-image", str(phantoms / f"image_{support}.nii.gz"),
            "--support-label", str(phantoms / f"label_{support}.nii.gz"), "--out", str(out), "--device", "cpu",
            "--batch-size", "8"]
    for q in query or [phantoms / "image_2.nii.gz"]:
        argv += ["--query", str(q)]
    return argv + list(extra)


def run_predict(argv: list[str]) -> int:
    return predict.main(argv)


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == pytest.approx(b.GetSpacing(), abs=1e-6)
    assert a.GetOrigin() == pytest.approx(b.GetOrigin(), abs=1e-6)
    assert a.GetDirection() == pytest.approx(b.GetDirection(), abs=1e-6)


@pytest.fixture(scope="module")
def two_class(run_dir: Path, phantoms: Path, tmp_path_factory) -> Path:
    """predict.py with classes 1 and 2 on query scan 2 (support scan 1)."""
    out = tmp_path_factory.mktemp("pred_two_class")
    assert run_predict(args(run_dir, phantoms, out, "--classes", "1", "2")) == 0
    return out


# ---------------------------------------------------------------------------------------------- outputs
def test_multi_class_outputs(two_class: Path, phantoms: Path) -> None:
    pred, image = read(two_class / "image_2_pred.nii.gz")
    query = sitk.ReadImage(str(phantoms / "image_2.nii.gz"))
    same_geometry(image, query)
    assert image.GetPixelID() == sitk.sitkUInt8 and set(np.unique(pred)) <= {0, 1, 2}
    report = json.loads((two_class / "image_2_pred.json").read_text(encoding="utf-8"))
    voxel_ml = float(np.prod(query.GetSpacing())) / 1000
    assert list(report["classes"]) == ["1", "2"] and report["classes"]["1"]["name"] == "liver"
    for class_id, entry in report["classes"].items():
        mask = pred == int(class_id)
        assert entry["voxels"] == int(mask.sum())
        assert entry["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        ks = np.flatnonzero(mask.any(axis=(1, 2)))
        assert entry["slice_range"] == ([int(ks[0]), int(ks[-1])] if ks.size else None)
        assert len(entry["support_slices"]) == 3
    assert "relative position" in report["rule"] and report["segmented_slices"] == pred.shape[0]
    assert (two_class / "image_2_overlay.png").stat().st_size > 0


def test_classes_combine_by_the_per_class_predictions(two_class: Path, run_dir: Path, phantoms: Path,
                                                      tmp_path: Path) -> None:
    """Each class is segmented on its own (own generator), so the multi-class map labels a voxel c only
    where class c alone predicts it, and leaves 0 exactly where no class does."""
    multi, _ = read(two_class / "image_2_pred.nii.gz")
    single = {}
    for c in (1, 2):
        assert run_predict(args(run_dir, phantoms, tmp_path / str(c), "--classes", str(c))) == 0
        single[c], _ = read(tmp_path / str(c) / "image_2_pred.nii.gz")
        assert set(np.unique(single[c])) <= {0, c}
        assert np.all(single[c][multi == c] == c)
    np.testing.assert_array_equal(multi > 0, (single[1] > 0) | (single[2] > 0))
    assert (multi > 0).any(), "the tiny model predicts nothing: the test would not test the combination"


def test_same_prediction_as_test_py_all_slices(run_dir: Path, phantoms: Path, tmp_path: Path) -> None:
    """Same model input, support slices, chunks, batches and generator as test.py eval_mode=all_slices
    (support scan 1 = fold 0's supp_idx 0, first query scan 2)."""
    result = ex.run(command_name="test", config_updates={
        "reload_model_path": str(run_dir), "supp_idx": 0, "eval_mode": "all_slices", "test_label": [1],
        "test_batch_size": 8, "n_overlay_slices": 0, "device": "cpu",
        "path": {"log_dir": str(tmp_path / "tests")}}).result
    expected, _ = read(Path(result["run_dir"]) / "predictions" / "scan2_class1_liver.nii.gz")
    assert run_predict(args(run_dir, phantoms, tmp_path / "pred", "--classes", "1")) == 0
    got, _ = read(tmp_path / "pred" / "image_2_pred.nii.gz")
    np.testing.assert_array_equal(got, expected)


def test_deterministic_bit_for_bit(two_class: Path, run_dir: Path, phantoms: Path, tmp_path: Path) -> None:
    assert run_predict(args(run_dir, phantoms, tmp_path, "--classes", "1", "2")) == 0
    for name in ("image_2_pred.nii.gz", "image_2_pred.json"):
        assert (tmp_path / name).read_bytes() == (two_class / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- geometry
def reoriented(image: sitk.Image, code: str) -> sitk.Image:
    """The same voxels in another storage orientation (axes permuted / flipped, same physical space)."""
    return sitk.DICOMOrient(image, code)


def test_reoriented_query_comes_back_on_its_own_grid(two_class: Path, run_dir: Path, phantoms: Path,
                                                     tmp_path: Path) -> None:
    """A query stored as RPI with its axes permuted (k not axial) gives the same labels, on its grid."""
    original = sitk.ReadImage(str(phantoms / "image_2.nii.gz"))
    moved = sitk.PermuteAxes(reoriented(original, "RPI"), [2, 0, 1])
    path = tmp_path / "moved.nii.gz"
    sitk.WriteImage(moved, str(path))
    assert run_predict(args(run_dir, phantoms, tmp_path / "out", "--classes", "1", "2", query=[path])) == 0
    pred, image = read(tmp_path / "out" / "moved_pred.nii.gz")
    same_geometry(image, sitk.ReadImage(str(path)))  # the query as stored (NIfTI keeps float32 geometry)
    reference = sitk.ReadImage(str(two_class / "image_2_pred.nii.gz"))
    back = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))
    report = json.loads((tmp_path / "out" / "moved_pred.json").read_text(encoding="utf-8"))
    assert report["orientation"]["model"] == "LAS" and report["orientation"]["query"] != "LAS"
    assert report["segmented_k_range"] is None  # k is not the query's axial axis


def test_resampled_rotated_query_comes_back_on_its_own_grid(run_dir: Path, phantoms: Path, tmp_path: Path) -> None:
    """A query resampled to another size and spacing (non-square pixels) on a rotated grid."""
    original = sitk.ReadImage(str(phantoms / "image_2.nii.gz"))
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = (rot @ np.array(original.GetDirection()).reshape(3, 3)).ravel()
    grid = sitk.Image([40, 56, original.GetSize()[2]], original.GetPixelID())
    grid.SetSpacing([original.GetSpacing()[0] * 1.3, original.GetSpacing()[1] * 0.9, original.GetSpacing()[2]])
    grid.SetDirection(tuple(direction))
    grid.SetOrigin(original.GetOrigin())
    query = sitk.Resample(original, grid, sitk.Transform(), sitk.sitkLinear, 0)
    path = tmp_path / "rotated.nii.gz"
    sitk.WriteImage(query, str(path))
    assert run_predict(args(run_dir, phantoms, tmp_path / "out", "--classes", "1", query=[path])) == 0
    pred, image = read(tmp_path / "out" / "rotated_pred.nii.gz")
    same_geometry(image, sitk.ReadImage(str(path)))
    assert pred.shape == (original.GetSize()[2], 56, 40) and set(np.unique(pred)) <= {0, 1}


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """``image`` as a DICOM series, one file per slice (SimpleITK's series-writing recipe)."""
    folder.mkdir()
    d = image.GetDirection()
    tags = [("0008|0031", "000000"), ("0008|0021", "20260101"), ("0008|0008", "DERIVED\\SECONDARY"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.20260101.1"), ("0008|103e", "query"),
            ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetSize()[2]):
        plane = image[:, :, z]
        for tag, value in tags:
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        plane.SetMetaData("0020|0013", str(z))
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)


def test_dicom_series_query(two_class: Path, run_dir: Path, phantoms: Path, tmp_path: Path) -> None:
    """A DICOM series folder as query gives the NIfTI query's labels, on the series' own grid."""
    folder = tmp_path / "dicom_query"
    write_dicom_series(sitk.ReadImage(str(phantoms / "image_2.nii.gz")), folder)
    assert run_predict(args(run_dir, phantoms, tmp_path / "out", "--classes", "1", "2", query=[folder])) == 0
    pred, image = read(tmp_path / "out" / "dicom_query_pred.nii.gz")
    assert image.GetSize() == read_input(folder, "query").GetSize()
    reference = sitk.ReadImage(str(two_class / "image_2_pred.nii.gz"))
    back = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))


def test_plane_grid_pads_and_crops_back() -> None:
    grid = PlaneGrid.make((40, 56), (0.9, 1.3), 32)
    assert grid.square == (40, 81) and grid.side == 81 and grid.pad == (20, 0)  # square pixels of 0.9 mm
    masks = np.zeros((1, 40, 56), dtype=bool)
    masks[0, 10:30, 5:50] = True
    assert grid.masks(masks).shape == (1, 32, 32)
    images = grid.images(np.random.default_rng(0).normal(size=(2, 40, 56)).astype(np.float32), -3.0)
    assert images.shape == (2, 3, 32, 32) and float(images.min()) >= -3.0 - 1e-5
    prob = torch.softmax(torch.randn(2, 2, 32, 32), dim=1)
    back = grid.probabilities(prob)
    assert back.shape == (2, 2, 40, 56)
    torch.testing.assert_close(back.sum(dim=1), torch.ones(2, 40, 56))


def test_query_range_limits_the_segmented_slices(run_dir: Path, phantoms: Path, tmp_path: Path) -> None:
    assert run_predict(args(run_dir, phantoms, tmp_path, "--classes", "1", "2", "--query-range", "5", "12")) == 0
    pred, _ = read(tmp_path / "image_2_pred.nii.gz")
    outside = np.ones(pred.shape[0], dtype=bool)
    outside[5:13] = False
    assert not pred[outside].any()
    report = json.loads((tmp_path / "image_2_pred.json").read_text(encoding="utf-8"))
    assert report["segmented_k_range"] == [5, 12] and report["segmented_slices"] == 8


# ---------------------------------------------------------------------------------------------- labels as stored
CMR_VALUES = {1: 200, 2: 500, 3: 600}  # MS-CMRSeg stores LV-MYO / LV-BP / RV so (data/registry.py)


@pytest.fixture(scope="module")
def stored_label(phantoms: Path, tmp_path_factory) -> Path:
    """Support label 1 with its classes 1 / 2 / 3 stored as 200 / 500 / 600 (class 4 left out), uint16."""
    return write_stored_label(phantoms / "label_1.nii.gz", tmp_path_factory.mktemp("stored") / "label_cmr.nii.gz",
                              CMR_VALUES)


def with_label(argv: list[str], label: Path) -> list[str]:
    argv[argv.index("--support-label") + 1] = str(label)
    return argv


def check_stored_values(out: Path, two_class: Path, names: dict[str, str]) -> dict:
    """The prediction holds 200 / 500 where the class-id run holds 1 / 2, voxel for voxel; returns the JSON."""
    pred, image = read(out / "image_2_pred.nii.gz")
    reference, _ = read(two_class / "image_2_pred.nii.gz")
    assert image.GetPixelID() == sitk.sitkUInt16 and set(np.unique(pred)) <= {0, 200, 500}
    np.testing.assert_array_equal(pred, np.select([reference == 1, reference == 2], [200, 500], 0))
    report = json.loads((out / "image_2_pred.json").read_text(encoding="utf-8"))
    assert list(report["classes"]) == ["200", "500"]
    for value, class_id in (("200", 1), ("500", 2)):
        entry, expected = report["classes"][value], json.loads((two_class / "image_2_pred.json").read_text(
            encoding="utf-8"))["classes"][str(class_id)]
        assert entry["class_id"] == class_id and entry["name"] == names[value]
        assert entry["voxels"] == expected["voxels"] and entry["support_slices"] == expected["support_slices"]
    assert report["label_map"] == {"200": 1, "500": 2, "600": 3}
    return report


def test_label_map_takes_labels_as_stored(two_class: Path, run_dir: Path, phantoms: Path, stored_label: Path,
                                          tmp_path: Path) -> None:
    """--label-map 200:1,500:2,600:3: --classes and the prediction in the label's own values, the same
    segmentation as the label stored as class ids."""
    argv = with_label(args(run_dir, phantoms, tmp_path, "--classes", "200", "500", "--label-map", "200:1,500:2,600:3"),
                      stored_label)
    assert run_predict(argv) == 0
    check_stored_values(tmp_path, two_class, {"200": "liver", "500": "right_kidney"})


def test_a_cmr_snapshot_applies_its_datasets_label_map(two_class: Path, run_dir: Path, phantoms: Path,
                                                       stored_label: Path, tmp_path: Path) -> None:
    """A snapshot of the CMR dataset maps 200 / 500 / 600 to its classes 1 / 2 / 3 (LV-MYO / LV-BP / RV)
    without --label-map."""
    from engine.snapshot import find_snapshot, load_snapshot, save_snapshot

    snapshot = load_snapshot(find_snapshot(run_dir))
    snapshot["meta"] = {**snapshot["meta"], "dataset": "CMR", "class_names": {"1": "LV-MYO", "2": "LV-BP", "3": "RV"}}
    cmr = save_snapshot(tmp_path / "cmr.pth", snapshot)
    argv = with_label(args(cmr, phantoms, tmp_path / "out", "--classes", "200", "500"), stored_label)
    assert run_predict(argv) == 0
    check_stored_values(tmp_path / "out", two_class, {"200": "LV-MYO", "500": "LV-BP"})
    assert run_predict(with_label(args(cmr, phantoms, tmp_path / "all"), stored_label)) == 0  # every class
    report = json.loads((tmp_path / "all" / "image_2_pred.json").read_text(encoding="utf-8"))
    assert [(v, c["name"]) for v, c in report["classes"].items()] == [("200", "LV-MYO"), ("500", "LV-BP"),
                                                                     ("600", "RV")]


# ---------------------------------------------------------------------------------------------- bad input
def expect_error(argv: list[str], out: Path, capsys, pattern: str) -> None:
    capsys.readouterr()
    assert run_predict(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert pattern in err[0], err[0]
    assert not out.exists(), "a refused prediction must write nothing"


def test_support_label_without_the_class(run_dir: Path, phantoms: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    expect_error(args(run_dir, phantoms, out, "--classes", "1", "7"), out, capsys, "holds no voxel of class [7]")


def test_an_earlier_prediction_is_kept_unless_overwrite(two_class: Path, run_dir: Path, phantoms: Path,
                                                        tmp_path: Path, capsys) -> None:
    """A second run into the same --out (here from the same snapshot, other classes) is refused with one
    line and leaves the earlier files untouched; --overwrite replaces them."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(two_class, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run_predict(args(run_dir, phantoms, out, "--classes", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a prediction (image_2_pred.nii.gz and 2 more" in err[0], err
    assert "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run_predict(args(run_dir, phantoms, out, "--classes", "1", "--overwrite")) == 0
    report = json.loads((out / "image_2_pred.json").read_text(encoding="utf-8"))
    assert list(report["classes"]) == ["1"]


def test_images_that_are_not_3d(run_dir: Path, phantoms: Path, tmp_path: Path, capsys) -> None:
    image = sitk.ReadImage(str(phantoms / "image_2.nii.gz"))
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(image[:, :, 10], str(flat))
    out = tmp_path / "out"
    expect_error(args(run_dir, phantoms, out, query=[flat]), out, capsys, "is not a 3D single-channel volume")
    series = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(series))
    argv = args(run_dir, phantoms, out)
    argv[argv.index("--support-image") + 1] = str(series)
    expect_error(argv, out, capsys, "has 4 dimensions")


def test_label_on_another_grid(run_dir: Path, phantoms: Path, tmp_path: Path, capsys) -> None:
    label = sitk.ReadImage(str(phantoms / "label_1.nii.gz"))
    label.SetSpacing([s * 1.5 for s in label.GetSpacing()])
    path = tmp_path / "label.nii.gz"
    sitk.WriteImage(label, str(path))
    argv = args(run_dir, phantoms, tmp_path / "out")
    argv[argv.index("--support-label") + 1] = str(path)
    expect_error(argv, tmp_path / "out", capsys, "is not on the grid of its image")


def test_unreadable_snapshot(run_dir: Path, phantoms: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    argv = args(run_dir, phantoms, tmp_path / "out")
    argv[argv.index("--snapshot") + 1] = str(bad)
    expect_error(argv, tmp_path / "out", capsys, "expected a PyTorch file")
    (tmp_path / "empty_run" / "snapshots").mkdir(parents=True)
    argv[argv.index("--snapshot") + 1] = str(tmp_path / "empty_run")
    expect_error(argv, tmp_path / "out", capsys, "no final snapshot")


def test_help_states_the_rule() -> None:
    text = cli_help("predict.py")
    assert "same relative position" in " ".join(text.split()) and "--query-range" in text


# ---------------------------------------------------------------------------------------------- converter
def test_converted_reference_checkpoint_predicts(phantoms: Path, tmp_path: Path) -> None:
    """A reference-named state dict (reference prototype counts, random weights) -> tools.convert
    --dataset CHAOST2 -> its meta describes the model, and predict.py uses it as it is."""
    torch.manual_seed(0)
    ours = build_model({"backbone": "resnet50", "pretrained_weights": "none"}, SIZE).state_dict()
    inverse = {o: r for r, o in PREFIX_MAP.items()}
    reference = {}
    for key, value in ours.items():
        prefix = next(p for p in inverse if key.startswith(p))
        reference[inverse[prefix] + key[len(prefix):]] = value
    torch.save(reference, tmp_path / "ref.pth")
    convert_file(tmp_path / "ref.pth", tmp_path / "conv.pth", dataset="CHAOST2")
    meta = read_snapshot_header(tmp_path / "conv.pth", model_keys=MODEL_KEYS)["meta"]
    assert meta["backbone"] == "resnet50" and meta["image_size"] == SIZE and meta["orientation"] == "LAS"
    assert meta["class_names"]["1"] == "LIVER" and meta["model_keys"]["tau_fg"] == 0.5
    assert meta["model_keys"]["n_mlp_bg"] == 600 and meta["normalisation"] == "per-volume z-score"
    assert run_predict(args(tmp_path / "conv.pth", phantoms, tmp_path / "out", "--classes", "1")) == 0
    report = json.loads((tmp_path / "out" / "image_2_pred.json").read_text(encoding="utf-8"))
    assert report["classes"]["1"]["name"] == "LIVER"
    convert_file(tmp_path / "ref.pth", tmp_path / "conv_ct.pth", dataset="SABS")  # a CT dataset: CT thresholds
    keys = read_snapshot_header(tmp_path / "conv_ct.pth", model_keys=MODEL_KEYS)["meta"]["model_keys"]
    assert (keys["tau_fg"], keys["tau_bg"]) == (0.7, 0.6)


# ---------------------------------------------------------------------------------------------- one loader, one loop
def test_test_py_and_predict_py_load_through_engine_load_model(run_dir: Path, tmp_path: Path) -> None:
    """One loader (engine.snapshot.load_model): the model its meta describes, in eval mode; the same
    refusals reach test.py (naming reload_model_path) and predict.py (naming --snapshot)."""
    from engine.snapshot import load_model, load_snapshot, save_snapshot
    from helpers import load_test_script

    loaded = load_model(run_dir, torch.device("cpu"))
    assert loaded.path == run_dir / "snapshots" / "final.pth" and loaded.step == 4 and not loaded.model.training
    assert loaded.meta["image_size"] == SIZE and loaded.meta["model_keys"]["backbone"] == "resnet50"
    assert load_model(run_dir, torch.device("cpu"), compute={"fast_mlp": False}).model.config.fast_mlp is False
    for source in ("test.py", "predict.py"):  # neither builds a model of its own
        assert "build_model" not in (Path(predict.__file__).parent / source).read_text(encoding="utf-8")

    state = load_snapshot(loaded.path)
    state["meta"]["normalisation"] = "min-max"
    save_snapshot(tmp_path / "other_norm.pth", state)
    with pytest.raises(ValueError, match="normalisation 'min-max' is not supported"):
        load_model(tmp_path / "other_norm.pth", torch.device("cpu"))
    test_script = load_test_script()
    config = {"model": "qamp", "reload_model_path": str(tmp_path / "other_norm.pth"), "fast_mlp": True}
    with pytest.raises(ValueError, match=r"^reload_model_path='.*other_norm.pth': .*normalisation"):
        test_script.load_test_model(config, SIZE, torch.device("cpu"), None)
    with pytest.raises(predict.InputError, match=r"^--snapshot .*other_norm.pth: .*normalisation"):
        predict.prepare(predict.parse_args(args(tmp_path / "other_norm.pth", Path("."), tmp_path / "out")))

    old = {"model": state["model"], "config": {**state["config"], "image_size": None}}  # before meta, native size
    del old["model"]["fg_mlp.fc1.weight"]  # nothing to infer the size from
    save_snapshot(tmp_path / "old.pth", {**state, **old, "meta": None})
    with pytest.raises(ValueError, match="does not state the image size"):
        load_model(tmp_path / "old.pth", torch.device("cpu"))
    with pytest.raises(ValueError, match="missing.*fg_mlp.fc1.weight"):  # the size is taken; the tensor is missing
        load_model(tmp_path / "old.pth", torch.device("cpu"), image_size=SIZE)


class _RecordingModel:
    """Stands in for QAMP in ``segment_chunks``: records encoder passes and segmented batches."""

    def __init__(self) -> None:
        self.encoded: list[int] = []
        self.batches: list[int] = []

    def encode_support(self, image, mask, generator=None, feats=None):
        from types import SimpleNamespace

        if feats is None:
            self.encoded.append(int(image[0, 0, 0, 0, 0]))
            feats = image.clone()
        return SimpleNamespace(feats=feats, z=int(image[0, 0, 0, 0, 0]))

    def segment(self, state, images, generator=None):
        self.batches.append(images.shape[0])
        return {"pred": torch.full((images.shape[0], 2, 1, 1), float(state.z))}


def test_segment_chunks_is_the_loop_of_both_scripts() -> None:
    """engine.evaluate.segment_chunks: empty chunks skipped, each support slice encoded once with the
    cache, query slices in batches, every slice segmented against its chunk's support slice; and
    predict.py / engine.evaluate.predict_scan both go through it."""
    import inspect

    from engine import evaluate
    from engine.evaluate import segment_chunks

    model = _RecordingModel()
    chunks = [(5, np.arange(0, 5)), (7, np.arange(5, 5)), (9, np.arange(5, 8)), (5, np.arange(8, 10))]
    cache: dict = {}
    out = list(segment_chunks(model, chunks, lambda z: (torch.full((1, 1, 3, 1, 1), float(z)), torch.ones(1, 1, 1, 1)),
                              lambda zs: torch.zeros(len(zs), 3, 1, 1), 2, torch.device("cpu"), None, cache))
    assert model.encoded == [5, 9] and sorted(cache) == [5, 9]  # slice 5 meets the encoder once
    assert model.batches == [2, 2, 1, 2, 1, 2]
    assert [zs.tolist() for zs, _ in out] == [[0, 1], [2, 3], [4], [5, 6], [7], [8, 9]]
    assert [int(o["pred"][0, 0]) for _, o in out] == [5, 5, 5, 9, 9, 5]
    assert "segment_chunks(" in inspect.getsource(predict.segment)
    assert "segment_chunks(" in inspect.getsource(evaluate.predict_scan)


def test_orientation_facts_come_from_the_registry(phantoms: Path, tmp_path: Path) -> None:
    """A snapshot's orientation: its own, else its registered dataset's (SABS LPS), else CHAOST2's."""
    from data.registry import DATASETS
    from engine.snapshot import DEFAULT_ORIENTATION, model_orientation

    assert DATASETS["SABS"].orientation == "LPS" and DATASETS["CHAOST2"].orientation == "LAS"
    assert DEFAULT_ORIENTATION == DATASETS["CHAOST2"].orientation
    assert model_orientation({"orientation": "RAS", "dataset": "SABS"}) == "RAS"
    assert model_orientation({"orientation": None, "dataset": "SABS"}) == "LPS"
    assert model_orientation({"dataset": "custom"}) == model_orientation({}) == "LAS"
    from tools.convert import converted_meta

    assert converted_meta({"backbone": "resnet50"}, (SIZE, SIZE), "SABS", None)["orientation"] == "LPS"
    assert converted_meta({"backbone": "resnet50"}, (SIZE, SIZE), "SABS", "RAS")["orientation"] == "RAS"
