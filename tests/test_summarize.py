"""tools.summarize: aggregation of hand-made per-scan CSVs against hand-computed numbers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tools import summarize

COLUMNS = ["fold", "supp_idx", "seed", "scan", "class", "dice", "iou", "tp", "fp", "fn", "slices"]


def write_run(folder: Path, model: str, rows: list[tuple[int, int, int, int, int, float]]) -> Path:
    """A fake test-run folder: Sacred-like config.json plus a per-scan CSV."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": model, "dataset": "no_such_dataset"}), encoding="utf-8")
    with open(folder / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for fold, supp, seed, scan, cls, dice in rows:
            writer.writerow([fold, supp, seed, scan, cls, dice, dice / (2 - dice), 10, 1, 1, 3])
    return folder


@pytest.fixture()
def two_folds(tmp_path: Path) -> list[Path]:
    # fold 0: class 1 scans (0.8, 0.6) -> 0.7; class 2 scans (0.4, 0.2) -> 0.3; run mean 0.5
    # fold 1: class 1 scans (0.9, 0.7, 0.8) -> 0.8; class 2 (0.5, 0.6, 0.7) -> 0.6; run mean 0.7
    run0 = write_run(tmp_path / "test_fold0", "qamp", [
        (0, 2, 7, 1, 1, 0.8), (0, 2, 7, 2, 1, 0.6), (0, 2, 7, 1, 2, 0.4), (0, 2, 7, 2, 2, 0.2)])
    run1 = write_run(tmp_path / "test_fold1", "qamp", [
        (1, 2, 7, 5, 1, 0.9), (1, 2, 7, 6, 1, 0.7), (1, 2, 7, 7, 1, 0.8),
        (1, 2, 7, 5, 2, 0.5), (1, 2, 7, 6, 2, 0.6), (1, 2, 7, 7, 2, 0.7)])
    return [run0, run1]


def test_mean_and_std_over_runs(two_folds: list[Path]) -> None:
    methods = summarize.load_methods([str(p) for p in two_folds])
    assert list(methods) == ["qamp"]
    entries, used = summarize.summarize_method(methods["qamp"], "auto")
    assert used == "runs"
    assert entries[1].mean == pytest.approx(0.75)
    assert entries[1].std == pytest.approx(0.05)  # population std (ddof 0) of (0.7, 0.8)
    assert entries[2].mean == pytest.approx(0.45)
    assert entries[2].std == pytest.approx(0.15)  # (0.3, 0.6)
    assert entries["mean"].mean == pytest.approx(0.6)  # runs (0.5, 0.7)
    assert entries["mean"].std == pytest.approx(0.1)
    assert (entries[1].n_runs, entries[1].n_scans) == (2, 5)


def test_std_over_scans(two_folds: list[Path]) -> None:
    methods = summarize.load_methods([str(p) for p in two_folds])
    entries, used = summarize.summarize_method(methods["qamp"], "scans")
    assert used == "scans"
    values = [0.8, 0.6, 0.9, 0.7, 0.8]
    m = sum(values) / 5
    assert entries[1].std == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in values) / 5))
    assert entries[1].mean == pytest.approx(0.75)  # the mean stays the mean over runs


def test_single_run_auto_uses_scans(two_folds: list[Path]) -> None:
    methods = summarize.load_methods([str(two_folds[0])])
    entries, used = summarize.summarize_method(methods["qamp"], "auto")
    assert used == "scans"
    assert entries[1].std == pytest.approx(0.1)  # (0.8, 0.6)
    assert entries["mean"].mean == pytest.approx(0.5)
    assert entries["mean"].std == pytest.approx(0.1)  # per-scan class means (0.6, 0.4)


def test_methods_named_and_outputs_written(two_folds: list[Path], tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path / "copy", "copy_support", [(0, 2, 7, 1, 1, 0.5), (0, 2, 7, 1, 2, 0.1)])
    out = tmp_path / "summary_out"
    rc = summarize.main([str(two_folds[0]), str(two_folds[1]), f"baseline={base}", "--out", str(out)])
    assert rc == 0
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| qamp | 75.00 ± 5.00 | 45.00 ± 15.00 | 60.00 ± 10.00 |" in md
    assert "| baseline | 50.00 | 10.00 | 30.00 |" in md
    assert md.strip() in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "summary.csv", encoding="utf-8")))
    qamp_mean = [r for r in rows if r["method"] == "qamp" and r["class"] == "mean"][0]
    assert float(qamp_mean["mean"]) == pytest.approx(0.6)
    per_run = list(csv.DictReader(open(out / "per_run.csv", encoding="utf-8")))
    assert len(per_run) == 2 * 2 + 2
    # outputs are never overwritten silently
    assert summarize.main([str(two_folds[0]), "--out", str(out)]) == 2
    assert summarize.main([str(two_folds[0]), "--out", str(out), "--overwrite"]) == 0


def test_duplicate_run_rejected(two_folds: list[Path]) -> None:
    with pytest.raises(ValueError, match="given twice"):
        summarize.load_methods([str(two_folds[0]), str(two_folds[0])])


def test_missing_or_foreign_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summarize.find_csvs(tmp_path / "nope")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="no per-scan CSV"):
        summarize.find_csvs(tmp_path)


def test_nan_rows_left_out_and_counted(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", "qamp", [(0, 2, 7, 1, 1, 0.8), (0, 2, 7, 2, 1, float("nan")),
                                               (0, 2, 7, 3, 1, 0.4)])
    methods = summarize.load_methods([str(run)])
    entries, _ = summarize.summarize_method(methods["qamp"])
    assert entries[1].mean == pytest.approx(0.6) and entries[1].n_scans == 2
    markdown, _, _ = summarize.render(methods)
    assert "1 undefined (nan) Dice row(s) left out" in markdown
