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
