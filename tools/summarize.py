"""Aggregate test runs into the paper table: per-organ Dice, mean +- std, as CSV and Markdown.

Usage::

    python -m tools.summarize RUN [RUN ...] [--out DIR] [--std auto|runs|scans] [--overwrite]

Each ``RUN`` is ``[NAME=]PATH`` where PATH is a test-run folder written by ``test.py``, a folder
holding several of them, or a per-scan CSV. Every CSV found under PATH whose header holds the
per-scan columns (``fold, supp_idx, seed, scan, class, dice``) is read. Rows are grouped into one
table row per method and dataset: NAME when given, else the ``model`` key of the run's Sacred
``config.json``, else the folder name; the dataset is the config's ``dataset`` key. When the runs
given hold more than one dataset, the row is named ``<method> [<dataset>]`` (class ids of two
datasets are never pooled). Runs of one method on one dataset (several folds, support indices,
seeds) are pooled. Run folders (holding a Sacred ``config.json``) without a per-scan CSV, e.g.
failed, interrupted or training runs, are listed as skipped with the reason (printed and in
``summary.md``).

Formula (the convention of SSL-ALPNet / ADNet / Q-Net / QAMP, which report per organ the mean over
the cross-validation folds of each fold's Dice):

* a *run* is one ``(fold, supp_idx, seed)``; its Dice for class ``c`` is the mean over its query
  scans of the per-scan 3D Dice: ``D[r, c] = mean_s dice[r, s, c]``;
* table entry ``mean = mean_r D[r, c]`` (every run weighs the same, whatever its number of queries);
  the ``Mean`` column is the same over ``M[r] = mean_c D[r, c]``;
* rows whose Dice is ``nan`` (prediction and ground truth both empty, see utils.metrics) are left
  out and counted in the footnote;
* ``std`` is the population standard deviation (ddof = 0, ``numpy.std``'s default, the definition
  ``test.py``'s ``summary.json`` uses too) over runs of ``D[r, c]`` (``--std runs``), or over all
  per-scan Dice values of the class (``--std scans``); not shown for fewer than two values.
  ``auto`` (default) uses runs when a method has at least two runs and scans otherwise; the
  Markdown footnote says which was used.

Values are printed in percent. Outputs (refused if they exist, unless ``--overwrite``):
``summary.csv`` (one row per method and class, plus ``mean``), ``per_run.csv`` (``D[r, c]``) and
``summary.md`` (the table, also printed).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from utils.io import write_text

REQUIRED_COLUMNS = ("fold", "supp_idx", "seed", "scan", "class", "dice")
OUTPUT_NAMES = ("summary.csv", "per_run.csv", "summary.md")
STD_MODES = ("auto", "runs", "scans")

RunKey = tuple[int, int, int]  # (fold, supp_idx, seed); a Method holds one dataset
STD_DDOF = 0  # population std everywhere (test.py's summary.json uses ddof 0 as well)


@dataclass
class Method:
    """Per-scan Dice rows of one method, pooled over its runs."""

    name: str
    dataset: str = ""
    # (fold, supp_idx, seed) -> class id -> scan id -> dice
    dice: dict[RunKey, dict[int, dict[int, float]]] = field(default_factory=lambda: defaultdict(dict))
    class_names: dict[int, str] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    n_undefined: int = 0  # rows with dice 'nan' (empty prediction and ground truth), left out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """Population standard deviation (ddof = ``STD_DDOF`` = 0); NaN for fewer than two values."""
    if len(values) < 2:
        return math.nan
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - STD_DDOF))


def find_runs(path: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Per-scan CSVs at ``path`` and the run folders below it that have none, with the reason.

    Returns:
        ``(csvs, skipped)``: the file itself or every CSV below the folder with the per-scan
        columns; ``skipped`` = ``(run folder, why)`` for each folder holding a Sacred
        ``config.json`` but no per-scan CSV (failed, interrupted, still running, a training run).

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no per-scan CSV.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass test-run folders (written by test.py) "
                                f"or their per-scan CSV files")
    candidates = [path] if path.is_file() else sorted(path.rglob("*.csv"))
    found = [p for p in candidates if p.name not in OUTPUT_NAMES and _has_columns(p)]
    skipped: list[tuple[Path, str]] = []
    if path.is_dir():
        run_dirs = sorted({c.parent for c in path.rglob("config.json")})
        for run_dir in run_dirs:
            if not any(run_dir == f.parent or run_dir in f.parents for f in found):
                skipped.append((run_dir, _why_no_scores(run_dir)))
    if not found:
        why = "".join(f"; {d}: {reason}" for d, reason in skipped)
        raise FileNotFoundError(
            f"no per-scan CSV (columns {', '.join(REQUIRED_COLUMNS)}) found at {path}{why}: pass the "
            f"folder of a finished test run (test.py writes one per run)")
    return found, skipped


def _why_no_scores(run_dir: Path) -> str:
    """Why a run folder has no per-scan CSV, from Sacred's ``run.json``."""
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no per-scan CSV and no readable run.json"
    command, status = run.get("command", "?"), run.get("status", "?")
    if command == "train":
        return f"a training run (status {status}), not a test run"
    trace = run.get("fail_trace") or []
    last = str(trace[-1]).strip().splitlines()[-1] if trace and str(trace[-1]).strip() else ""
    return f"{command} run with status {status}, no per-scan CSV" + (f" ({last})" if last else "")


