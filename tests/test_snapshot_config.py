"""Runs that remember their own config, on synthetic phantoms (no external data): snapshot ``meta``,
``test.py`` with only ``reload_model_path`` and data keys, model keys that contradict the snapshot,
exact resume with ``resume=RUN`` alone, and resume refusals (no run folder left behind)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import SIZE, experiment
from models import MODEL_KEYS
from engine.snapshot import describe, load_snapshot

ex = experiment()
# `tiny_run` (conftest.py): 4 steps in one go, snapshots after steps 2 and 4, lr 0.02 halved every 2 steps


def run_folders(log_dir: Path) -> set[str]:
    return {p.name for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith("_")} if log_dir.exists() else set()


# ---------------------------------------------------------------------------------------------- meta
def test_snapshot_describes_itself(tiny_run: dict) -> None:
    snapshot = load_snapshot(tiny_run["snapshot"])
    meta = snapshot["meta"]
    assert meta["version"] == 1 and meta["image_size"] == SIZE and meta["backbone"] == "resnet50"
    assert meta["normalisation"] == "per-volume z-score" and meta["dataset"] == "custom"
    assert meta["class_names"] == {"1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}
    assert meta["orientation"] == "LAS"
    keys = meta["model_keys"]
    assert keys["model"] == "qamp" and keys["image_size"] == SIZE and keys["n_mlp_fg"] == 8
    assert keys["query_loss_weights"] == [0.1, 1.0] and "fast_mlp" not in keys
    assert snapshot["config"]["n_steps"] == 4  # the training config travels with it
    # a snapshot written before meta existed is described from its config
    old = {k: v for k, v in snapshot.items() if k != "meta"}
    assert describe(old, model_keys=MODEL_KEYS)["model_keys"] == keys


# ---------------------------------------------------------------------------------------------- test.py
def test_test_py_with_only_reload_model_path_and_data_keys(tiny_run: dict, tmp_path: Path) -> None:
    log_dir = tmp_path / "tests"
    result = ex.run(command_name="test", config_updates={
        "reload_model_path": tiny_run["run_dir"], "supp_idx": 0, "test_label": [2], "n_overlay_slices": 0,
        "device": "cpu", "path": {"log_dir": str(log_dir)}}).result
    folder = Path(result["run_dir"])
    assert folder.name == "test_custom_setting1_fold0_supp0"  # dataset and fold from the snapshot
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["model_image_size"] == SIZE and list(summary["classes"]) == ["2"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["backbone"] == "resnet50" and config["n_mlp_fg"] == 8 and config["image_size"] == SIZE
    assert "image size 32" in (folder / "logger.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("key, value, message", [
    ("backbone", "resnet101", "backbone: the snapshot has 'resnet50', requested 'resnet101'"),
    ("n_mlp_fg", 9, "n_mlp_fg: the snapshot has 8, requested 9"),
    ("image_size", 48, "image_size: the snapshot has 32, requested 48")])
def test_test_py_refuses_model_keys_that_contradict_the_snapshot(tiny_run: dict, tmp_path: Path, key: str,
                                                                   value, message: str) -> None:
    log_dir = tmp_path / "tests"
    with pytest.raises(ValueError) as info:
        ex.run(command_name="test", config_updates={
            "reload_model_path": tiny_run["run_dir"], "supp_idx": 0, key: value, "device": "cpu",
            "path": {"log_dir": str(log_dir)}})
    assert message in str(info.value) and "Drop these keys" in str(info.value)
    assert run_folders(log_dir) == set(), "a refused test run must leave no run folder"


def test_failed_test_run_leaves_no_folder(tiny_run: dict, tmp_path: Path) -> None:
    log_dir = tmp_path / "tests"
    with pytest.raises(FileNotFoundError):
        ex.run(command_name="test", config_updates={
            "reload_model_path": tiny_run["run_dir"], "data_dir": str(tmp_path / "missing"), "device": "cpu",
            "path": {"log_dir": str(log_dir)}})
    assert run_folders(log_dir) == set()


# ---------------------------------------------------------------------------------------------- resume
@pytest.fixture
def interrupted(tiny_run: dict, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run as if it had stopped after step 2 (no final snapshot)."""
    folder = tmp_path / "interrupted"
    shutil.copytree(tiny_run["run_dir"], folder)
    (folder / "snapshots" / "final.pth").unlink()
    assert [p.name for p in (folder / "snapshots").iterdir()] == ["step_0000002.pth"]
    return folder


