"""Nothing read wrong in silence, nothing hangs (issue 12): one test per case, on synthetic data
made here (no ``../shared`` needed). Each asserts the exit status or exception, the message, and
that nothing was written or overwritten.

Cases: truncated / corrupt gzip and NaN voxels through every reader (loaders, ``--check``,
``verify``, supervoxels, pre-processing); a supervoxel worker that dies or cannot start; an
unwritable supervoxel output folder; ``summary.json`` merged per file; ``tools.summarize`` with two
datasets and a failed run; ``n_shot > 1`` at test; weights / snapshot files that are not torch
files; ``verify`` on a CMR-like folder (classmap on remapped labels, mixed orientations); the same
scan stored LSP and PSR reoriented to identical voxels.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data.preprocess.__main__ import main as preprocess_main
from data.preprocess.common import DATASETS as PREPROCESS_DATASETS, orientation_code
from data.preprocess.verify import LEGACY_CLASSMAP_RULE, format_report, per_slice_counts, verify_folder
from data.supervoxels import generate_supervoxels as gen
from dataloaders import datasets
from utils.io import ImageIntegrityError, read_volume

REPO = Path(__file__).resolve().parents[1]
SPACING = (1.25, 1.25, 7.7)


# ----------------------------------------------------------------------------- helpers
def scan_arrays(seed: int, shape=(6, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A float32 image with a bright block and its uint8 label (class 1 in the block)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[1:5, 6:16, 5:17] = 1
    image[label == 1] += 200
    return image, label


def write(array: np.ndarray, path: Path, spacing=SPACING) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)
    return path


def custom_folder(folder: Path, ids=(1, 2, 3), nan_in: int | None = None) -> Path:
    """A loader-ready custom dataset: image_<id> / label_<id> plus dataset.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        image, label = scan_arrays(i)
        if i == nan_in:
            image[2, 3, 4] = np.nan
        write(image, folder / f"image_{i}.nii.gz")
        write(label, folder / f"label_{i}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"1": "BLOCK"}, "folds": [[1, 2]] * 5}),
                                         encoding="utf-8")
    return folder