def find_csvs(path: Path) -> list[Path]:
    """Per-scan CSVs at ``path``: the file itself, or every CSV below a folder with the columns.

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no per-scan CSV.
    """
    return find_runs(path)[0]


def _has_columns(path: Path) -> bool:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return all(c in header for c in REQUIRED_COLUMNS)


def _run_config(csv_path: Path, stop: Path) -> dict | None:
    """The Sacred ``config.json`` in the CSV's folder or a parent up to ``stop``."""
    folder = csv_path.parent
    stop = stop if stop.is_dir() else stop.parent
    while True:
        config = folder / "config.json"
        if config.is_file():
            with open(config, encoding="utf-8") as f:
                return json.load(f)
        if folder == stop or folder.parent == folder:
            return None
        folder = folder.parent


def load_methods(runs: Iterable[str], skipped: list[tuple[Path, str]] | None = None) -> dict[str, Method]:
    """Read every RUN spec (``[NAME=]PATH``) into methods keyed by name, in first-seen order.

    A method is one name on one dataset; with runs of several datasets the key is
    ``<name> [<dataset>]``. Run folders without scores are appended to ``skipped`` (when given).

    Raises:
        ValueError: a row repeats (same method, dataset, fold, supp_idx, seed, scan and class) or
            a value cannot be parsed.
    """
    found: list[tuple[str, Path, dict | None]] = []
    for spec in runs:
        name, sep, raw = spec.partition("=")
        if not sep:
            name, raw = "", spec
        root = Path(raw)
        csvs, skipped_here = find_runs(root)
        if skipped is not None:
            skipped.extend(skipped_here)
        for csv_path in csvs:
            config = _run_config(csv_path, root)
            found.append((name or (config or {}).get("model") or csv_path.parent.name, csv_path, config))
    datasets = {str((config or {}).get("dataset", "")) for _, _, config in found}
    methods: dict[str, Method] = {}
    for name, csv_path, config in found:
        dataset = str((config or {}).get("dataset", ""))
        key = f"{name} [{dataset or 'unknown dataset'}]" if len(datasets) > 1 else name
        method = methods.setdefault(key, Method(key, dataset))
        method.sources.append(csv_path)
        _read_rows(csv_path, method)
    return methods


