"""bench/cpu_budget_table.py: the grid's units and their order, the choice of the better baseline,
and the collected table (per organ, mean, per seed, flag below copy-support) on hand-made test runs."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("cpu_budget_table", REPO / "bench" / "cpu_budget_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_test_run(folder: Path, supp: int, seed: int, dice: dict[int, float]) -> None:
    """One test run: scores.csv with two query scans per class, and its summary.json."""
    folder.mkdir(parents=True)
    names = {1: "LIVER", 2: "RK"}
    with open(folder / "scores.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "supp_idx", "seed", "scan", "class", "class_name", "dice"])
        for class_id, value in dice.items():
            for scan, delta in ((3, -0.05), (5, 0.05)):
                writer.writerow([0, supp, seed, scan, class_id, names[class_id], value + delta])
    (folder / "summary.json").write_text(json.dumps({"supp_idx": supp}), encoding="utf-8")


def write_method(root: Path, cell: str, method: str, seed: int, dice: dict[int, float]) -> None:
    for supp in (0, 1, 2):
        write_test_run(root / cell / method / f"seed{seed}" / "cells" / f"c-supp{supp}" / "test_x", supp, seed, dice)


def test_units_start_with_the_baselines_that_choose_the_others(table) -> None:
    units = table.units()
    cells = [(u.cell, u.method, u.seed) for u in units]
    assert cells[:2] == [("CHAOST2_setting1", "adnet", 2025), ("CHAOST2_setting1", "alpnet", 2025)]
    assert cells[2:6] == [("SABS_setting1", "qamp", 2025), ("SABS_setting1", table.BEST, 2025),
                          ("CHAOST2_setting2", "qamp", 2025), ("CHAOST2_setting2", table.BEST, 2025)]
    assert cells[6:] == [("CHAOST2_setting1", "qamp", 2025), ("CHAOST2_setting1", "qamp", 2026)]


def write_session(folder: Path, start: str, status: str, stop: str | None, val: dict[int, float],
                  snapshot_at: str | None = None) -> None:
    """One session of a training run: run.json, metrics.json and (interrupted) its last snapshot."""
    import os
    from datetime import datetime, timezone

    (folder / "snapshots").mkdir(parents=True)
    info = {"start_time": start, "status": status, **({"stop_time": stop} if stop else {})}
    (folder / "run.json").write_text(json.dumps(info), encoding="utf-8")
    metrics = {"val_dice_mean": {"steps": list(val), "values": list(val.values())}}
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    if snapshot_at:
        path = folder / "snapshots" / "step_0001000.pth"
        path.write_bytes(b"")
        stamp = datetime.fromisoformat(snapshot_at).replace(tzinfo=timezone.utc).timestamp()
        os.utime(path, (stamp, stamp))


def test_a_resumed_training_counts_its_sessions_up_to_the_snapshot_and_joins_its_curve(table, tmp_path: Path) -> None:
    cell = tmp_path / "adnet" / "seed2025" / "cells" / "c"
    write_session(cell / "train_x", "2026-12-02T05:00:00", "RUNNING", None, {500: 0.3, 1000: 0.4},
                  snapshot_at="2026-12-02T05:20:00")  # stopped at step ~1100, resumed from step 1000
    write_session(cell / "train_x_1", "2026-12-02T07:00:00", "COMPLETED", "2026-12-02T07:40:00",
                  {1500: 0.5, 6000: 0.6})
    sessions = table.training_sessions(tmp_path / "adnet")
    assert [p.name for p in sessions["seed2025"]] == ["train_x", "train_x_1"]
    assert table.train_seconds(sessions["seed2025"]) == 20 * 60 + 40 * 60
    assert table.val_curve(sessions["seed2025"]) == [(500, 30.0), (1000, 40.0), (1500, 50.0), (6000, 60.0)]
    assert table.train_seconds(sessions["seed2025"][:1]) is None  # still running: no time yet


def test_sweep_command_uses_the_method_lr_and_generates_sabs_supervoxels(table, tmp_path: Path) -> None:
    unit = table.Unit("SABS_setting1", "alpnet", 2025)
    command = table.sweep_command(unit, tmp_path, "/data", "python")
    assert command[command.index("--configs") + 1] == "abd_ct+setting1+cpu_budget+cpu_budget_alpnet"
    assert command[command.index("--out") + 1] == str(tmp_path / "SABS_setting1" / "alpnet" / "seed2025")
    assert "supervoxel_source=generate" in command and "--test" in command


def test_best_baseline_waits_for_both_and_takes_the_higher_mean(table, tmp_path: Path) -> None:
    write_method(tmp_path, "CHAOST2_setting1", "adnet", 2025, {1: 0.5, 2: 0.3})
    assert table.best_baseline(tmp_path) is None  # alpnet has not finished
    write_method(tmp_path, "CHAOST2_setting1", "alpnet", 2025, {1: 0.6, 2: 0.4})
    assert table.best_baseline(tmp_path) == "alpnet"


def test_collect_writes_the_table_with_per_seed_means_and_flags(table, tmp_path: Path) -> None:
    root, results = tmp_path / "grid", tmp_path / "results"
    write_method(root, "CHAOST2_setting1", "qamp", 2025, {1: 0.7, 2: 0.5})
    write_method(root, "CHAOST2_setting1", "qamp", 2026, {1: 0.6, 2: 0.4})
    write_method(root, "CHAOST2_setting1", "adnet", 2025, {1: 0.2, 2: 0.2})
    for supp in (0, 1, 2):
        write_test_run(root / "CHAOST2_setting1" / "copy_support" / f"test_{supp}", supp, 2025, {1: 0.5, 2: 0.3})
    args = argparse.Namespace(dir=str(root), results=str(results))
    result = table.collect(args)
    dice = result["cells"]["CHAOST2_setting1"]["dice_percent"]
    assert dice["qamp"]["per_seed"] == [60.0, 50.0] and dice["qamp"]["mean"] == 55.0
    assert dice["qamp"]["LIVER"] == 65.0 and dice["qamp"]["RK"] == 45.0
    assert dice["copy_support"]["mean"] == 40.0 and dice["adnet"]["mean"] == 20.0
    saved = json.loads((results / "cpu_budget_table.json").read_text(encoding="utf-8"))
    assert saved["cells"]["CHAOST2_setting1"]["dice_percent"]["adnet"]["per_support"] == {"0": 20.0, "1": 20.0, "2": 20.0}
    markdown = (results / "cpu_budget_table.md").read_text(encoding="utf-8")
    assert "| adnet | 20.0 | 20.0 | 20.0 (below copy-support: a defect) |" in markdown
    assert "| qamp | 65.0 | 45.0 | 55.0 | [60.0, 50.0] |" in markdown


def test_a_rate_whose_full_budget_run_fell_apart_is_found(table, tmp_path: Path) -> None:
    """A unit kept in <dir>/unstable whose validation fell below half its peak after the peak."""
    for name, lr, val in (("adnet_lr0.02", 0.02, {1000: 0.60, 1500: 0.63, 2000: 0.47, 3000: 0.149}),
                          ("alpnet_lr0.02", 0.02, {1000: 0.60, 1500: 0.66, 2000: 0.40})):  # 40 > 33: kept
        run = tmp_path / "unstable" / name / "seed2025" / "cells" / "c" / "train_x"
        write_session(run, "2026-12-02T05:00:00", "FAILED", None, val)
        model = name.split("_")[0]
        (run / "config.json").write_text(json.dumps({"model": model, "optim": {"lr": lr}}), encoding="utf-8")
    found = table.full_budget_unstable(tmp_path / "unstable")
    assert list(found) == [("adnet", 0.02)]
    assert found[("adnet", 0.02)]["peak"] == [1500, 63.0] and found[("adnet", 0.02)]["low"] == [3000, 14.9]


def test_a_unit_another_process_runs_is_held(table, tmp_path: Path) -> None:
    import fcntl

    cell = tmp_path / "cells" / "c"
    cell.mkdir(parents=True)
    assert not table.held_elsewhere(tmp_path)
    with open(cell / ".lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as tools.sweep holds it while a cell runs
        import subprocess
        probe = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('t', sys.argv[1]); "
                 "m = importlib.util.module_from_spec(spec); sys.modules['t'] = m; spec.loader.exec_module(m); "
                 "from pathlib import Path; print(m.held_elsewhere(Path(sys.argv[2])))")
        out = subprocess.run([sys.executable, "-c", probe, str(REPO / "bench" / "cpu_budget_table.py"), str(tmp_path)],
                             capture_output=True, encoding="utf-8", cwd=REPO, check=True).stdout.strip()
    assert out == "True"
    assert not table.held_elsewhere(tmp_path)  # released


LEGACY = {  # an entry as collect wrote it before rows were kept per seed (one seed, no curve)
    "dice_percent": {"qamp": {"LIVER": 60.0, "RK": 40.0, "mean": 50.0, "per_seed": [50.0], "seeds": [2026],
                              "per_support": {"0": 50.0, "1": 50.0, "2": 50.0}},
                     "adnet": {"LIVER": 65.0, "RK": 55.0, "mean": 60.0, "per_seed": [60.0], "seeds": [2025],
                               "per_support": {"0": 60.0, "1": 60.0, "2": 60.0}},
                     "alpnet": {"LIVER": 70.0, "RK": 60.0, "mean": 65.0, "per_seed": [65.0], "seeds": [2025],
                                "per_support": {"0": 65.0, "1": 65.0, "2": 65.0}},
                     "copy_support": {"LIVER": 50.0, "RK": 30.0, "mean": 40.0, "per_seed": [40.0], "seeds": [2025],
                                      "per_support": {"0": 40.0, "1": 40.0, "2": 40.0}}},
    "train_s": {"qamp": 3798, "adnet": 2965, "alpnet": 2968},
    "load_average": {"qamp": [], "adnet": [{"load_before": [1.7, 2.5, 2.5], "load_after": [2.0, 2.0, 2.0]}]}}


def test_collect_keeps_the_rows_whose_run_folder_is_gone_and_adds_the_new_seed(table, tmp_path: Path) -> None:
    """A new machine: the results JSON holds QAMP seed 2026 and the baselines; the run folder holds
    only QAMP seed 2025. The table pools both QAMP seeds and keeps every earlier row."""
    root, results = tmp_path / "grid", tmp_path / "results"
    results.mkdir()
    (results / "cpu_budget_table.json").write_text(json.dumps({"cells": {"CHAOST2_setting1": LEGACY}}), encoding="utf-8")
    write_method(root, "CHAOST2_setting1", "qamp", 2025, {1: 0.8, 2: 0.6})
    run = root / "CHAOST2_setting1" / "qamp" / "seed2025" / "cells" / "c" / "train_x"
    write_session(run, "2026-12-02T05:00:00", "COMPLETED", "2026-12-02T06:00:00", {500: 0.3, 6000: 0.7})
    result = table.collect(argparse.Namespace(dir=str(root), results=str(results)))
    cell = result["cells"]["CHAOST2_setting1"]
    qamp = cell["dice_percent"]["qamp"]
    assert qamp["seeds"] == [2025, 2026] and qamp["per_seed"] == [70.0, 50.0] and qamp["mean"] == 60.0
    assert qamp["LIVER"] == 70.0 and qamp["RK"] == 50.0  # (80 + 60) / 2, (60 + 40) / 2
    assert qamp["by_seed"]["2025"]["val_curve"] == [[500, 30.0], [6000, 70.0]]
    assert cell["train_s"]["qamp"] == [3600, 3798]
    assert cell["dice_percent"]["alpnet"]["mean"] == 65.0 and cell["train_s"]["adnet"] == 2965
    assert cell["load_average"]["adnet"] == [{"load_before": [1.7, 2.5, 2.5], "load_after": [2.0, 2.0, 2.0]}]
    markdown = (results / "cpu_budget_table.md").read_text(encoding="utf-8")
    assert "| qamp | 70.0 | 50.0 | 60.0 | [70.0, 50.0] | [3600, 3798] |" in markdown
    assert "not kept" in markdown and "qamp (seed2026)" in markdown
    # collecting again from the JSON it wrote alone (the run folder gone too) gives the same table
    again = table.collect(argparse.Namespace(dir=str(tmp_path / "elsewhere"), results=str(results)))
    assert again["cells"] == json.loads(json.dumps(result["cells"]))


FAKE_PYTHON = '''#!{python}
"""Stands in for python in run(): tools.sweep writes three test runs of its --seeds into --out."""
import csv, json, sys
from pathlib import Path
with open({log!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["-m", "tools.sweep"]:
    out, seed = Path(sys.argv[sys.argv.index("--out") + 1]), sys.argv[sys.argv.index("--seeds") + 1]
    for supp in (0, 1, 2):
        folder = out / "cells" / f"c-supp{{supp}}" / "test_x"
        folder.mkdir(parents=True)
        with open(folder / "scores.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["fold", "supp_idx", "seed", "scan", "class", "class_name", "dice"])
            writer.writerow([0, supp, seed, 3, 1, "LIVER", 0.9])
            writer.writerow([0, supp, seed, 3, 2, "RK", 0.7])
        (folder / "summary.json").write_text(json.dumps({{"supp_idx": supp}}))
'''


def test_run_skips_the_recorded_units_and_runs_the_rest(table, tmp_path: Path, monkeypatch) -> None:
    """run() on an empty folder beside a results JSON holding CHAOST2 Setting 1 (baselines, QAMP seed
    2026, copy-support) and SABS: only Setting 2 (QAMP and the recorded better baseline, ALPNet) and
    QAMP seed 2025 of Setting 1 run, and the table then holds old and new rows."""
    results, log = tmp_path / "results", tmp_path / "calls.log"
    results.mkdir()
    sabs = {"dice_percent": {m: {"LIVER": 50.0, "RK": 50.0, "mean": 50.0, "per_seed": [50.0], "seeds": [2025],
                                 "per_support": {"0": 50.0, "1": 50.0, "2": 50.0}}
                             for m in ("qamp", "alpnet", "copy_support")}}
    setting2 = {"dice_percent": {"copy_support": LEGACY["dice_percent"]["copy_support"]}}
    (results / "cpu_budget_table.json").write_text(json.dumps(
        {"cells": {"CHAOST2_setting1": LEGACY, "CHAOST2_setting2": setting2, "SABS_setting1": sabs}}), encoding="utf-8")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)), encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setattr(table, "POLL_S", 0.05)
    table.run(argparse.Namespace(dir=str(tmp_path / "grid"), results=str(results), data_dir="/data",
                                 python=str(fake), dry_run=False, slots=2))
    outs = sorted(line.split("--out ")[1].split()[0].split("grid/")[1] for line in log.read_text().splitlines())
    assert outs == ["CHAOST2_setting1/qamp/seed2025", "CHAOST2_setting2/alpnet/seed2025",
                    "CHAOST2_setting2/qamp/seed2025"]  # nothing recorded ran again, copy-support included
    cells = json.loads((results / "cpu_budget_table.json").read_text(encoding="utf-8"))["cells"]
    assert cells["CHAOST2_setting1"]["dice_percent"]["qamp"]["per_seed"] == [80.0, 50.0]
    assert cells["CHAOST2_setting1"]["dice_percent"]["adnet"]["mean"] == 60.0
    assert sorted(cells["CHAOST2_setting2"]["dice_percent"]) == ["alpnet", "copy_support", "qamp"]
    assert cells["SABS_setting1"]["dice_percent"]["qamp"]["mean"] == 50.0
    assert (tmp_path / "grid" / "CHAOST2_setting2" / "qamp" / "seed2025" / "load.json").is_file()


def test_lr_collect_keeps_the_recorded_rates(table, tmp_path: Path) -> None:
    """The rates recorded in cpu_budget_lr.json stay (with the unstable evidence) when only QAMP's
    runs are on this machine; the choice is made over all of them."""
    results = tmp_path / "results"
    results.mkdir()
    recorded = {"runs": {"adnet": {"0.005": {"status": "COMPLETED", "val_curve": [[1000, 60.0], [1500, 62.0]],
                                              "score": 61.0, "train_s": 700},
                                    "0.02": {"status": "COMPLETED", "val_curve": [[1000, 62.0], [1500, 63.0]],
                                             "score": 62.5, "train_s": 700}}},
                "full_budget_unstable": [{"model": "adnet", "lr": 0.02, "run": "gone", "peak": [1500, 63.1],
                                          "low": [3000, 14.9], "val_curve": [[1500, 63.1], [3000, 14.9]]}]}
    (results / "cpu_budget_lr.json").write_text(json.dumps(recorded), encoding="utf-8")
    for lr, val in ((0.005, {1000: 0.40, 1500: 0.44}), (0.02, {1000: 0.50, 1500: 0.52})):
        run = tmp_path / "grid" / "lr_select" / "cells" / f"qamp-{lr}" / "train_x"
        write_session(run, "2026-12-02T05:00:00", "COMPLETED", "2026-12-02T05:15:00", val)
        (run / "config.json").write_text(json.dumps({"model": "qamp", "optim": {"lr": lr}}), encoding="utf-8")
    result = table.lr_collect(argparse.Namespace(dir=str(tmp_path / "grid"), results=str(results)))
    assert result["chosen"] == {"adnet": "0.005", "qamp": "0.02"}  # adnet 0.02 stays excluded
    assert result["runs"]["qamp"]["0.02"]["score"] == 51.0 and result["runs"]["adnet"]["0.02"]["score"] == 62.5
    assert [row["model"] for row in result["full_budget_unstable"]] == ["adnet"]


# ---------------------------------------------------------------------------------------------- pre-trained regime
def write_encoder(root: Path, source: str, value: float = 1.0, note: str = "") -> Path:
    """A finished pre-training unit whose snapshot holds one encoder tensor of ``value`` (and ``note``,
    standing for what differs between two files of the same weights)."""
    import torch

    run = root / "pretrained" / "encoders" / source / "cells" / "c" / "train_x"
    write_session(run, "2026-12-04T05:00:00", "COMPLETED", "2026-12-04T06:00:00", {})
    (run / "config.json").write_text(json.dumps({"n_steps": 6000}), encoding="utf-8")
    torch.save({"format": "qamp-snapshot-v1", "note": note,
                "model": {"encoder.reduce1.weight": torch.full((2, 2), value), "threshold": torch.zeros(1)}},
               run / "snapshots" / "final.pth")
    return run / "snapshots" / "final.pth"


def fold_row(mean: float) -> dict:
    return {"LIVER": mean + 10, "RK": mean - 10, "mean": mean, "per_support": {"0": mean, "1": mean, "2": mean},
            "train_s": 1200, "run_dir": "pretrained/panet_sabs/qamp/fold0"}


def test_pretrained_plan_starts_with_the_encoder_and_skips_what_is_recorded(table) -> None:
    jobs = table.pretrained_jobs({}, None)
    names = [job.name for job in jobs]
    assert names[0] == "encoder/panet_sabs" and "encoder/adnet_sabs" not in names  # no bias check before 5 folds
    methods = table.PRETRAINED_METHODS
    assert {f"lr/{m}" for m in methods} <= set(names)
    assert sum(n.split("/")[:2] in (["panet_sabs", m] for m in methods) for n in names) == 5 * len(methods)
    assert {f"panet_sabs/{v}/fold0" for v in table.ABLATIONS} <= set(names)
    assert sum(n.startswith("copy_support/") for n in names) == 5 * 3
    fold = next(job for job in jobs if job.name == "panet_sabs/qamp/fold3")
    assert fold.needs == ("encoder/panet_sabs", "lr/qamp")
    # QAMP's fold 0 and rate recorded (its folder gone): neither is planned again
    recorded = {"lr": {"chosen": {"qamp": "0.02"}},
                "cells": {"CHAOST2_setting1": {"dice_percent": {"qamp": {"by_fold": {"0": fold_row(60.0)}}}}}}
    names = [job.name for job in table.pretrained_jobs(recorded, ["qamp", "alpnet"])]
    assert "lr/qamp" not in names and "panet_sabs/qamp/fold0" not in names and "panet_sabs/qamp/fold1" in names
    assert {"encoder/adnet_sabs", "adnet_sabs/qamp/fold0", "adnet_sabs/alpnet/fold0"} <= set(names)


def test_pretrained_commands_start_from_the_encoder_at_the_chosen_rate(table, tmp_path: Path) -> None:
    args = argparse.Namespace(python="python", data_dir="/data")
    recorded = {"lr": {"chosen": {"alpnet": "0.005"}}}
    encoders = {"panet_sabs": "/grid/enc.pth", "adnet_sabs": "/grid/enc2.pth"}
    jobs = {job.name: job for job in table.pretrained_jobs(recorded, None)}
    command = " ".join(table.pretrained_command(jobs["panet_sabs/alpnet/fold2"], tmp_path, args, recorded, encoders))
    for part in ("--folds 2", "--supports 0,1,2", "model=alpnet", "optim.lr=0.005", "pretrained_weights=snapshot",
                 "pretrained_path=/grid/enc.pth", f"n_steps={table.PRETRAINED_STEPS}", "abd_mri+setting1+cpu_budget"):
        assert part in command, part
    encoder = " ".join(table.pretrained_command(jobs["encoder/panet_sabs"], tmp_path, args, recorded, encoders))
    assert "cpu_budget+pretrain_sabs" in encoder and "--supports  " in encoder + " "
    copy = table.pretrained_command(jobs["copy_support/fold4/supp1"], tmp_path, args, recorded, encoders)
    assert copy[1] == "test.py" and "eval_fold=4" in copy and "supp_idx=1" in copy


def test_pretrained_collect_keeps_recorded_folds_and_computes_the_fold_statistics(table, tmp_path: Path) -> None:
    """A new machine: fold 0 of QAMP recorded (its folder gone), folds 1-4 here; mean and population std."""
    root = tmp_path / "grid"
    first = write_encoder(root, "panet_sabs")
    for fold, value in ((1, 0.7), (2, 0.5), (3, 0.6), (4, 0.6)):
        write_method(root / "pretrained" / "panet_sabs" / "qamp", f"fold{fold}", "x", 2025, {1: value, 2: value})
        folder = root / "pretrained" / "panet_sabs" / "qamp" / f"fold{fold}"
        for child in (folder / "x" / "seed2025").iterdir():
            child.rename(folder / child.name)
    recorded = {"encoder": {"encoder_tensors_sha256": table.encoder_digest(first)},
                "cells": {"CHAOST2_setting1": {"dice_percent": {"qamp": {"by_fold": {"0": fold_row(60.0)}}}}}}
    entry = table.pretrained_collect(root, recorded)
    qamp = entry["cells"]["CHAOST2_setting1"]["dice_percent"]["qamp"]
    assert qamp["folds"] == [0, 1, 2, 3, 4] and qamp["per_fold"] == [60.0, 70.0, 50.0, 60.0, 60.0]
    assert qamp["mean"] == 60.0 and qamp["std_over_folds"] == pytest.approx(6.32, abs=0.01)  # sqrt(200 / 5)
    assert entry["encoder"]["steps"] == 6000 and entry["encoder"]["run_dir"].startswith("pretrained/encoders/")
    assert str(tmp_path) not in json.dumps(entry)  # no absolute path of this machine
    same = write_encoder(tmp_path / "same", "panet_sabs", note="another run folder, same weights")
    assert table.sha256_of(same) != table.sha256_of(first) and table.encoder_digest(same) == table.encoder_digest(first)
    table.pretrained_collect(tmp_path / "same", recorded)  # the same weights trained again: accepted
    write_encoder(tmp_path / "other", "panet_sabs", value=2.0)
    with pytest.raises(SystemExit, match="not the recorded one"):
        table.pretrained_collect(tmp_path / "other", recorded)


def test_committed_run_dirs_are_relative(table, tmp_path: Path) -> None:
    root = tmp_path / "grid"
    assert table.relative_run_dir(str(root / "CHAOST2_setting1" / "qamp" / "seed2025"), root) == \
        "CHAOST2_setting1/qamp/seed2025"
    assert table.relative_run_dir("/home/someone/runs/cpu_budget_table/SABS_setting1/alpnet/seed2025", root) == \
        "SABS_setting1/alpnet/seed2025"
    assert table.relative_run_dir("CHAOST2_setting1/adnet/seed2025", root) == "CHAOST2_setting1/adnet/seed2025"


def test_a_collapsed_fold_is_a_row_with_its_status(table, tmp_path: Path) -> None:
    root = tmp_path / "grid"
    write_encoder(root, "panet_sabs")
    fold = root / "pretrained" / "panet_sabs" / "adnet" / "fold1"
    write_session(fold / "cells" / "c" / "train_x", "2026-12-04T05:00:00", "FAILED", "2026-12-04T05:30:00",
                  {500: 0.0, 1000: 0.0})
    info = json.loads((fold / "cells" / "c" / "train_x" / "run.json").read_text(encoding="utf-8"))
    info["fail_trace"] = ["RuntimeError: training collapsed: every validation query predicted background"]
    (fold / "cells" / "c" / "train_x" / "run.json").write_text(json.dumps(info), encoding="utf-8")
    recorded = {"cells": {"CHAOST2_setting1": {"dice_percent": {"adnet": {"by_fold": {"0": fold_row(60.0)}}}}}}
    entry = table.pretrained_collect(root, recorded)
    adnet = entry["cells"]["CHAOST2_setting1"]["dice_percent"]["adnet"]
    assert adnet["per_fold"] == [60.0, 0.0] and adnet["collapsed_folds"] == [1] and adnet["LIVER"] == 35.0
    assert adnet["by_fold"]["1"]["status"] == "collapsed" and adnet["by_fold"]["1"]["val_curve"] == [[500, 0.0], [1000, 0.0]]
    job = table.Job("panet_sabs/adnet/fold1", Path("pretrained/panet_sabs/adnet/fold1"))
    assert table.job_finished(job, root, entry)  # stopped: not started again, not waited for
    assert "stopped as collapsed on fold [1]" in "\n".join(table.pretrained_lines(entry))


def test_the_ablation_rows_train_qamp_with_one_part_off_at_qamps_rate(table, tmp_path: Path) -> None:
    recorded = {"lr": {"chosen": {"qamp": "0.02"}}}
    jobs = {job.name: job for job in table.pretrained_jobs(recorded, None)}
    args = argparse.Namespace(python="python", data_dir="/data")
    encoders = {"panet_sabs": "/grid/enc.pth", "adnet_sabs": None}
    for variant, keys in table.ABLATIONS.items():
        job = jobs[f"panet_sabs/{variant}/fold0"]
        assert job.needs == ("encoder/panet_sabs", "lr/qamp")
        command = " ".join(table.pretrained_command(job, tmp_path, args, recorded, encoders))
        assert "model=qamp" in command and "optim.lr=0.02" in command and "--folds 0 " in command
        assert all(f"--train {key}" in command for key in keys)
    assert "use_proto_loss=False" in table.ABLATIONS["qamp-no_reverse_pass"]  # refused alone (models/qamp.py)
    if "qnet" in table.PRETRAINED_METHODS:
        unrefined = jobs["qnet-no_refinement/fold0/supp2"]
        assert unrefined.needs == ("panet_sabs/qnet/fold0",)
        command = table.pretrained_command(unrefined, tmp_path, args, recorded, encoders)
        assert command[1] == "test.py" and "qnet_refine_iters=0" in command and "supp_idx=2" in command


def test_the_budget_check_runs_the_from_scratch_configuration_from_the_encoder(table, tmp_path: Path) -> None:
    jobs = table.pretrained_jobs({}, None)
    assert [job.name for job in jobs[:3]] == ["encoder/panet_sabs", "budget/qamp", "budget/alpnet"]
    args = argparse.Namespace(python="python", data_dir="/data")
    command = " ".join(table.pretrained_command(jobs[2], tmp_path, args, {}, {"panet_sabs": "/e.pth"}))
    assert "abd_mri+setting1+cpu_budget+cpu_budget_alpnet" in command and "pretrained_path=/e.pth" in command
    assert "n_steps" not in command  # cpu_budget's 6000 steps and schedule
    recorded = {"budget_check": {"qamp": fold_row(70.0)}}
    assert "budget/qamp" not in [job.name for job in table.pretrained_jobs(recorded, None)]


def test_a_rate_run_that_just_started_is_collected_later(table, tmp_path: Path) -> None:
    run = tmp_path / "pretrained" / "lr" / "qamp" / "cells" / "c" / "train_x"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"start_time": "2026-12-04T22:00:00", "status": "RUNNING"}), encoding="utf-8")
    (run / "config.json").write_text(json.dumps({"model": "qamp", "optim": {"lr": 0.001}}), encoding="utf-8")
    assert table.pretrained_lr(tmp_path, {})["runs"] == {}  # no metrics.json yet: not a row, not a crash


def test_a_unit_of_an_earlier_runner_keeps_its_core(table, tmp_path: Path) -> None:
    folder = tmp_path / "unit"
    assert table.held_core(folder) is None
    folder.mkdir()
    (folder / "running.json").write_text(json.dumps({"core": 1}), encoding="utf-8")
    assert table.held_core(folder) == 1


def test_the_gate_stops_the_grid_at_the_budget_check_when_the_encoder_hurts(table) -> None:
    scratch = {"CHAOST2_setting1": {"dice_percent": {
        "qamp": {"by_seed": {"2025": {"mean": 60.52}}}, "alpnet": {"by_seed": {"2025": {"mean": 65.95}}}}}}
    worse = {"budget_check": {"qamp": {"mean": 55.25}, "alpnet": {"mean": 64.0}}}
    reason = table.encoder_gate(worse, scratch)
    assert "qamp 55.25 against 60.52" in reason and "alpnet 64.0 against 65.95" in reason and "--past-gate" in reason
    closed = table.pretrained_jobs(worse, None, closed=True)
    assert closed == []  # both budget units recorded: nothing else is planned
    partial = {"budget_check": {"qamp": {"mean": 55.25}}}
    assert table.encoder_gate(partial, scratch) is None  # not decided until every budget unit is in
    assert [j.name for j in table.pretrained_jobs(partial, None, closed=True)] == ["encoder/panet_sabs", "budget/alpnet"]
    one_helps = {"budget_check": {"qamp": {"mean": 61.0}, "alpnet": {"mean": 64.0}}}
    assert table.encoder_gate(one_helps, scratch) is None  # one method gains: the grid runs
    assert table.encoder_gate(worse, {}) is None  # no from-scratch row to compare with: the grid runs
