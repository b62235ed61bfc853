"""``image_size`` (resampling on load, native-grid predictions), the validation curve and the
all-background report, on synthetic phantoms (no external data)."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import ex  # noqa: E402
import train as train_script  # noqa: E402  (registers the 'train' command)
from data import synthetic  # noqa: E402
from dataloaders.train_dataset import TrainDataset  # noqa: E402
from utils.resample import resize_image, resize_labels, resize_probabilities  # noqa: E402
from utils.snapshot import load_snapshot  # noqa: E402

if "qamp_test_script" not in sys.modules:  # test.py clashes with the standard library's `test`
    _spec = importlib.util.spec_from_file_location("qamp_test_script", REPO / "test.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)

NATIVE = 48  # phantom in-plane size on disk
SIZE = 32  # what the model sees
TINY_HEAD = {"n_mlp_fg": 8, "n_keep_fg": 4, "n_query_fg": 4, "n_edge": 4, "n_mlp_bg": 16, "n_keep_bg": 8,
             "n_query_bg": 4, "feature_dim": 64}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms48")
    synthetic.generate(out, n_scans=5, seed=3, size=NATIVE, progress=False)
    return out


def config_for(data_dir: Path, log_dir: Path, **updates) -> dict:
    config = {"dataset": "custom", "data_dir": str(data_dir), "backbone": "resnet50", "pretrained_weights": "none",
              "device": "cpu", "num_workers": 0, "min_size": 20, "n_steps": 4, "save_snapshot_every": 4,
              "print_interval": 2, "max_iters_per_load": 4, "image_size": SIZE, "supervoxel_source": "generate",
              "val_interval": 2, "test_label": [1, 2], "n_overlay_slices": 1, "test_batch_size": 8,
              "path": {"log_dir": str(log_dir)}, **TINY_HEAD}
    config.update(updates)
    return config


@pytest.fixture(scope="module")
def trained(phantoms: Path, tmp_path_factory) -> dict:
    return ex.run(command_name="train", config_updates=config_for(phantoms, tmp_path_factory.mktemp("runs"))).result


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


def test_training_episodes_are_at_image_size(phantoms: Path) -> None:
    ds = TrainDataset("custom", phantoms, 0, image_size=SIZE, supervoxel_source="generate", min_size=20,
                      exclude_scan_ids=[5], n_steps=2)
    assert ds.image_size == SIZE and 5 not in [s.scan_id for s in ds.scans]
    episode = ds[0]
    assert episode["support_images"].shape == (1, 3, SIZE, SIZE)
    assert episode["query_labels"].shape == (1, SIZE, SIZE)
    assert set(np.unique(episode["support_masks"].numpy())) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------- validation
def test_validation_curve_written(trained: dict) -> None:
    folder = Path(trained["run_dir"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["val_dice_mean"]["steps"] == [2, 4]
    for name in ("liver", "right_kidney"):
        values = metrics[f"val_dice_{name}"]["values"]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    for key in ("fg_fraction", "reverse_ran"):
        values = metrics[key]["values"]
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    assert metrics["reverse_ran"]["values"] == [float(v > 0) for v in metrics["fg_fraction"]["values"]]
    assert (folder / "val_curve.png").stat().st_size > 0 and (folder / "loss_curve.png").is_file()
    log = (folder / "logger.log").read_text()
    assert "validation after step 2: Dice %" in log and "validation every 2 steps on scans [4, 5]" in log
    snapshot = load_snapshot(folder / "snapshots" / "final.pth")
    assert [p["step"] for p in snapshot["val"]] == [2, 4]
    assert trained["val"]["mean"] == pytest.approx(metrics["val_dice_mean"]["values"][-1])


def test_validation_scans_never_in_test_fold(phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_scans=\[1, 4\]: scans \[1\] are not training scans of fold 0"):
        ex.run(command_name="train", config_updates=config_for(phantoms, tmp_path, val_scans=[1, 4]))


def test_all_background_is_reported(caplog) -> None:
    log = logging.getLogger("qamp_test_collapse")
    log.propagate = True
    with caplog.at_level(logging.INFO, logger="qamp_test_collapse"):
        train_script.log_interval(log, 10, {"loss": [1.0] * 5, "fg_fraction": [0.0] * 5}, 0.01)
        train_script.log_interval(log, 20, {"loss": [1.0] * 5, "fg_fraction": [0.0] * 4 + [0.1]}, 0.01)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "all background" in warnings[0] and "steps 6-10" in warnings[0]


# ---------------------------------------------------------------------------------------------- test.py
def test_predictions_go_back_to_the_native_grid(trained: dict, phantoms: Path, tmp_path: Path) -> None:
    result = ex.run(command_name="test", config_updates=config_for(
        phantoms, tmp_path, reload_model_path=trained["run_dir"], supp_idx=0)).result
    folder = Path(result["run_dir"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["model_image_size"] == SIZE and summary["dice_grid"] == "native"
    predictions = sorted((folder / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["scan2_class1_liver.nii.gz", "scan2_class2_right_kidney.nii.gz"]
    for path in predictions:
        scan_id = path.name.split("_")[0][len("scan"):]
        pred, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(phantoms / f"image_{scan_id}.nii.gz"))
        assert pred.GetSize() == image.GetSize() and pred.GetSize()[:2] == (NATIVE, NATIVE)
        assert pred.GetSpacing() == pytest.approx(image.GetSpacing())
        assert pred.GetOrigin() == pytest.approx(image.GetOrigin())
        assert pred.GetDirection() == pytest.approx(image.GetDirection())


def test_snapshot_of_another_image_size_is_refused(trained: dict, phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image_size=32 \(this run: None\)"):
        ex.run(command_name="test", config_updates=config_for(
            phantoms, tmp_path, reload_model_path=trained["run_dir"], image_size=None, supp_idx=0))