def truncate(path: Path, keep: float = 0.75) -> None:
    """Cut a .nii.gz as an interrupted copy does (the header stays readable)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt(path: Path) -> None:
    """Flip one byte in the middle of the compressed data (a bad disk / transfer)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def state(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: compare before / after to prove nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8")


def assert_every_reader_refuses(folder: Path, bad: Path, words: tuple[str, ...], tmp_path: Path,
                                capsys) -> None:
    """The loaders, --check, verify, the supervoxel generator and pre-processing all refuse ``bad``
    with one message naming it, and write nothing."""
    before = state(folder)

    def check(message: str) -> None:
        assert str(bad) in message, message
        for word in words:
            assert word in message, message

    with pytest.raises(ImageIntegrityError) as err:  # the one low-level reader
        read_volume(bad)
    check(str(err.value))
    with pytest.raises(ImageIntegrityError) as err:  # the loaders (training and test.py)
        spec = datasets.get_dataset("custom", folder)  # reads the first image's header
        for files in datasets.discover_scans(folder):
            datasets.load_scan(spec, files)
    check(str(err.value))
    result = run_module("dataloaders.datasets", "--dataset", "custom", "--data-dir", str(folder), "--check")
    assert result.returncode != 0
    check(result.stderr.strip().splitlines()[-1])
    report = verify_folder(folder)  # data.preprocess verify: a failed row, never PASS
    assert not report.ok
    check(" ".join(report.failures))
    assert preprocess_main(["verify", str(folder)]) == 1
    assert f"FAIL: {len(report.rows)} scans" in capsys.readouterr().out
    if bad.name.startswith("image_"):  # the supervoxel generator reads images only
        sv = tmp_path / "sv"
        assert gen.main(["--data-dir", str(folder), "--n-sv", "20", "--out-dir", str(sv)]) == 1
        check(capsys.readouterr().err)
        bad_id = bad.name[len("image_"):-len(".nii.gz")]
        assert not (sv / f"superpix-MIDDLE_{bad_id}.nii.gz").exists()
    raw = tmp_path / "raw"  # pre-processing reads the raw files through the same reader
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir(parents=True)
    for i in (1, 2, 3):
        for kind, sub in (("image", "images"), ("label", "labels")):
            (raw / sub / f"case{i}.nii.gz").write_bytes((folder / f"{kind}_{i}.nii.gz").read_bytes())
    out = tmp_path / "pre"
    assert preprocess_main(["generic", "--raw", str(raw), "--out", str(out), "--spacing", "0", "0", "0",
                            "--label-values", "0,1", "--no-crop", "--quiet"]) == 2
    message = capsys.readouterr().err
    assert str(raw / ("images" if bad.name.startswith("image_") else "labels") /
               bad.name.replace("image_", "case").replace("label_", "case")) in message
    assert not out.exists() or not any(out.iterdir())
    assert state(folder) == before  # nothing written or overwritten beside the data


# ----------------------------------------------------------------------------- 1. truncated gzip
def test_truncated_gzip_is_refused_by_every_reader(tmp_path, capsys):
    folder = custom_folder(tmp_path / "data")
    clean, _ = read_volume(folder / "label_2.nii.gz")
    truncate(folder / "label_2.nii.gz")
    # what ITK alone makes of it: the cut part silently becomes zeros
    silent = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_2.nii.gz")))
    assert silent.sum() < clean.sum()
    assert_every_reader_refuses(folder, folder / "label_2.nii.gz",
                                ("truncated", "Re-download or re-create"), tmp_path, capsys)


def test_truncated_image_is_refused_by_every_reader_and_the_supervoxel_generator(tmp_path, capsys):
    folder = custom_folder(tmp_path / "data")
    truncate(folder / "image_3.nii.gz", 0.9)
    assert_every_reader_refuses(folder, folder / "image_3.nii.gz", ("truncated",), tmp_path, capsys)


def test_corrupt_gzip_is_refused_by_every_reader(tmp_path, capsys):
    folder = custom_folder(tmp_path / "data")
    corrupt(folder / "image_1.nii.gz")
    assert_every_reader_refuses(folder, folder / "image_1.nii.gz", ("corrupt",), tmp_path, capsys)


# ----------------------------------------------------------------------------- 2. NaN voxels
def test_nan_voxels_are_refused_by_every_reader(tmp_path, capsys):
    folder = custom_folder(tmp_path / "data", nan_in=2)
    # what ITK alone makes of it: NaN silently becomes 0
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image_2.nii.gz")))).any()
    assert_every_reader_refuses(folder, folder / "image_2.nii.gz",
                                ("1 NaN", "(2, 3, 4)", "expected finite voxel values"), tmp_path, capsys)


# ----------------------------------------------------------------------------- 3. supervoxel workers
def die_on_scan_3(task: gen.ScanTask) -> dict:
    """Worker-side fault (module level, so spawned workers import it): scan 3 is killed (-9)."""
    if task.scan_id == "3":
        others = [task.out.parent / gen.OUTPUT_TEMPLATE.format(i) for i in (1, 2)]
        deadline = time.monotonic() + 30
        while not all(p.exists() for p in others) and time.monotonic() < deadline:
            time.sleep(0.05)  # let scans 1 and 2 finish in the other worker first
        os.kill(os.getpid(), signal.SIGKILL)
    return gen.process_scan(task)


def must_not_run(task: gen.ScanTask) -> dict:
    raise AssertionError(f"scan {task.scan_id} was computed although the run should have stopped first")


def sv_folder(folder: Path, ids=(1, 2, 3, 4)) -> Path:
    folder.mkdir(parents=True)
    for i in ids:
        write(scan_arrays(i, (3, 20, 20))[0], folder / f"image_{i}.nii.gz")
    return folder


def test_killed_supervoxel_worker_stops_the_run_within_seconds(tmp_path):
    data = sv_folder(tmp_path / "data")
    before = state(data)
    start = time.perf_counter()
    with pytest.raises(gen.SupervoxelError) as err:
        gen.generate_supervoxels(data, n_sv=20, out_dir=tmp_path / "out", workers=2, progress=False,
                                 log=lambda line: None, process=die_on_scan_3)
    assert time.perf_counter() - start < 60  # the old pool hung here forever at 3/4
    message = str(err.value)
    assert "worker process died while processing scan 3 (image_3.nii.gz, killed by signal 9" in message
    assert "rerun the same command" in message
    out = tmp_path / "out"
    finished = sorted(p.name for p in out.glob("superpix-*"))
    assert "superpix-MIDDLE_3.nii.gz" not in finished and {"superpix-MIDDLE_1.nii.gz",
                                                          "superpix-MIDDLE_2.nii.gz"} <= set(finished)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sorted(row["output"] for row in summary["scans"]) == finished  # what finished, nothing else
    assert "3" in summary["incomplete"]["missing"] and "scan 3" in summary["incomplete"]["error"]
    for name in finished:  # every finished output is whole
        assert read_volume(out / name)[0].shape == (3, 20, 20)
    assert state(data) == before


def test_supervoxel_workers_that_cannot_start_fail_fast(tmp_path):
    data = sv_folder(tmp_path / "data")
    multiprocessing.set_executable("/bin/false")  # every spawned worker exits at once
    try:
        start = time.perf_counter()
        with pytest.raises(gen.SupervoxelError) as err:
            gen.generate_supervoxels(data, n_sv=20, out_dir=tmp_path / "out", workers=2,
                                     progress=False, log=lambda line: None)
    finally:
        multiprocessing.set_executable(sys.executable)
    assert time.perf_counter() - start < 60
    assert "worker processes could not start" in str(err.value) and "--workers 1" in str(err.value)
    assert "scan(s) 1, 2" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even an empty folder


def test_unwritable_supervoxel_output_folder_fails_before_any_work(tmp_path, capsys):
    data = sv_folder(tmp_path / "data", ids=(1, 2))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(gen.SupervoxelError, match=r"output folder .*a_file/out is not writable "
                                                  r"\(NotADirectoryError.*pass --out-dir"):
        gen.generate_supervoxels(data, n_sv=20, out_dir=blocker / "out", progress=False,
                                 log=lambda line: None, process=must_not_run)
    assert gen.main(["--data-dir", str(data), "--n-sv", "20", "--out-dir", str(blocker / "out")]) == 1
    assert "is not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders: only the case above applies
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        try:
            with pytest.raises(gen.SupervoxelError, match="is not writable .*PermissionError"):
                gen.generate_supervoxels(data, n_sv=20, out_dir=readonly, progress=False,
                                         log=lambda line: None, process=must_not_run)
        finally:
            readonly.chmod(0o755)
        assert not any(readonly.iterdir())
    assert blocker.read_text(encoding="utf-8") == "not a folder" and sorted(p.name for p in data.iterdir()) == [
        "image_1.nii.gz", "image_2.nii.gz"]


# ----------------------------------------------------------------------------- 6. metadata
def test_supervoxel_summary_is_merged_per_file(tmp_path):
    data = sv_folder(tmp_path / "data", ids=(1, 2))
    out = tmp_path / "out"
    quiet = {"progress": False, "log": lambda line: None}
    first = gen.generate_supervoxels(data, n_sv=20, out_dir=out, **quiet)
    made = {row["id"]: row for row in first["scans"]}
    assert {row["edge_order"] for row in made.values()} == {"reference"}
    assert all(row["seconds"] is not None and row["kernel_version"] == gen.KERNEL_VERSION
               for row in made.values())
    files = state(out)
    write(scan_arrays(3, (3, 20, 20))[0], data / "image_3.nii.gz")
    second = gen.generate_supervoxels(data, n_sv=20, out_dir=out, edge_order="stable", **quiet)
    rows = {row["id"]: row for row in second["scans"]}
    for sid in ("1", "2"):  # kept files keep how they were made
        assert rows[sid]["status"] == "kept"
        for key in ("edge_order", "seconds", "cpu_seconds", "written_at", "kernel_version", "n_sv"):
            assert rows[sid][key] == made[sid][key], key
    assert rows["3"]["status"] == "written" and rows["3"]["edge_order"] == "stable"
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == second
    assert {k: v for k, v in state(out).items() if k != "summary.json"} == {
        **{k: v for k, v in files.items() if k != "summary.json"},
        "superpix-MIDDLE_3.nii.gz": state(out)["superpix-MIDDLE_3.nii.gz"]}  # kept outputs untouched


def _score_run(folder: Path, dataset: str, dice: float, status: str = "COMPLETED") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": "qamp", "dataset": dataset}), encoding="utf-8")
    (folder / "run.json").write_text(json.dumps({"command": "test", "status": status}), encoding="utf-8")
    with open(folder / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        name = {"CHAOST2": "LIVER", "SABS": "SPLEEN"}[dataset]  # class 1, as test.py names it
        writer.writerow(["fold", "supp_idx", "seed", "scan", "class", "class_name", "dice"])
        writer.writerows([[0, 2, 7, 1, 1, name, dice], [0, 2, 7, 2, 1, name, dice - 0.2]])
    return folder


def test_summarize_keys_runs_by_dataset_and_lists_skipped_folders(tmp_path, capsys):
    from tools import summarize

    runs = tmp_path / "runs"
    _score_run(runs / "test_CHAOST2_fold0", "CHAOST2", 0.9)
    _score_run(runs / "test_SABS_fold0", "SABS", 0.7)  # same fold / supp / seed / scan / class id
    failed = runs / "test_CHAOST2_fold1"
    failed.mkdir()
    (failed / "config.json").write_text(json.dumps({"model": "qamp", "dataset": "CHAOST2"}), encoding="utf-8")
    (failed / "run.json").write_text(json.dumps({"command": "test", "status": "FAILED",
                                                 "fail_trace": ["Traceback ...", "ValueError: boom\n"]}),
                                     encoding="utf-8")
    out = tmp_path / "table"
    assert summarize.main([str(runs), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text(encoding="utf-8")
    # class 1 is LIVER in CHAOST2 and SPLEEN in SABS: two rows, never pooled (nor refused)
    assert "| Method | LIVER | SPLEEN | Mean |" in md
    assert "| qamp [CHAOST2] | 80.00 ± 10.00 | - | 80.00 ± 10.00 |" in md
    assert "| qamp [SABS] | - | 60.00 ± 10.00 | 60.00 ± 10.00 |" in md
    assert f"- {failed}: test run with status FAILED, no per-scan CSV (ValueError: boom)" in md
    assert "population std (ddof 0)" in md
    rows = list(csv.DictReader(open(out / "summary.csv", encoding="utf-8")))
    assert {r["dataset"] for r in rows} == {"CHAOST2", "SABS"} and {r["std_ddof"] for r in rows} == {"0"}
    written = state(out)
    assert summarize.main([str(runs), "--out", str(out)]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err and state(out) == written


# ----------------------------------------------------------------------------- 4. n_shot at test
def test_n_shot_above_one_at_test_is_refused(tmp_path):
    from config import ex, validate_config

    log_dir = tmp_path / "runs"
    config = {**ex.configurations[0](), "n_shot": 3, "path": {"log_dir": str(log_dir)},
              "model": "copy_support"}
    with pytest.raises(ValueError, match=r"^n_shot=3 is not supported by test.py: .*1-shot.*set n_shot=1.*n_part"):
        validate_config(config, "test")
    assert not log_dir.exists()  # refused before any run folder (or config.json) is written


# ----------------------------------------------------------------------------- 5. weights files
def test_weights_and_snapshots_that_are_not_torch_files(tmp_path, monkeypatch):
    from models import build_model
    from engine.snapshot import load_snapshot

    monkeypatch.delenv("QAMP_PRETRAINED_PATH", raising=False)
    text = tmp_path / "weights.pth"
    text.write_text("exit code 0; weights are at https://example.org\n", encoding="utf-8")
    before = state(tmp_path)
    expected = r"expected a PyTorch file \(written by torch.save\) .*got a text file starting with 'exit code 0"
    with pytest.raises(ValueError, match=rf"^pretrained_path='{re.escape(str(text))}': {expected}.*point pretrained_path at"):
        build_model({"backbone": "resnet50", "pretrained_weights": "imagenet",
                     "pretrained_path": str(text)}, 32)
    with pytest.raises(ValueError, match=rf"^reload_model_path/resume='{re.escape(str(text))}': {expected}"):
        load_snapshot(text)
    image = write(scan_arrays(0)[0], tmp_path / "image.nii.gz")
    with pytest.raises(ValueError, match="got gzip data"):
        load_snapshot(image)
    assert {k: v for k, v in state(tmp_path).items() if k != "image.nii.gz"} == before


# ----------------------------------------------------------------------------- 7. verify / reorient
def cmr_like_folder(folder: Path, orientations=("LPS", "LPS")) -> Path:
    """Labels stored 200 / 500 / 600 and the published-style classmap_200.json: the legacy rule on
    the remapped values 1 / 2 / 3."""
    folder.mkdir(parents=True)
    remap = {0: 0, 200: 1, 500: 2, 600: 3}
    names = {200: "LV-MYO", 500: "LV-BP", 600: "RV"}
    classmap: dict[str, dict[str, list[int]]] = {"BG": {}, **{n: {} for n in names.values()}}
    for i, code in enumerate(orientations, start=1):
        image, _ = scan_arrays(i, (4, 24, 24))
        label = np.zeros(image.shape, np.uint16)
        label[0:3, 4:20, 4:20] = 500
        label[0:3, 8:12, 8:12] = 200
        label[2, 4:8, 4:8] = 600
        label[3, 0, 0] = 200  # one LV-MYO pixel: raw sum 200 >= 200, remapped sum 1 < 200
        img, lab = sitk.GetImageFromArray(image), sitk.GetImageFromArray(label)
        for im in (img, lab):
            im.SetSpacing((1.25, 1.25, 7.99))
        img, lab = sitk.DICOMOrient(img, code), sitk.DICOMOrient(lab, code)
        sitk.WriteImage(img, str(folder / f"image_{i}.nii.gz"), True)
        sitk.WriteImage(lab, str(folder / f"label_{i}.nii.gz"), True)
        stored = sitk.GetArrayFromImage(lab).astype(np.int64)
        loader = np.vectorize(remap.get)(stored)
        sums = loader.reshape(loader.shape[0], -1).sum(axis=1)
        for value, name in {0: "BG", **names}.items():
            present = (stored == value).reshape(stored.shape[0], -1).any(axis=1)
            classmap[name][str(i)] = np.flatnonzero(present & (sums >= 200)).tolist()
    (folder / "classmap_200.json").write_text(json.dumps(classmap), encoding="utf-8")
    return folder


def cmr_spec():
    return dataclasses.replace(PREPROCESS_DATASETS["CMR"], image_size=None, n_scans=None,
                               spacing=(None, None, None))


def test_verify_checks_published_classmaps_on_the_loaders_label_values(tmp_path):
    folder = cmr_like_folder(tmp_path / "cmr_MR_normalized")
    before = state(folder)
    report = verify_folder(folder, cmr_spec())
    assert report.ok, format_report(report)
    detail = {c.name: c.detail for c in report.checks}["classmap_200.json"]
    assert detail.startswith(f"rule {LEGACY_CLASSMAP_RULE} on the loaders' label values")
    # the raw values would have listed slice 3 (one LV-MYO pixel: sum 200 >= 200; remapped: 1)
    counts = per_slice_counts(read_volume(folder / "label_1.nii.gz")[0].astype(np.int64))
    assert counts[3, 200] == 1 and counts[3].sum() - counts[3, 0] == 1
    assert 3 not in json.loads((folder / "classmap_200.json").read_text(encoding="utf-8"))["LV-MYO"]["1"]
    assert state(folder) == before


def test_verify_warns_on_mixed_orientations_instead_of_failing(tmp_path, capsys):
    folder = cmr_like_folder(tmp_path / "cmr_MR_normalized", orientations=("LSP", "PSR"))
    before = state(folder)
    report = verify_folder(folder, cmr_spec())
    assert report.ok, format_report(report)
    check = {c.name: c for c in report.checks}["orientation"]
    assert check.warning and "mixed orientations (LSP: scans 1; PSR: scans 2)" in check.detail
    assert "The loaders do not reorient" in check.detail and "--orient" in check.detail
    assert preprocess_main(["verify", str(folder), "--dataset", "CMR"]) in (0, 1)
    assert "warn  orientation: mixed orientations" in capsys.readouterr().out
    assert state(folder) == before


def test_reorientation_makes_lsp_and_psr_copies_voxel_identical(tmp_path):
    """The same scan stored LSP (256 slices at 1.25 mm in the issue) and PSR comes out identical
    from ``preprocess generic --orient PSR``: SimpleITK's orientation filter on the whole image."""
    image, label = scan_arrays(7, (12, 10, 14))  # (Z, Y, X), anisotropic in every axis
    img, lab = sitk.GetImageFromArray(image), sitk.GetImageFromArray(label)
    for im in (img, lab):
        im.SetSpacing((1.25, 1.5, 3.0))
        im.SetOrigin((10.0, -20.0, 5.0))
    outs = {}
    for code in ("LSP", "PSR"):
        raw = tmp_path / f"raw_{code}"
        (raw / "images").mkdir(parents=True)
        (raw / "labels").mkdir(parents=True)
        stored_img, stored_lab = sitk.DICOMOrient(img, code), sitk.DICOMOrient(lab, code)
        assert orientation_code(stored_img.GetDirection()) == code
        sitk.WriteImage(stored_img, str(raw / "images" / "1.nii.gz"), True)
        sitk.WriteImage(stored_lab, str(raw / "labels" / "1.nii.gz"), True)
        assert preprocess_main(["generic", "--raw", str(raw), "--out", str(tmp_path / f"out_{code}"),
                                "--orient", "PSR", "--spacing", "0", "0", "0", "--label-values", "0,1",
                                "--no-crop", "--quiet"]) == 0
        folder = tmp_path / f"out_{code}" / "custom_normalized"
        outs[code] = [sitk.ReadImage(str(folder / f"{kind}_1.nii.gz")) for kind in ("image", "label")]
    for a, b in zip(outs["LSP"], outs["PSR"]):
        assert orientation_code(a.GetDirection()) == orientation_code(b.GetDirection()) == "PSR"
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)
    # axis order and spacing followed the filter: the stored LSP copy had another array shape
    assert sitk.DICOMOrient(img, "LSP").GetSize() != outs["PSR"][0].GetSize()
    assert sorted(outs["PSR"][0].GetSpacing()) == pytest.approx([1.25, 1.5, 3.0])


def test_reader_without_libdeflate_checks_the_same(tmp_path, monkeypatch):
    """The CRC falls back to zlib's when the system has no libdeflate: same verdicts."""
    import zlib

    from utils import io

    monkeypatch.setattr(io, "_crc32", lambda crc, data: zlib.crc32(memoryview(data).cast("B"), crc))
    full_checks = []
    full_check = io._check_gzip_stream
    monkeypatch.setattr(io, "_check_gzip_stream", lambda *a: full_checks.append(a) or full_check(*a))
    image, _ = scan_arrays(4)
    good = write(image, tmp_path / "good.nii.gz")
    assert np.array_equal(read_volume(good)[0], image)
    assert not full_checks  # proven by the trailer alone (the fast path)
    truncate(good, 0.95)
    with pytest.raises(ImageIntegrityError, match="truncated"):
        read_volume(good)


# ----------------------------------------------------------------------------- 8. text I/O and the locale
LOCALE_PROGRAM = r'''
import json, locale, logging, sys
from pathlib import Path

for stream in (sys.stdout, sys.stderr):  # the console is set at start-up (UTF-8 in the issue's session); files
    stream.reconfigure(encoding="utf-8")  # are what this checks

import numpy as np
import SimpleITK as sitk

from data.registry import read_custom_json
from dataloaders.predict_io import read_input
from engine.runtime import attach_log_file
from helpers import write_dicom_series
from tools import summarize

folder = Path(sys.argv[1])
series = folder / "series"  # a DICOM series, read through predict.py's reader (GDCM)
write_dicom_series(sitk.GetImageFromArray(np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8)), series)
assert read_input(series, "query").GetSize() == (8, 8, 3)
encoding = locale.getpreferredencoding(False)
assert encoding.lower().replace("-", "") not in ("utf8",), encoding  # the test is void under a UTF-8 locale

name = "Leber \u00b1 Milz"  # non-ASCII text in every file below
data = folder / "data"
data.mkdir()
(data / "dataset.json").write_bytes(json.dumps({"labels": {"1": name}}, ensure_ascii=False).encode("utf-8"))
assert read_custom_json(data)["labels"] == {1: name}
log = logging.getLogger("locale_check")
handler = attach_log_file(log, folder / "logger.log")
log.warning(name)
handler.close()
assert name in (folder / "logger.log").read_bytes().decode("utf-8")
run = folder / "runs" / "test_custom_setting1_fold0_supp0"
run.mkdir(parents=True)
(run / "config.json").write_bytes(b'{"model": "qamp", "dataset": "custom"}')
(run / "run.json").write_bytes(b'{"command": "test", "status": "COMPLETED"}')
rows = "fold,supp_idx,seed,scan,class,class_name,dice\n0,0,1,1,1,%s,0.5\n0,0,1,2,1,%s,0.7\n" % (name, name)
(run / "scores.csv").write_bytes(rows.encode("utf-8"))
assert summarize.main([str(folder / "runs"), "--out", str(folder / "table")]) == 0
assert name in (folder / "table" / "summary.md").read_bytes().decode("utf-8")
print("ok", encoding)
'''


def test_text_files_do_not_depend_on_the_locale(tmp_path):
    """Under LC_ALL=C without UTF-8 mode (Python turns UTF-8 mode on by itself under the C locale,
    hence PYTHONUTF8=0) the locale's encoding is ASCII, as after GDCM switched a UTF-8 process to the
    C locale: a DICOM read, then non-ASCII text read and written by the product (dataset.json, the
    run log, scores.csv and the summary tables) still works, each file naming its encoding. Before
    the files named it, this failed (read_custom_json: 'ascii' codec can't decode byte 0xc2)."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOCALE_PROGRAM, str(tmp_path)], cwd=REPO, capture_output=True,
                            timeout=300, env=env, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("ok "), result.stdout[-2000:]


# ----------------------------------------------------------------------------- 9. predict.py inputs
def _float_copy(source: Path, target: Path, edit) -> Path:
    """``source`` as float32 with ``edit(array)`` applied, same geometry."""
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    edit(array)
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(target), True)
    return target


def _copy(source: Path, target: Path, damage) -> Path:
    target.write_bytes(source.read_bytes())
    damage(target)
    return target


def _set(array: np.ndarray, index: tuple, value: float) -> None:
    array[index] = value


def _dicom(source: Path, folder: Path, **kwargs) -> Path:
    from helpers import write_dicom_series

    write_dicom_series(sitk.ReadImage(str(source)), folder, **kwargs)
    return folder


def _truncated_slice(folder: Path) -> Path:
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-100])  # an interrupted copy: ITK would leave the file out
    return folder


def _other_spacing(source: Path, target: Path) -> Path:
    image = sitk.ReadImage(str(source))
    image.SetSpacing([s * 1.5 for s in image.GetSpacing()])
    sitk.WriteImage(image, str(target), True)
    return target


def _one_slice(source: Path, target: Path) -> Path:
    image = sitk.ReadImage(str(source))
    sitk.WriteImage(image[:, :, 10:11], str(target), True)
    return target


# case -> (the bad argument, its input made from the phantoms in tmp (or {argument: input}), what the error says)
PREDICT_CASES = {
    "nifti_nan_support_image": ("--support-image", lambda p, t: _float_copy(
        p / "image_1.nii.gz", t / "nan.nii.gz", lambda a: _set(a, (5, 20, 21), np.nan)),
        ("support image: ", "expected finite voxel values, got 1 NaN and 0 infinite voxel(s)", "(5, 20, 21)",
         "Replace them in the source")),
    "nifti_inf_query": ("--query", lambda p, t: _float_copy(
        p / "image_2.nii.gz", t / "inf.nii.gz", lambda a: _set(a, (7, 1, 2), np.inf)),
        ("query: ", "got 0 NaN and 1 infinite voxel(s)", "(7, 1, 2)")),
    "nifti_truncated_support_label": ("--support-label", lambda p, t: _copy(
        p / "label_1.nii.gz", t / "cut.nii.gz", truncate),
        ("support label: cannot read ", "the file is truncated", "Re-download or re-create it")),
    "nifti_corrupt_query": ("--query", lambda p, t: _copy(p / "image_2.nii.gz", t / "corrupt.nii.gz", corrupt),
                            ("query: cannot read ", "the file is corrupt")),
    "nifti_single_slice_query": ("--query", lambda p, t: _one_slice(p / "image_2.nii.gz", t / "slice.nii.gz"),
                                 ("query ", "is a single slice (size (48, 48, 1)), not a 3D volume",
                                  "pass the whole scan")),
    "nifti_fractional_support_label": ("--support-label", lambda p, t: _float_copy(
        p / "label_1.nii.gz", t / "soft.nii.gz", lambda a: _set(a, (slice(10, 12), 20, 20), 0.5)),
        ("the support label ", "holds 2 non-integer value(s) (e.g. 0.5)",
         "re-save it with integer values")),
    "nifti_label_on_another_grid": ("--support-label", lambda p, t: _other_spacing(
        p / "label_1.nii.gz", t / "grid.nii.gz"),
        ("the support label ", "is not on the grid of its image", "spacing", "Pass the label drawn on this image")),
    "dicom_truncated_slice_support_image": ("--support-image", lambda p, t: _truncated_slice(
        _dicom(p / "image_1.nii.gz", t / "dicom_cut")),
        ("support image: ", "1 file(s) are not readable as part of the series (truncated, corrupt or not DICOM",
         "IMG-0002-00004.dcm", "Copy them again from the source")),
    "dicom_single_file_query": ("--query", lambda p, t: sorted(_dicom(p / "image_2.nii.gz", t / "dicom_q").iterdir())[5],
                                ("query ", "is a single slice (size (48, 48, 1))",
                                 "the folder holding the series, not one of its files")),
    "dicom_fractional_support_label": ("--support-label", lambda p, t: {  # on its DICOM image's grid
        "--support-image": _dicom(p / "image_1.nii.gz", t / "dicom_image"),
        "--support-label": _dicom(p / "label_1.nii.gz", t / "dicom_soft", rescale_slope=0.5)},
        ("the support label ", "non-integer value(s) (e.g. 1.5)", "re-save it with integer values")),
    "dicom_label_on_another_grid": ("--support-label", lambda p, t: _dicom(
        _other_spacing(p / "label_1.nii.gz", t / "grid.nii.gz"), t / "dicom_grid"),
        ("the support label ", "is not on the grid of its image", "spacing")),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_refuses_a_bad_input_file(case: str, tiny_run: dict, phantoms48: Path, tmp_path: Path, capsys):
    """predict.py reads every input through the one checked reader (utils/io.py), NIfTI and DICOM:
    one ``error:`` line naming the file and the fix, exit code 2, nothing written. (NaN / inf cannot be
    stored in a DICOM series ITK reads: its pixels are integers.)"""
    import predict

    option, make, expected = PREDICT_CASES[case]
    made = make(phantoms48, tmp_path)
    made = made if isinstance(made, dict) else {option: made}
    bad = made[option]
    inputs = {"--support-image": phantoms48 / "image_1.nii.gz", "--support-label": phantoms48 / "label_1.nii.gz",
              "--query": phantoms48 / "image_2.nii.gz", **made}
    out = tmp_path / "out"
    argv = ["--snapshot", tiny_run["run_dir"], "--out", str(out), "--device", "cpu",
            *(x for item in inputs.items() for x in map(str, item))]
    before = state(tmp_path)
    capsys.readouterr()
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(bad) in err[0], err[0]
    for text in expected:
        assert text in err[0], err[0]
    assert not out.exists() and state(tmp_path) == before, "a refused prediction must write nothing"


@pytest.mark.parametrize("extra, message", [
    ((), "holds values [500, 600] above 255 and no label map says which classes they are (snapshot dataset "
         "custom): pass --label-map STORED:ID,..., e.g. --label-map 200:1,500:2,600:3"),
    (("--label-map", "200:1"), "holds values [500, 600] that --label-map does not map (it maps [200]): add them "
                               "to --label-map, e.g. 500:<class id>"),
    (("--classes", "1"), "holds no voxel of class [1] (it holds classes [200, 500, 600]): choose --classes among "
                         "them (the label's own values), or annotate the support")])
def test_predict_names_the_label_values_it_cannot_map(extra: tuple, message: str, tiny_run: dict,
                                                      phantoms48: Path, tmp_path: Path, capsys):
    """A support label stored as 200 / 500 / 600 with a snapshot whose dataset has no label map."""
    import predict
    from helpers import write_stored_label

    label = write_stored_label(phantoms48 / "label_1.nii.gz", tmp_path / "label_cmr.nii.gz", {1: 200, 2: 500, 3: 600})
    out = tmp_path / "out"
    argv = ["--snapshot", tiny_run["run_dir"], "--support-image", str(phantoms48 / "image_1.nii.gz"),
            "--support-label", str(label), "--query", str(phantoms48 / "image_2.nii.gz"), "--out", str(out),
            "--device", "cpu", *extra]
    capsys.readouterr()
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the support label {label} {message}"]
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("200-1", "expected STORED:ID pairs, e.g. --label-map 200:1,500:2,600:3; got '200-1'"),
    ("200:300", "'200:300': stored values must be in 1..65535 and class ids in 1..255"),
    ("200:1,500:1", "'500:1': each stored value and each class id may appear once")])
def test_predict_refuses_a_malformed_label_map(text: str, message: str, capsys):
    import predict

    with pytest.raises(SystemExit) as stop:
        predict.parse_args(["--snapshot", "s", "--support-image", "i", "--support-label", "l", "--query", "q",
                            "--out", "o", "--label-map", text])
    assert stop.value.code == 2
    assert f"error: argument --label-map: {message}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 10. refusal wording
@pytest.mark.parametrize("key, stored, requested, shown", [
    ("seed", 2025, 7, "seed: the run has 2025, requested 7"),  # a number
    ("optim", {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}, {"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-4},
     "optim: the run has {'lr': 0.001, 'momentum': 0.9, 'weight_decay': 0.0005}, requested {'lr': 0.5, "
     "'momentum': 0.9, 'weight_decay': 0.0005}"),  # a dict: resuming a run trained at lr 1e-3 with optim.lr=0.5
    ("backbone", "resnet50", "resnet101", "backbone: the run has 'resnet50', requested 'resnet101'")])  # a string
def test_resume_refusal_names_the_runs_value_and_the_requested_one(key: str, stored, requested, shown: str):
    from engine.snapshot_config import _check_resume

    header = {"config": {key: stored}, "step": 2, "path": "run/snapshots/step_0000002.pth"}
    with pytest.raises(ValueError) as err:
        _check_resume({"resume": "run", "n_steps": 10, "val_interval": 0, key: requested}, header)
    assert f"these keys differ from it (they change what the run means): {shown}. Drop them" in str(err.value)


@pytest.mark.parametrize("key, stored, requested, shown", [
    ("n_mlp_fg", 8, 9, "n_mlp_fg: the snapshot has 8, requested 9"),
    ("query_loss_weights", [0.1, 1.0], (0.2, 1.0), "query_loss_weights: the snapshot has [0.1, 1.0], requested "
                                                   "[0.2, 1.0]"),
    ("backbone", "resnet50", "resnet101", "backbone: the snapshot has 'resnet50', requested 'resnet101'")])
def test_test_refusal_names_the_snapshots_value_and_the_requested_one(key: str, stored, requested, shown: str):
    from engine.snapshot_config import _check_test

    header = {"meta": {"model_keys": {key: stored}}, "path": "run/snapshots/final.pth"}
    with pytest.raises(ValueError) as err:
        _check_test({"reload_model_path": "run", "dataset": "custom", key: requested}, header, lambda config: None)
    assert f"these model keys differ from it: {shown}. Drop these keys" in str(err.value)


# ----------------------------------------------------------------------------- 11. data_dir without a default
DATA_DIR_REFUSAL = ("data_dir is not set: pass data_dir=<folder> (the image folder, or the root holding "
                    "<dataset>/<folder>) on the command line, or set QAMP_DATA_ROOT, e.g. "
                    "export QAMP_DATA_ROOT=/path/to/data")


def test_data_dir_comes_from_the_command_line_or_qamp_data_root(monkeypatch, tmp_path):
    """No development path is a default: without data_dir= and QAMP_DATA_ROOT train and test refuse
    to start (one line saying how to set it, no run folder); print_config works without data."""
    from helpers import experiment

    ex = experiment()

    monkeypatch.delenv("QAMP_DATA_ROOT", raising=False)
    log_dir = tmp_path / "runs"
    assert ex.run("print_config", {"path": {"log_dir": str(log_dir)}}).config["data_dir"] is None
    for command, updates in (("train", {}), ("test", {"model": "copy_support"})):
        with pytest.raises(ValueError) as err:
            ex.run(command, {"device": "cpu", "path": {"log_dir": str(log_dir)}, **updates})
        assert str(err.value) == DATA_DIR_REFUSAL
    assert not any(log_dir.iterdir()), "a refused run must leave no run folder"
    monkeypatch.setenv("QAMP_DATA_ROOT", str(tmp_path / "data"))
    assert ex.run("print_config", {"path": {"log_dir": str(log_dir)}}).config["data_dir"] == str(tmp_path / "data")
    given = ex.run("print_config", {"data_dir": "elsewhere", "path": {"log_dir": str(log_dir)}}).config
    assert given["data_dir"] == "elsewhere"  # the command line wins


def test_train_py_without_data_says_how_to_set_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QAMP_DATA_ROOT"}
    result = subprocess.run([sys.executable, "train.py", "with", "device=cpu", f"path.log_dir={tmp_path / 'runs'}"],
                            cwd=REPO, capture_output=True, timeout=300, env=env, encoding="utf-8")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"ValueError: {DATA_DIR_REFUSAL}"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- 12. training-only keys at test
@pytest.mark.parametrize("updates, message", [
    ({"n_steps": 5}, "n_steps=5: this key only affects training (train.py reads it, test.py does not): drop it "
                     "from the test.py command"),  # a number
    ({"optim.lr": 0.5}, "optim.lr=0.5: this key only affects training"),  # a key of a dict
    ({"supervoxel_dir": "/data/supervoxels_5000", "min_size": 4},
     "min_size=4, supervoxel_dir='/data/supervoxels_5000': these keys only affect training (train.py reads them, "
     "test.py does not): drop them from the test.py command")])
def test_test_py_refuses_training_only_keys_given_explicitly(updates: dict, message: str, tmp_path):
    from helpers import experiment

    ex = experiment()

    log_dir = tmp_path / "runs"
    with pytest.raises(ValueError) as err:
        ex.run("test", {"model": "copy_support", "data_dir": str(tmp_path), "path": {"log_dir": str(log_dir)},
                        **updates})
    assert str(err.value).startswith(message), str(err.value)
    assert "(keys only training reads: n_steps, optim, " in str(err.value)
    assert not any(log_dir.iterdir()), "a refused run must leave no run folder"


def test_named_configs_may_set_training_keys_at_test(tmp_path):
    """cpu_budget sets n_steps, optim, ... (tools.sweep and scripts/demo.sh pass it to test.py): accepted."""
    from helpers import experiment

    ex = experiment()

    run = ex._create_run("test", {"model": "copy_support", "data_dir": str(tmp_path),
                                  "path": {"log_dir": str(tmp_path / "runs")}}, ["abd_mri", "setting1", "cpu_budget"])
    assert run.config["n_steps"] == 6000 and run.config["optim"]["lr"] == 0.02


def test_sweep_gives_training_only_keys_to_its_training_cells_only(tmp_path):
    from tools.sweep import expand_grid

    cells = expand_grid(tmp_path, ["abd_mri+cpu_budget"], [1], [0], [0, 1], [2025],
                        grid=["n_steps=5", "optim.lr=0.1,0.2", "backbone=resnet50", "data_dir=/data"],
                        train_args=["num_workers=0"], test_args=["n_part=2"])
    trains = [c for c in cells.values() if c.kind == "train"]
    tests = [c for c in cells.values() if c.kind == "test"]
    assert len(trains) == 2 and len(tests) == 4
    for cell in trains:
        assert {"abd_mri", "cpu_budget", "n_steps=5", "backbone=resnet50", "data_dir=/data", "num_workers=0"} <= set(cell.args)
        assert any(a.startswith("optim.lr=") for a in cell.args)
    for cell in tests:
        assert {"abd_mri", "cpu_budget", "backbone=resnet50", "data_dir=/data", "n_part=2"} <= set(cell.args)
        assert not any(a.startswith(("n_steps=", "optim.lr=", "num_workers=")) for a in cell.args), cell.args
    assert len({c.method for c in tests}) == 2  # the lr axis still tells the test cells apart