def _read_rows(csv_path: Path, method: Method) -> None:
    with open(csv_path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                key = (int(row["fold"]), int(row["supp_idx"]), int(row["seed"]))
                class_id, scan, dice = int(row["class"]), int(row["scan"]), float(row["dice"])
            except ValueError as err:
                raise ValueError(f"{csv_path}:{line}: cannot parse the row ({err}); expected integer "
                                 f"fold/supp_idx/seed/scan/class and a float dice") from None
            if math.isnan(dice):  # both masks empty (utils.metrics): no score, as in test.py's summary
                method.n_undefined += 1
                continue
            per_scan = method.dice[key].setdefault(class_id, {})
            if scan in per_scan:
                raise ValueError(
                    f"{csv_path}:{line}: method {method.name!r}"
                    + (f" on dataset {method.dataset}" if method.dataset else "")
                    + f" already has fold {key[0]}, supp_idx "
                    f"{key[1]}, seed {key[2]}, scan {scan}, class {class_id} (sources: "
                    f"{', '.join(map(str, method.sources))}): the same run was given twice; pass each "
                    f"run once, or give different methods different NAME= prefixes")
            per_scan[scan] = dice
            if row.get("class_name"):
                method.class_names.setdefault(class_id, row["class_name"])


@dataclass(frozen=True)
class Entry:
    mean: float
    std: float
    n_runs: int
    n_scans: int


def summarize_method(method: Method, std_mode: str = "auto") -> tuple[dict[int | str, Entry], str]:
    """Per-class (and ``'mean'``) entries of one method, following the module docstring formula.

    Returns:
        ``(entries, used)``: class id or ``'mean'`` -> Entry (Dice in [0, 1]); ``used`` is 'runs'
        or 'scans', the population of the std.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std mode {std_mode!r} is unknown: expected one of {list(STD_MODES)}")
    used = std_mode if std_mode != "auto" else ("runs" if len(method.dice) >= 2 else "scans")
    classes = sorted({c for per_class in method.dice.values() for c in per_class})
    entries: dict[int | str, Entry] = {}
    for c in classes:
        run_means = [_mean(list(pc[c].values())) for pc in method.dice.values() if c in pc]
        scans = [d for pc in method.dice.values() if c in pc for d in pc[c].values()]
        std = _std(run_means) if used == "runs" else _std(scans)
        entries[c] = Entry(_mean(run_means), std, len(run_means), len(scans))
    # Mean over classes: per run, then over runs; per scan (scans that have every class), then over scans.
    run_class_means = [_mean([_mean(list(v.values())) for v in pc.values()]) for pc in method.dice.values()]
    scan_class_means = []
    for pc in method.dice.values():
        common = set.intersection(*(set(v) for v in pc.values()))
        scan_class_means += [_mean([pc[c][s] for c in pc]) for s in sorted(common)]
    std = _std(run_class_means) if used == "runs" else _std(scan_class_means)
    entries["mean"] = Entry(_mean(run_class_means), std, len(run_class_means), len(scan_class_means))
    return entries, used


def _fmt(entry: Entry | None) -> str:
    if entry is None:
        return "-"
    if math.isnan(entry.std):
        return f"{100 * entry.mean:.2f}"
    return f"{100 * entry.mean:.2f} ± {100 * entry.std:.2f}"


def render(methods: Mapping[str, Method], std_mode: str = "auto",
           skipped: Sequence[tuple[Path, str]] = ()) -> tuple[str, list[dict], list[dict]]:
    """Build the Markdown table, the summary rows and the per-run rows.

    Columns are class names (class ids of different datasets are matched by name, never by id);
    ``skipped`` run folders are listed under the table with the reason.

    Returns:
        ``(markdown, summary_rows, per_run_rows)``.
    """
    results = {name: summarize_method(m, std_mode) for name, m in methods.items()}
    by_dataset: dict[str, dict[int, str]] = defaultdict(dict)  # dataset -> class id -> name
    for m in methods.values():
        for c, n in m.class_names.items():
            by_dataset[m.dataset].setdefault(c, n)

    def label(m: Method, c: int) -> str:
        return by_dataset[m.dataset].get(c, f"class {c}")

    columns: list[str] = []
    for name, (entries, _) in results.items():
        for c in sorted(k for k in entries if k != "mean"):
            if label(methods[name], c) not in columns:
                columns.append(label(methods[name], c))
    header = ["Method"] + columns + ["Mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    notes, summary_rows, per_run_rows = [], [], []
    for name, (entries, used) in results.items():
        method = methods[name]
        names = {c: label(method, c) for c in entries if c != "mean"}
        by_label = {names[c]: e for c, e in entries.items() if c != "mean"}
        class_ids = sorted(names)
        cells = [_fmt(by_label.get(col)) for col in columns] + [_fmt(entries["mean"])]
        lines.append("| " + " | ".join([name] + cells) + " |")
        mean_entry = entries["mean"]
        n_scans = sum(len(set().union(*pc.values())) for pc in methods[name].dice.values())
        notes.append(f"{name}: {mean_entry.n_runs} run(s) (fold, supp_idx, seed), {n_scans} query "
                     f"scan evaluations; std over {used}"
                     + (f"; {methods[name].n_undefined} undefined (nan) Dice row(s) left out"
                        if methods[name].n_undefined else ""))
        for c in class_ids + ["mean"]:
            e = entries.get(c)
            if e is None:
                continue
            summary_rows.append({"method": name, "dataset": method.dataset, "class": c,
                                 "class_name": names.get(c, "mean") if c != "mean" else "mean",
                                 "mean": e.mean, "std": e.std, "std_over": used, "std_ddof": STD_DDOF,
                                 "n_runs": e.n_runs, "n_scans": e.n_scans})
        for (fold, supp, seed), pc in sorted(methods[name].dice.items()):
            for c, per_scan in sorted(pc.items()):
                per_run_rows.append({"method": name, "dataset": method.dataset, "fold": fold,
                                     "supp_idx": supp, "seed": seed,
                                     "class": c, "class_name": names.get(c, ""),
                                     "dice": _mean(list(per_scan.values())), "n_scans": len(per_scan)})
    return _markdown(lines, notes, skipped), summary_rows, per_run_rows


def _markdown(table: Sequence[str], notes: Sequence[str], skipped: Sequence[tuple[Path, str]]) -> str:
    """The Markdown page: the table lines, the rule of the numbers, one note per method, skipped runs."""
    return "\n".join(
        ["Dice (%) per class, mean ± std.", ""] + list(table) + [""]
        + ["Mean = per run the mean over classes of the per-class Dice (itself the mean over query "
           "scans of the 3D Dice), then the mean over runs; std = population std (ddof 0) over runs or "
           "over per-scan values, as noted:"]
        + [f"- {n}" for n in notes]
        + (["", f"Skipped {len(skipped)} run folder(s) without per-scan scores:"]
           + [f"- {d}: {why}" for d, why in skipped] if skipped else [])) + "\n"


def _csv_text(rows: list[dict]) -> str:
    import io
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def default_out_dir(runs: Sequence[str]) -> Path:
    """``<common parent of the run paths>/summary``."""
    paths = [Path(r.partition("=")[2] if "=" in r else r).resolve() for r in runs]
    parents = [p.parent if p.is_file() or len(paths) > 1 else p for p in paths]
    return Path(os.path.commonpath([str(p) for p in parents])) / "summary"


def write_outputs(out_dir: Path, markdown: str, summary_rows: list[dict], per_run_rows: list[dict],
                  overwrite: bool = False) -> list[Path]:
    """Write summary.csv, per_run.csv and summary.md atomically into ``out_dir``.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in OUTPUT_NAMES]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists: pass --overwrite to replace it, or "
                              f"choose another --out")
    write_text(paths[0], _csv_text(summary_rows))
    write_text(paths[1], _csv_text(per_run_rows))
    write_text(paths[2], markdown)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (python -m pydoc tools.summarize) "
                                            "for the aggregation formula.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="[NAME=]PATH: a test-run folder, a folder of them, or a per-scan CSV")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <common parent of the runs>/summary)")
    parser.add_argument("--std", choices=STD_MODES, default="auto",
                        help="population of the std: runs, scans, or auto (runs when >= 2 runs)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing summary files")
    args = parser.parse_args(argv)
    try:
        skipped: list[tuple[Path, str]] = []
        methods = load_methods(args.runs, skipped)
        markdown, summary_rows, per_run_rows = render(methods, args.std, skipped)
        out_dir = args.out if args.out is not None else default_out_dir(args.runs)
        paths = write_outputs(out_dir, markdown, summary_rows, per_run_rows, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
