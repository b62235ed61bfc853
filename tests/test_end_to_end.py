"""The whole pipeline on the embedded phantoms, at a tiny size, with no external data:

phantoms (``data/synthetic.py``) -> supervoxels (the real generator CLI) -> a short self-supervised
training (``train.py``) -> ``test.py`` with the standard protocol -> ``python -m tools.summarize`` ->
the Dice table. Checks the files, their geometry, that the numbers are finite, and that a second
run with the same seed gives the same weights and the same scores.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from data import synthetic
from helpers import REPO, TINY_HEAD, experiment, for_test
from tools import summarize
from engine.snapshot import load_snapshot

ex = experiment()

SIZE = 32  # phantom in-plane size (the smallest data/synthetic.py makes)
N_SCANS = 10  # fold 0 = scans 1, 2, 3: support scan 3 (supp_idx 2), queries 1 and 2; training on 4-10
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


def _geometry(image: sitk.Image) -> tuple:
    return (image.GetSize(), np.round(image.GetSpacing(), 5).tolist(), np.round(image.GetOrigin(), 4).tolist(),
            np.round(image.GetDirection(), 6).tolist())


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "phantoms"
    synthetic.generate(out, n_scans=N_SCANS, seed=0, size=SIZE, progress=False)
    return out


@pytest.fixture(scope="module")
def supervoxels(phantoms: Path) -> Path:
    """``generate_supervoxels.py`` as a user runs it, with the dataset's ``n_sv``."""
    n_sv = json.loads((phantoms / "dataset.json").read_text(encoding="utf-8"))["n_sv"]
    out = phantoms / f"supervoxels_{n_sv}"
    result = subprocess.run(
        [sys.executable, "data/supervoxels/generate_supervoxels.py", "--data-dir", str(phantoms),
         "--n-sv", str(n_sv), "--out-dir", str(out), "--workers", "1"],
        cwd=REPO, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def config_for(data_dir: Path, log_dir: Path, **updates) -> dict:
    config = {"dataset": "custom", "data_dir": str(data_dir), "backbone": "resnet50", "pretrained_weights": "none",
              "device": "cpu", "num_workers": 0, "min_size": 3, "n_steps": 3, "save_snapshot_every": 3,
              "print_interval": 1, "max_iters_per_load": 3, "optim": {"lr": 0.01, "momentum": 0.9,
                                                                     "weight_decay": 5e-4},
              "n_overlay_slices": 1, "test_batch_size": 8, "path": {"log_dir": str(log_dir)}, **TINY_HEAD}
    config.update(updates)
    return config


def pipeline(phantoms: Path, supervoxels: Path, root: Path) -> dict:
    """Train, test (standard protocol: every organ, supp_idx 2, 3 chunks) and summarize once."""
    trained = ex.run(command_name="train", config_updates=config_for(phantoms, root / "train")).result
    tested = ex.run(command_name="test", config_updates=for_test(config_for(
        phantoms, root / "test", reload_model_path=trained["run_dir"]))).result
    assert summarize.main([f"QAMP={tested['run_dir']}", "--out", str(root / "table")]) == 0
    return {"train": Path(trained["run_dir"]), "test": Path(tested["run_dir"]), "table": root / "table",
            "result": tested}


@pytest.fixture(scope="module")
def runs(phantoms: Path, supervoxels: Path, tmp_path_factory) -> tuple[dict, dict]:
    first = pipeline(phantoms, supervoxels, tmp_path_factory.mktemp("first"))
    second = pipeline(phantoms, supervoxels, tmp_path_factory.mktemp("second"))
    return first, second


def test_supervoxels_are_written_on_each_scans_grid(phantoms: Path, supervoxels: Path) -> None:
    files = sorted(supervoxels.glob("superpix-MIDDLE_*.nii.gz"))
    assert len(files) == N_SCANS and (supervoxels / "summary.json").is_file()
    for path in files:
        scan_id = path.name[len("superpix-MIDDLE_"):-len(".nii.gz")]
        sv, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(phantoms / f"image_{scan_id}.nii.gz"))
        assert _geometry(sv) == _geometry(image)
        ids = np.unique(sitk.GetArrayViewFromImage(sv))
        assert ids[0] == 0 and ids.size >= 3, f"scan {scan_id}: {ids.size - 1} supervoxels"


def test_training_and_test_runs_write_their_files(runs: tuple[dict, dict]) -> None:
    run = runs[0]
    for name in ("config.json", "logger.log", "metrics.json", "loss_curve.png", "snapshots/final.pth"):
        assert (run["train"] / name).is_file(), name
    assert load_snapshot(run["train"] / "snapshots" / "final.pth")["step"] == 3
    assert run["test"].name == "test_custom_setting1_fold0_supp2"
    for name in ("scores.csv", "summary.json", "logger.log"):
        assert (run["test"] / name).is_file(), name
    rows = _rows(run["test"] / "scores.csv")
    assert sorted({(r["scan"], r["class_name"]) for r in rows}) == sorted(
        (scan, organ) for scan in ("1", "2") for organ in ORGANS)
    assert {r["supp_idx"] for r in rows} == {"2"} and all(int(r["slices"]) > 0 for r in rows)
    assert len(list((run["test"] / "overlays").glob("*.png"))) == 2 * len(ORGANS)


def test_predictions_are_on_the_query_scans_grid(runs: tuple[dict, dict], phantoms: Path) -> None:
    predictions = sorted((runs[0]["test"] / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 2 * len(ORGANS)
    for path in predictions:
        scan_id, class_id = path.name.split("_")[0][len("scan"):], int(path.name.split("_")[1][len("class"):])
        pred, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(phantoms / f"image_{scan_id}.nii.gz"))
        assert _geometry(pred) == _geometry(image)
        assert pred.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(pred)).tolist()) <= {0, class_id}


def test_scores_and_table_are_finite_and_agree(runs: tuple[dict, dict]) -> None:
    run = runs[0]
    rows = _rows(run["test"] / "scores.csv")
    for row in rows:
        dice = float(row["dice"])
        assert math.isfinite(dice) and 0.0 <= dice <= 1.0
        tp, fp, fn = int(row["tp"]), int(row["fp"]), int(row["fn"])
        assert dice == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    summary = json.loads((run["test"] / "summary.json").read_text(encoding="utf-8"))
    assert math.isfinite(summary["mean_dice"]) and run["result"]["mean_dice"] == summary["mean_dice"]
    table = {r["class_name"]: r for r in _rows(run["table"] / "summary.csv")}
    for organ in ORGANS:
        per_scan = [float(r["dice"]) for r in rows if r["class_name"] == organ]
        assert float(table[organ]["mean"]) == pytest.approx(sum(per_scan) / len(per_scan))
    assert float(table["mean"]["mean"]) == pytest.approx(summary["mean_dice"])
    markdown = (run["table"] / "summary.md").read_text(encoding="utf-8")
    assert "| QAMP |" in markdown and all(organ in markdown for organ in ORGANS)


def test_same_seed_same_weights_and_scores(runs: tuple[dict, dict]) -> None:
    first, second = runs
    a = load_snapshot(first["train"] / "snapshots" / "final.pth")
    b = load_snapshot(second["train"] / "snapshots" / "final.pth")
    assert a["history"]["loss"] == b["history"]["loss"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert ((first["test"] / "scores.csv").read_text(encoding="utf-8")
            == (second["test"] / "scores.csv").read_text(encoding="utf-8"))
    assert ((first["table"] / "summary.csv").read_text(encoding="utf-8")
            == (second["table"] / "summary.csv").read_text(encoding="utf-8"))
