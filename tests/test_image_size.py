"""``image_size`` (resampling on load, native-grid predictions), the validation curve and the
all-background report, on synthetic phantoms (no external data)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import NATIVE, SIZE, experiment, for_test, tiny_train_config, train_dataset
from utils.resample import resize_image, resize_labels, resize_probabilities
from engine.snapshot import load_snapshot

ex = experiment()
train_script = sys.modules["train"]
# `phantoms48` and `tiny_run` (conftest.py): 48 x 48 phantoms on disk, the model at image_size 32,
# validation after steps 2 and 4


def config_for(data_dir: Path, log_dir: Path, **updates) -> dict:
    return tiny_train_config(data_dir, log_dir, n_overlay_slices=1, **updates)


# ---------------------------------------------------------------------------------------------- resampling
def test_label_resampling_keeps_ids_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    ids = rng.choice(np.array([0, 3, 17, 40_000, 2**31 - 5], dtype=np.int64), size=(3, 37, 41))
    small = resize_labels(ids, 16)
    assert small.shape == (3, 16, 16) and small.dtype == ids.dtype
    assert set(np.unique(small)) <= set(np.unique(ids))  # nothing invented
    # a map constant on 4 x 4 blocks goes down and back up unchanged (pixel centres are matched)
    blocks = rng.integers(0, 5000, size=(2, 8, 8)).repeat(4, axis=1).repeat(4, axis=2)
    np.testing.assert_array_equal(resize_labels(resize_labels(blocks, 8), 32), blocks)


def test_image_and_probability_resampling() -> None:
    image = np.linspace(-2, 2, 2 * 48 * 48, dtype=np.float32).reshape(2, 48, 48)
    small = resize_image(image, SIZE)
    assert small.shape == (2, SIZE, SIZE) and small.dtype == np.float32
    assert image.min() <= small.min() and small.max() <= image.max()
    prob = torch.softmax(torch.randn(3, 2, SIZE, SIZE), dim=1)
    back = resize_probabilities(prob, (NATIVE, 50))
    assert back.shape == (3, 2, NATIVE, 50) and 0 <= float(back.min()) and float(back.max()) <= 1
    torch.testing.assert_close(back.sum(dim=1), torch.ones(3, NATIVE, 50))


def test_training_episodes_are_at_image_size(phantoms48: Path) -> None:
    ds = train_dataset("custom", phantoms48, 0, image_size=SIZE, supervoxel_source="generate", min_size=20,
                       exclude_scan_ids=[5], n_steps=2)
    assert ds.image_size == SIZE and 5 not in [s.scan_id for s in ds.scans]
    episode = ds[0]
    assert episode["support_images"].shape == (1, 3, SIZE, SIZE)
    assert episode["query_labels"].shape == (1, SIZE, SIZE)
    assert set(np.unique(episode["support_masks"].numpy())) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------- validation
def test_validation_curve_written(tiny_run: dict) -> None:
    folder = Path(tiny_run["run_dir"])
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["val_dice_mean"]["steps"] == [2, 4]
    for name in ("liver", "right_kidney"):
        values = metrics[f"val_dice_{name}"]["values"]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    for key in ("fg_fraction", "reverse_ran"):
        values = metrics[key]["values"]
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    assert metrics["reverse_ran"]["values"] == [float(v > 0) for v in metrics["fg_fraction"]["values"]]
    assert (folder / "val_curve.png").stat().st_size > 0 and (folder / "loss_curve.png").is_file()
    log = (folder / "logger.log").read_text(encoding="utf-8")
    assert "validation after step 2: Dice %" in log and "validation every 2 steps on scans [4, 5]" in log
    snapshot = load_snapshot(folder / "snapshots" / "final.pth")
    assert [p["step"] for p in snapshot["val"]] == [2, 4]
    assert tiny_run["val"]["mean"] == pytest.approx(metrics["val_dice_mean"]["values"][-1])


def test_validation_scans_never_in_test_fold(phantoms48: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_scans=\[1, 4\]: scans \[1\] are not training scans of fold 0"):
        ex.run(command_name="train", config_updates=config_for(phantoms48, tmp_path, val_scans=[1, 4]))


def test_all_background_is_reported(caplog) -> None:
    log = logging.getLogger("qamp_test_collapse")
    log.propagate = True
    with caplog.at_level(logging.INFO, logger="qamp_test_collapse"):
        train_script.log_interval(log, 10, {"loss": [1.0] * 5, "fg_fraction": [0.0] * 5}, 0.01)
        train_script.log_interval(log, 20, {"loss": [1.0] * 5, "fg_fraction": [0.0] * 4 + [0.1]}, 0.01)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "all background" in warnings[0] and "steps 6-10" in warnings[0]


# ---------------------------------------------------------------------------------------------- test.py
def test_predictions_go_back_to_the_native_grid(tiny_run: dict, phantoms48: Path, tmp_path: Path) -> None:
    result = ex.run(command_name="test", config_updates=for_test(config_for(
        phantoms48, tmp_path, reload_model_path=tiny_run["run_dir"], supp_idx=0))).result
    folder = Path(result["run_dir"])
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["model_image_size"] == SIZE and summary["dice_grid"] == "native"
    predictions = sorted((folder / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["scan2_class1_liver.nii.gz", "scan2_class2_right_kidney.nii.gz"]
    for path in predictions:
        scan_id = path.name.split("_")[0][len("scan"):]
        pred, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(phantoms48 / f"image_{scan_id}.nii.gz"))
        assert pred.GetSize() == image.GetSize() and pred.GetSize()[:2] == (NATIVE, NATIVE)
        assert pred.GetSpacing() == pytest.approx(image.GetSpacing())
        assert pred.GetOrigin() == pytest.approx(image.GetOrigin())
        assert pred.GetDirection() == pytest.approx(image.GetDirection())


def test_snapshot_of_another_image_size_is_refused(tiny_run: dict, phantoms48: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image_size: the snapshot has 32, requested None"):
        ex.run(command_name="test", config_updates=for_test(config_for(
            phantoms48, tmp_path, reload_model_path=tiny_run["run_dir"], image_size=None, supp_idx=0)))
