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
    assert cells[:3] == [("CHAOST2_setting1", "adnet", 2025), ("CHAOST2_setting1", "alpnet", 2025),
                         ("CHAOST2_setting1", "qamp", 2025)]
    assert [c for c in cells if c[1] == "qamp" and c[2] == 2026] == [("CHAOST2_setting1", "qamp", 2026)]
    assert {c[0] for c in cells if c[1] == table.BEST} == {"CHAOST2_setting2", "SABS_setting1"}
    assert all(c[1] == table.BEST for c in cells[-2:])


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