def test_resume_alone_continues_exactly(tiny_run: dict, interrupted: Path) -> None:
    result = ex.run(command_name="train", config_updates={"resume": str(interrupted)}).result
    folder = Path(result["run_dir"])
    assert folder.parent == Path(tiny_run["run_dir"]).parent  # the run's own log_dir
    assert folder.name == "train_custom_setting1_fold0_2"  # named from the restored config
    continued, uninterrupted = load_snapshot(result["snapshot"]), load_snapshot(tiny_run["snapshot"])
    assert continued["step"] == 4
    assert continued["history"]["loss"] == uninterrupted["history"]["loss"]
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(continued["model"][key], value, rtol=0, atol=0, msg=key)
    log = (folder / "logger.log").read_text(encoding="utf-8")
    assert "resume: learning rate 1.000e-02" in log  # 0.02 halved after 2 steps: the restored value
    step4 = next(line for line in log.splitlines() if " - step 4: " in line)
    assert step4.endswith("lr=1.000e-02")


def test_resume_may_change_logging_keys(tiny_run: dict, interrupted: Path, tmp_path: Path) -> None:
    result = ex.run(command_name="train", config_updates={
        "resume": str(interrupted), "print_interval": 1, "path": {"log_dir": str(tmp_path / "elsewhere")}}).result
    assert Path(result["run_dir"]).parent == tmp_path / "elsewhere"
    assert load_snapshot(result["snapshot"])["history"]["loss"] == load_snapshot(tiny_run["snapshot"])["history"]["loss"]
    assert "print_interval 2 -> 1" in (Path(result["run_dir"]) / "logger.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("updates, listed", [
    ({"eval_fold": 1}, ["eval_fold: the run has 0, requested 1"]),
    ({"optim.lr": 0.001, "seed": 7}, ["optim: the run has {'lr': 0.02", "requested {'lr': 0.001",
                                      "seed: the run has 2025, requested 7"]),
    ({"backbone": "resnet101", "image_size": 48}, ["backbone: the run has 'resnet50', requested 'resnet101'",
                                                   "image_size: the run has 32, requested 48"])])
def test_resume_refuses_keys_that_change_the_run(tiny_run: dict, interrupted: Path, updates: dict,
                                                 listed: list[str]) -> None:
    log_dir = Path(tiny_run["run_dir"]).parent
    before = run_folders(log_dir)
    with pytest.raises(ValueError, match="a resumed run continues with its own config") as info:
        ex.run(command_name="train", config_updates={"resume": str(interrupted), **updates})
    for text in listed:
        assert text in str(info.value)
    assert run_folders(log_dir) == before, "a refused resume must leave no run folder"


def test_resume_of_a_finished_run_needs_more_steps(tiny_run: dict) -> None:
    log_dir = Path(tiny_run["run_dir"]).parent
    before = run_folders(log_dir)
    with pytest.raises(ValueError, match="already has 4 steps and n_steps=4; raise n_steps"):
        ex.run(command_name="train", config_updates={"resume": tiny_run["run_dir"]})
    assert run_folders(log_dir) == before


def test_resume_with_ground_truth_keeps_validation_on_or_off() -> None:
    """use_gt=True leaves the validation scans out of training only while validation is on, so a
    resume may change val_interval's value but not switch validation on or off."""
    from engine.snapshot_config import _check_resume

    header = {"config": {"use_gt": True, "val_interval": 500}, "step": 2, "path": "run/snapshots/step_0000002.pth"}
    _check_resume({"resume": "run", "n_steps": 10, "use_gt": True, "val_interval": 100}, header)
    with pytest.raises(ValueError, match=r"val_interval: the run has 500, requested 0 \(with use_gt=True"):
        _check_resume({"resume": "run", "n_steps": 10, "use_gt": True, "val_interval": 0}, header)
    header["config"]["use_gt"] = False  # supervoxel training: validation scans are never trained on
    _check_resume({"resume": "run", "n_steps": 10, "use_gt": False, "val_interval": 0}, header)
