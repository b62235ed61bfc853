"""End-to-end pipeline tests: train.py -> snapshot -> test.py on real CHAOS, resume, determinism, errors.

To stay fast on a 2-core CPU the trained model is a ResNet-50 QAMP at 64 x 64: the CHAOS T2 scans
(real data) are block-averaged 4 x 4 in-plane (labels and the published supervoxels sampled at the
block centres, spacing x 4) into a custom dataset folder whose test fold 0 is scans 1, 2, 3 (support
3 at supp_idx 2, as in CHAOST2 fold 0; queries 1 and 2); training uses the other 17 scans.
The copy-support baseline runs on the native 256 x 256 CHAOST2 files (fold 0, 4 queries).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import REPO, experiment, for_test, load_test_script
from engine.snapshot import load_snapshot

ex = experiment()
train_script = sys.modules["train"]
test_script = load_test_script()

FACTOR = 4  # in-plane downsampling of the CHAOS scans (256 -> 64)
CHAOS_LABELS = {"1": "LIVER", "2": "RK", "3": "LK", "4": "SPLEEN"}
SMALL_FOLDS = [[1, 2, 3], [5, 8, 10], [13, 15, 19], [20, 21, 22], [31, 32, 33]]  # fold 0 = 3 scans
TEST_CLASS = 2  # right kidney: few slices per scan, so test runs are short


def _downsample(image: sitk.Image, average: bool) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
    z, y, x = array.shape
    if average:
        small = array.reshape(z, y // FACTOR, FACTOR, x // FACTOR, FACTOR).mean(axis=(2, 4)).astype(np.float32)
    else:
        small = array[:, FACTOR // 2::FACTOR, FACTOR // 2::FACTOR].astype(np.int32)
    out = sitk.GetImageFromArray(small)
    spacing = np.array(image.GetSpacing())
    new_spacing = spacing * np.array([FACTOR, FACTOR, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((new_spacing - spacing) / 2)  # keep the physical extent: centre of the block
    out.SetSpacing(tuple(new_spacing))
    out.SetOrigin(tuple(np.array(image.GetOrigin()) + shift))
    out.SetDirection(image.GetDirection())
    return out


@pytest.fixture(scope="session")
def small_chaos(tmp_path_factory, chaos_dir: Path, chaos_sv_dir: Path) -> Path:
    """CHAOST2 at 64 x 64 as a custom dataset (image_/label_ files, supervoxels_5000/, dataset.json)."""
    root = tmp_path_factory.mktemp("chaos64")
    (root / "supervoxels_5000").mkdir()
    for path in sorted(chaos_dir.glob("image_*.nii.gz")):
        scan_id = path.name[len("image_"):-len(".nii.gz")]
        sitk.WriteImage(_downsample(sitk.ReadImage(str(path)), True), str(root / path.name))
        label = sitk.ReadImage(str(chaos_dir / f"label_{scan_id}.nii.gz"))
        sitk.WriteImage(sitk.Cast(_downsample(label, False), sitk.sitkUInt8), str(root / f"label_{scan_id}.nii.gz"))
        sv = sitk.ReadImage(str(chaos_sv_dir / f"superpix-MIDDLE_{scan_id}.nii.gz"))
        sitk.WriteImage(_downsample(sv, False), str(root / "supervoxels_5000" / f"superpix-MIDDLE_{scan_id}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps(
        {"name": "chaos64", "modality": "MR", "labels": CHAOS_LABELS, "test_labels": [1, 2, 3, 4],
         "n_sv": 5000, "image_size": 256 // FACTOR, "folds": SMALL_FOLDS}), encoding="utf-8")
    return root


def base_config(data_dir: Path, log_dir: Path, **updates) -> dict:
    config = {"dataset": "custom", "data_dir": str(data_dir), "backbone": "resnet50",
              "pretrained_weights": "none", "device": "cpu", "num_workers": 0, "min_size": 20,
              "n_steps": 4, "save_snapshot_every": 2, "print_interval": 1, "max_iters_per_load": 2,
              "test_label": [TEST_CLASS], "n_overlay_slices": 1, "test_batch_size": 4,
              "path": {"log_dir": str(log_dir)}}
    config.update(updates)
    return config


def run(command: str, **config):
    return ex.run(command_name=command, config_updates=for_test(config) if command == "test" else config).result


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(small_chaos: Path, tmp_path_factory) -> dict:
    """A 4-step training run (snapshots after step 2 and at the end)."""
    log_dir = tmp_path_factory.mktemp("runs")
    return run("train", **base_config(small_chaos, log_dir))


@pytest.fixture(scope="module")
def tested(trained: dict, small_chaos: Path, tmp_path_factory) -> dict:
    """test.py on the run folder of ``trained`` (class 2, queries 1 and 2)."""
    log_dir = tmp_path_factory.mktemp("tests")
    return run("test", **base_config(small_chaos, log_dir, reload_model_path=trained["run_dir"]))


# ----------------------------------------------------------------------------------------------
def test_training_writes_run_folder_and_full_snapshots(trained: dict) -> None:
    folder = Path(trained["run_dir"])
    assert folder.name == "train_custom_setting1_fold0"
    for name in ("config.json", "run.json", "cout.txt", "metrics.json", "logger.log", "loss_curve.png"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "snapshots").iterdir()) == ["final.pth", "step_0000002.pth"]
    snap = load_snapshot(folder / "snapshots" / "final.pth")
    assert snap["step"] == 4 and snap["final"] is True
    assert {"model", "optimizer", "scheduler", "rng", "generator", "history", "config"} <= set(snap)
    losses = snap["history"]["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # StepLR: lr x gamma every max_iters_per_load (= 2) steps
    assert snap["scheduler"]["last_epoch"] == 4
    lr = snap["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3 * 0.98 ** 2)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["loss"]["values"] == pytest.approx(losses)
    assert {"query_loss", "lr"} <= set(metrics)
    assert "step 4" in (folder / "logger.log").read_text(encoding="utf-8")


def test_test_run_writes_scores_summary_and_geometry(tested: dict, small_chaos: Path) -> None:
    folder = Path(tested["run_dir"])
    assert folder.name == "test_custom_setting1_fold0_supp2"
    rows = read_rows(folder / "scores.csv")
    assert list(rows[0]) == list(test_script.CSV_COLUMNS)
    assert [r["scan"] for r in rows] == ["1", "2"]  # fold 0 = scans 1, 2, 3; support 3
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    dice = [float(r["dice"]) for r in rows]
    assert summary["classes"][str(TEST_CLASS)]["dice_mean"] == pytest.approx(np.mean(dice))
    assert summary["classes"][str(TEST_CLASS)]["dice_std"] == pytest.approx(np.std(dice))
    assert summary["mean_dice"] == pytest.approx(np.mean(dice))
    for row in rows:
        scan = row["scan"]
        query = sitk.ReadImage(str(small_chaos / f"image_{scan}.nii.gz"))
        pred_image = sitk.ReadImage(str(folder / "predictions" / f"scan{scan}_class{TEST_CLASS}_RK.nii.gz"))
        assert pred_image.GetSize() == query.GetSize()
        assert pred_image.GetSpacing() == pytest.approx(query.GetSpacing())
        assert pred_image.GetOrigin() == pytest.approx(query.GetOrigin())
        assert pred_image.GetDirection() == pytest.approx(query.GetDirection())
        pred = sitk.GetArrayFromImage(pred_image)
        assert set(np.unique(pred)) <= {0, TEST_CLASS}
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(small_chaos / f"label_{scan}.nii.gz"))) == TEST_CLASS
        # protocol: only slices holding the class are segmented, so the 3D counts are whole-volume counts
        assert int(row["tp"]) == np.count_nonzero((pred > 0) & truth)
        assert int(row["fp"]) == np.count_nonzero((pred > 0) & ~truth)
        assert int(row["fn"]) == np.count_nonzero((pred == 0) & truth)
        assert int(row["slices"]) == np.count_nonzero(truth.any(axis=(1, 2)))
        assert len(list((folder / "overlays").glob(f"scan{scan}_class{TEST_CLASS}_z*.png"))) == 1


def test_same_seed_gives_identical_test_results(trained: dict, tested: dict, small_chaos: Path) -> None:
    first = Path(tested["run_dir"])
    log_dir = first.parent  # same folder: the second run must get a new name
    # The snapshot holds every weight: a pre-training file named in the config is not needed to test.
    second = Path(run("test", **base_config(small_chaos, log_dir, reload_model_path=trained["snapshot"],
                                            pretrained_weights="deeplabv3",
                                            pretrained_path=str(log_dir / "absent.pth")))["run_dir"])
    assert second.name == first.name + "_2"  # never reuses a run folder
    assert (first / "scores.csv").read_text(encoding="utf-8") == (second / "scores.csv").read_text(encoding="utf-8")
    for path in sorted((first / "predictions").iterdir()):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / "predictions" / path.name)))
        np.testing.assert_array_equal(a, b)


def test_support_feature_cache_changes_no_prediction(trained: dict, small_chaos: Path) -> None:
    """Support slices are encoded once per run; the predictions equal those without the cache."""
    from helpers import eval_dataset
    from models import build_model, make_generator
    from engine.evaluate import predict_scan

    model = build_model(base_config(small_chaos, small_chaos, model="qamp"), 256 // FACTOR)
    model.load_state_dict(load_snapshot(trained["snapshot"])["model"])
    model.eval()
    tds = eval_dataset("custom", small_chaos, 0, 2, test_label=[TEST_CLASS])
    calls = []
    model.encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    outputs = {}
    for cached in (False, True):
        cache = {} if cached else None
        generator = make_generator(7, TEST_CLASS)
        calls.clear()
        outputs[cached] = [predict_scan(model, tds, scan, TEST_CLASS, 4, torch.device("cpu"), generator,
                                        cache) for scan in tds.queries]
        if cached:
            assert sorted(cache) == sorted(int(z) for z in tds.support_slices(TEST_CLASS))
        outputs[(cached, "calls")] = len(calls)
    assert len(tds.queries) == 2 and tds.n_part == 3
    assert outputs[(False, "calls")] - outputs[(True, "calls")] == 3  # 6 support passes without the cache, 3 with
    for (pred_a, prior_a, of_a), (pred_b, prior_b, of_b) in zip(outputs[False], outputs[True]):
        np.testing.assert_array_equal(pred_a, pred_b)
        np.testing.assert_array_equal(prior_a, prior_b)
        np.testing.assert_array_equal(of_a, of_b)


def test_resume_continues_with_the_same_losses(trained: dict, small_chaos: Path, tmp_path: Path) -> None:
    half = run("train", **base_config(small_chaos, tmp_path, n_steps=2))
    resumed = run("train", **base_config(small_chaos, tmp_path, n_steps=4, resume=half["run_dir"]))
    straight = load_snapshot(trained["snapshot"])
    continued = load_snapshot(resumed["snapshot"])
    assert continued["step"] == 4
    assert continued["history"]["loss"] == straight["history"]["loss"]  # exact, step by step
    for key, value in straight["model"].items():
        torch.testing.assert_close(continued["model"][key], value, rtol=0, atol=0, msg=key)


def test_copy_support_on_native_chaos(chaos_dir: Path, tmp_path: Path) -> None:
    data_root = chaos_dir.parents[1]
    result = run("test", model="copy_support", dataset="CHAOST2", data_dir=str(data_root), test_label=[4],
                 n_overlay_slices=0, device="cpu", path={"log_dir": str(tmp_path)})
    folder = Path(result["run_dir"])
    rows = read_rows(folder / "scores.csv")
    assert [r["scan"] for r in rows] == ["1", "2", "5", "8"]  # fold 0 = ids 1 2 3 5 8, support 3
    support = sitk.GetArrayFromImage(sitk.ReadImage(str(chaos_dir / "label_3.nii.gz"))) == 4
    for row in rows:
        query = sitk.ReadImage(str(chaos_dir / f"image_{row['scan']}.nii.gz"))
        pred_image = sitk.ReadImage(str(folder / "predictions" / f"scan{row['scan']}_class4_SPLEEN.nii.gz"))
        assert pred_image.GetSize() == query.GetSize()
        assert pred_image.GetOrigin() == pytest.approx(query.GetOrigin())
        assert pred_image.GetSpacing() == pytest.approx(query.GetSpacing())
        pred = sitk.GetArrayFromImage(pred_image) > 0
        # every segmented slice is one of the support's spleen masks
        for z in np.flatnonzero(pred.any(axis=(1, 2))):
            assert any(np.array_equal(pred[z], support[s]) for s in range(support.shape[0]))
        assert 0.0 <= float(row["dice"]) <= 1.0


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------------
def test_missing_reload_model_path(small_chaos: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reload_model_path is not set"):
        run("test", **base_config(small_chaos, tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run("test", **base_config(small_chaos, tmp_path, reload_model_path=str(tmp_path / "nope.pth")))


def test_run_folder_without_final_snapshot(small_chaos: Path, tmp_path: Path) -> None:
    (tmp_path / "run" / "snapshots").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no final snapshot"):
        run("test", **base_config(small_chaos, tmp_path, reload_model_path=str(tmp_path / "run")))


def test_snapshot_of_another_architecture(trained: dict, small_chaos: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backbone: the snapshot has 'resnet50', requested 'resnet101'"):
        run("test", **base_config(small_chaos, tmp_path, reload_model_path=trained["snapshot"],
                                  backbone="resnet101"))


def test_snapshot_of_another_image_size(trained: dict, chaos_dir: Path, tmp_path: Path) -> None:
    # the snapshot's model sees 64 px; image_size=None on 256 px CHAOST2 would give it 256 px slices
    config = base_config(chaos_dir, tmp_path, reload_model_path=trained["snapshot"], dataset="CHAOST2",
                         image_size=None)
    with pytest.raises(ValueError, match=r"image_size: the snapshot has 64, requested None.*256 px"):
        run("test", **config)


@pytest.mark.parametrize("key", ["n_way", "n_query"])
def test_more_than_one_way_or_query_is_refused(key: str, small_chaos: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{key}=2 is not supported"):
        run("train", **base_config(small_chaos, tmp_path, **{key: 2}))


def test_unwritable_log_dir(small_chaos: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a writable folder"):
        run("train", **base_config(small_chaos, blocker / "runs"))


def test_unknown_value(small_chaos: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model='unet' is unknown: expected one of \['qamp', 'adnet', 'alpnet', 'qnet', "
                                         r"'panet', 'gmrd', 'copy_support'\]"):
        run("train", **base_config(small_chaos, tmp_path, model="unet"))


def test_setting2_run_name_and_exclusion(tmp_path: Path) -> None:
    from config import run_name
    from dataloaders.datasets import DATASETS
    from dataloaders.resolved import resolve_labels

    log_dir = {"path": {"log_dir": str(tmp_path)}}
    config = ex.run("print_config", log_dir, named_configs=["abd_ct", "setting2"]).config
    assert config["dataset"] == "SABS" and (config["tau_fg"], config["tau_bg"]) == (0.7, 0.6)
    assert run_name(config, "train") == "train_SABS_setting2_fold0"
    assert resolve_labels(config, DATASETS["SABS"]) == ([1, 2, 3, 6], [1, 2, 3, 6])
    config = ex.run("print_config", log_dir, named_configs=["abd_mri"]).config
    assert resolve_labels(config, DATASETS["CHAOST2"]) == ([1, 2, 3, 4], [])


def test_test_script_finds_the_newest_finished_training_run(tmp_path: Path) -> None:
    """scripts/test_*.sh pick, per fold, the run folder with the largest suffix holding final.pth."""
    import os
    import subprocess

    for name, final in [("fold0", True), ("fold0_2", True), ("fold0_10", True), ("fold0_11", False)]:
        snapshots = tmp_path / f"train_CHAOST2_setting2_{name}" / "snapshots"
        snapshots.mkdir(parents=True)
        if final:
            (snapshots / "final.pth").write_bytes(b"")
    env = {**os.environ, "PYTHON": "echo", "LOG_DIR": str(tmp_path), "SETTING": "2", "FOLDS": "0",
           "SUPP_IDX": "1 2"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "test_abd_mri.sh"), "backbone=resnet50"], env=env,
                         capture_output=True, check=True, encoding="utf-8").stdout
    commands = [line for line in out.splitlines() if line.startswith("test.py")]
    assert len(commands) == 2
    for supp, command in zip((1, 2), commands):
        args = command.split()
        assert args[:4] == ["test.py", "with", "abd_mri", "setting2"]
        assert f"reload_model_path={tmp_path}/train_CHAOST2_setting2_fold0_10" in args
        assert f"supp_idx={supp}" in args and "eval_fold=0" in args and args[-1] == "backbone=resnet50"
    env["FOLDS"] = "1"
    failed = subprocess.run(["bash", str(REPO / "scripts" / "test_abd_mri.sh")], env=env, capture_output=True,
                            encoding="utf-8")
    assert failed.returncode == 1 and "no finished training run for fold 1" in failed.stderr


def test_build_snapshot_is_the_one_snapshot_format(trained: dict) -> None:
    """engine.snapshot.build_snapshot writes every key of the format (with the AMP / distributed
    extras when they apply), and train() calls it in one place."""
    import inspect

    from engine.distributed import Distributed
    from engine.snapshot import SNAPSHOT_FORMAT, build_snapshot

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)

    class Fp16:
        def state_dict(self) -> dict:
            return {"scale": 1024.0}

    core = {"format", "step", "final", "model", "optimizer", "scheduler", "rng", "generator", "history", "val",
            "config", "meta"}
    state = build_snapshot(3, False, model, optimizer, scheduler, torch.Generator(), {"loss": (1.0, 0.5)},
                           {"optim": {"lr": 0.1}, "test_label": (1, 2)}, [{"step": 2}], None, Distributed(), Fp16())
    assert set(state) == core | {"amp_scaler"} and state["amp_scaler"] == {"scale": 1024.0}
    assert state["format"] == SNAPSHOT_FORMAT and state["step"] == 3 and state["final"] is False
    assert state["config"] == {"optim": {"lr": 0.1}, "test_label": [1, 2]} and state["meta"] == {}
    assert state["history"] == {"loss": [1.0, 0.5]} and state["val"] == [{"step": 2}]
    assert set(load_snapshot(trained["snapshot"])) == core  # one process, float32: no extras
    assert inspect.getsource(train_script.train).count("build_snapshot(") == 1
