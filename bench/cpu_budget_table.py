"""The CPU-budget table: QAMP, the authors' ADNet and SSL-ALPNet heads, and copy-support under one test
bed (same encoder, data, episodes, seed and protocol), on CHAOST2 Setting 1 and 2 and SABS Setting 1.

    export QAMP_DATA_ROOT=../shared/data        # the root holding CHAOST2/ and SABS/
    python bench/cpu_budget_table.py lr         # the baselines' learning rates: run / resume, then choose
    python bench/cpu_budget_table.py run        # run or resume the grid, then collect (hours: see below)
    python bench/cpu_budget_table.py collect    # tables (and the lr table) from what has finished so far
    python bench/cpu_budget_table.py run --dry-run

Cells (fold 0, self-supervised, ``cpu_budget``: 64 x 64 slices, dilated ResNet-50 from scratch,
6000 steps; every method with its own learning rate, ``cpu_budget_<model>``, chosen on the
validation curve: docs/CPU_BUDGET.md):

    CHAOST2_setting1   qamp (seeds 2025, 2026), adnet, alpnet (seed 2025), copy_support
    CHAOST2_setting2   qamp, the better baseline of CHAOST2_setting1, copy_support
    SABS_setting1      qamp, the better baseline, copy_support (supervoxels generated on load)

Each (cell, method, seed) is one resumable ``tools.sweep`` grid in ``<dir>/<cell>/<method>/seed<s>``
(train, then test on supports 0, 1, 2; Dice on the native grid). ``<dir>`` (``--dir``, default
``../runs/cpu_budget_table``) lies outside the clone, so a session that stops mid-grid resumes the
next time: finished cells are skipped, a killed training continues from its newest snapshot.
A unit whose seed is already in ``bench/results/cpu_budget_table.json`` is not run again even where
its run folder is gone (a new machine): ``collect`` merges the run folders it finds with the rows of
that JSON, which keeps every (cell, method, seed) as a row with its Dice, training seconds, load and
validation curve (``by_seed``). The learning-rate grid does the same with ``cpu_budget_lr.json``.
``--slots`` units run at once (default: one per core), each pinned to its own core with one torch
thread (``taskset``), so two trainings do not slow each other; the load average before and after
each unit is kept in its ``load.json``. Keep the machine otherwise idle for the training times.

``lr`` first chooses each trained method's learning rate the same way (QAMP's too): CHAOST2 fold 0,
Setting 1, ``cpu_budget`` with ``model=<method>``, ``LR_GRID``'s rates for ``LR_STEPS`` steps each (the same
episodes and seed; the rate stays constant, as the schedule's step comes at 3000), validation every
500 steps; the chosen rate has the best mean of the last two validations (a collapsed run, stopped
by ``collapse_patience``, scores 0). A rate whose full-budget training fell apart is excluded: a
table unit moved to ``<dir>/unstable/`` (its training folder as it stopped) whose validation fell
below half its peak after the peak (ADNet at 0.02: 63.1 at step 1500, 14.9 at 3000, as its
threshold T neared -20, the floor of its anomaly score). Results:
``bench/results/cpu_budget_lr.{json,md,png}``; the chosen rates go into config.py by hand
(``cpu_budget`` for QAMP, ``cpu_budget_<model>`` for the baselines).

``collect`` writes ``bench/results/cpu_budget_table.json`` (``cells.<cell>.dice_percent.<method>``
with ``mean``, ``per_seed`` and one entry per organ; ``train_s.<method>``; the loads), the markdown
table ``cpu_budget_table.md`` and one validation-curve PNG per cell, and prints one JSON line.
A trained method whose mean Dice is below copy-support's is flagged in the table (a defect to
diagnose, not a result).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import emit, machine  # noqa: E402
from tools.summarize import Method, load_methods, summarize_method  # noqa: E402
from utils.io import write_text  # noqa: E402

BASELINES = ("adnet", "alpnet")
LR_MODELS = ("qamp", *BASELINES)  # every trained method gets its own rate, chosen the same way
LR_GRID = (0.001, 0.005, 0.02, 0.05)  # 0.05 added when ADNet peaked at the grid edge 0.02
LR_STEPS = 1500
# cell -> (dataset named config, setting, extra training keys)
CELLS = {"CHAOST2_setting1": ("abd_mri", 1, ()),
         "CHAOST2_setting2": ("abd_mri", 2, ()),
         "SABS_setting1": ("abd_ct", 1, ("supervoxel_source=generate",))}
SUPPORTS = (0, 1, 2)
POLL_S = 10  # seconds between two looks at the running units
BEST = "best"  # stands for the better baseline of CHAOST2_setting1
# cell -> method -> seeds
GRID = {"CHAOST2_setting1": {"qamp": (2025, 2026), "adnet": (2025,), "alpnet": (2025,)},
        "CHAOST2_setting2": {"qamp": (2025,), BEST: (2025,)},
        "SABS_setting1": {"qamp": (2025,), BEST: (2025,)}}


def named_configs(method: str) -> str:
    """The named configs of a method: ``cpu_budget`` plus the method's own learning rate."""
    return "cpu_budget" if method == "qamp" else f"cpu_budget+cpu_budget_{method}"


@dataclass(frozen=True)
class Unit:
    cell: str
    method: str  # a model name, or BEST until it is resolved
    seed: int

    def folder(self, root: Path) -> Path:
        return root / self.cell / self.method / f"seed{self.seed}"


def units() -> list[Unit]:
    """Every (cell, method, seed), in the order they start: the CHAOST2 Setting 1 baselines first
    (the other cells' baseline is chosen on them), then SABS (CT: whether this project learns there
    at all), CHAOST2 Setting 2, and QAMP's seeds of Setting 1 last (one is in hand when they start);
    within a cell QAMP before the better baseline."""
    out = [Unit(cell, method, seed) for cell, methods in GRID.items() for method, seeds in methods.items()
           for seed in seeds]
    cell_order = ("SABS_setting1", "CHAOST2_setting2", "CHAOST2_setting1")
    return sorted(out, key=lambda u: (u.method not in BASELINES, cell_order.index(u.cell), u.method == BEST,
                                      u.seed))


def sweep_command(unit: Unit, root: Path, data_dir: str, python: str) -> list[str]:
    dataset, setting, extra = CELLS[unit.cell]
    command = [python, "-m", "tools.sweep", "--out", str(unit.folder(root)),
               "--configs", f"{dataset}+setting{setting}+{named_configs(unit.method)}",
               "--settings", str(setting), "--folds", "0", "--supports", ",".join(map(str, SUPPORTS)),
               "--seeds", str(unit.seed), "--jobs", "1", "--train", "num_workers=0",
               "--train", f"data_dir={data_dir}", "--test", f"data_dir={data_dir}", "--test", "n_overlay_slices=1"]
    for key in extra:
        command += ["--train", key]
    return command


def finished(folder: Path) -> bool:
    """Every test cell of the unit's sweep wrote its summary."""
    summaries = list(folder.glob("cells/*/test_*/summary.json"))
    return len(summaries) >= len(SUPPORTS)


def earlier_table(results: Path) -> dict[str, dict]:
    """cell -> entry of the results JSON an earlier ``collect`` wrote (``<results>/cpu_budget_table.json``;
    empty if none): the units scored there are not run again, even where their run folder is not on
    this machine (a new machine, or ``--dir`` elsewhere), and ``collect`` merges with it."""
    path = results / "cpu_budget_table.json"
    return json.loads(path.read_text(encoding="utf-8")).get("cells", {}) if path.is_file() else {}


def is_recorded(unit: Unit, earlier: dict[str, dict]) -> bool:
    entry = earlier.get(unit.cell, {}).get("dice_percent", {}).get(unit.method, {})
    return unit.seed in entry.get("seeds", [])


def best_baseline(root: Path, earlier: dict[str, dict] | None = None) -> str | None:
    """The baseline with the higher mean Dice on CHAOST2 Setting 1 (None until both finished),
    from its run folder, else from ``earlier`` (:func:`earlier_table`)."""
    means = {}
    for method in BASELINES:
        folder = root / "CHAOST2_setting1" / method
        if any(folder.glob("seed*")) and all(finished(f) for f in folder.glob("seed*")):
            means[method] = method_entry(seed_rows(folder))["mean"]
        elif method in (earlier or {}).get("CHAOST2_setting1", {}).get("dice_percent", {}):
            means[method] = earlier["CHAOST2_setting1"]["dice_percent"][method]["mean"]
        else:
            return None
    return max(means, key=means.get)


def copy_support(root: Path, data_dir: str, python: str, dry_run: bool, earlier: dict) -> None:
    """The copy-support baseline of every cell and support (no training; a minute each), skipping
    the supports already scored and the cells whose copy-support is in ``earlier``."""
    for cell, (dataset, setting, _) in CELLS.items():
        if "copy_support" in earlier.get(cell, {}).get("dice_percent", {}):
            continue
        folder = root / cell / "copy_support"
        done = {json.loads(p.read_text(encoding="utf-8"))["supp_idx"] for p in folder.glob("test_*/summary.json")}
        for supp in [s for s in SUPPORTS if s not in done]:
            command = [python, "test.py", "with", dataset, f"setting{setting}", "model=copy_support",
                       f"supp_idx={supp}", f"data_dir={data_dir}", "n_overlay_slices=1", f"path.log_dir={folder}"]
            print(" ".join(command) if dry_run else f"[table] {cell}: copy_support, supp_idx {supp}", flush=True)
            if not dry_run:
                subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def held_elsewhere(folder: Path) -> bool:
    """A cell of this unit is being run by another process (its ``tools.sweep`` lock is held): e.g.
    a unit of an earlier runner that is still training."""
    for path in folder.glob("cells/*/.lock"):
        with open(path, "a", encoding="utf-8") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
    return False


def resolved(unit: Unit, best: str | None) -> Unit:
    """``unit`` with BEST replaced by ``best`` (the better baseline, :func:`best_baseline`) once known."""
    return Unit(unit.cell, best, unit.seed) if unit.method == BEST and best else unit


def run(args: argparse.Namespace) -> None:
    root = Path(args.dir).resolve()
    earlier = earlier_table(Path(args.results))
    copy_support(root, args.data_dir, args.python, args.dry_run, earlier)
    if args.dry_run:
        best = best_baseline(root, earlier)
        for unit in map(lambda u: resolved(u, best), units()):
            status = ("finished" if finished(unit.folder(root)) else
                      "recorded" if is_recorded(unit, earlier) else "to run")
            print(f"[{status}] " + " ".join(sweep_command(unit, root, args.data_dir, args.python)))
        return
    pending = [u for u in units()]
    running: dict[int, tuple[subprocess.Popen, Unit, dict]] = {}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    slots = cores[:args.slots or len(cores)]
    while pending or running:
        best = best_baseline(root, earlier)
        for unit in [u for u in pending if resolved(u, best).method != BEST]:
            done = resolved(unit, best)
            if finished(done.folder(root)) or is_recorded(done, earlier):
                print(f"[table] {done}: finished earlier", flush=True)
                pending.remove(unit)
        startable = [u for u in pending if resolved(u, best).method != BEST]
        # a unit another process is running takes a slot too, and is waited for
        held = {u for u in startable if held_elsewhere(resolved(u, best).folder(root))}
        free = [s for s in slots if s not in running][:max(0, len(slots) - len(running) - len(held))]
        for slot in free:
            unit = next((u for u in startable if u not in held and u in pending), None)
            if unit is None:
                break
            pending.remove(unit)
            unit = resolved(unit, best)
            folder = unit.folder(root)
            command = sweep_command(unit, root, args.data_dir, args.python)
            if shutil.which("taskset"):
                command = ["taskset", "-c", str(slot), *command]
            folder.mkdir(parents=True, exist_ok=True)
            record = {"load_before": os.getloadavg(), "start": datetime.now().isoformat(timespec="seconds"),
                      "command": command}
            log = open(folder / "sweep.log", "a", encoding="utf-8")
            running[slot] = (subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), unit, record)
            log.close()
            print(f"[table] {unit}: started on core {slot}", flush=True)
        if not running and not held:
            if pending:  # only BEST units left and the baselines did not finish
                raise SystemExit(f"[table] the CHAOST2 Setting 1 baselines did not finish; see {root}/CHAOST2_setting1")
            break
        time.sleep(POLL_S)
        for slot, (process, unit, record) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            record.update(load_after=os.getloadavg(), end=datetime.now().isoformat(timespec="seconds"),
                          returncode=process.returncode)
            (unit.folder(root) / "load.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            print(f"[table] {unit}: ended with {process.returncode}", flush=True)
    collect(args)


# the keys of a per-seed row that are not an organ's Dice
PER_SEED_KEYS = ("mean", "per_support", "train_s", "val_curve", "load", "run_dir")


def seed_rows(folder: Path) -> dict[str, dict]:
    """Dice (%) of one method's test runs under ``folder``, per seed: per organ and ``mean`` (over
    its supports, :mod:`tools.summarize`'s formula) and ``per_support``."""
    method: Method = load_methods([f"{folder.name}={folder}"])[folder.name]
    rows = {}
    for seed in sorted({key[2] for key in method.dice}):
        part = Method(method.name, method.dataset, {k: v for k, v in method.dice.items() if k[2] == seed},
                      method.class_names)
        entries, _ = summarize_method(part, "runs")
        row = {method.class_names.get(c, str(c)): round(100 * e.mean, 2) for c, e in entries.items() if c != "mean"}
        row["mean"] = round(100 * entries["mean"].mean, 2)
        row["per_support"] = {str(supp): round(100 * sum(sum(v.values()) / len(v) for v in per_class.values())
                                               / len(per_class), 2)
                              for (_, supp, _), per_class in sorted(part.dice.items())}
        rows[str(seed)] = row
    return rows


def method_entry(by_seed: dict[str, dict]) -> dict:
    """A method's table entry from its per-seed rows: every organ, ``mean`` and ``per_support`` the
    mean over seeds (each seed weighs the same), ``per_seed`` the seeds' means in ``seeds`` order,
    and ``by_seed`` itself (what a later ``collect`` merges with)."""
    seeds = sorted(by_seed, key=int)
    rows = [by_seed[s] for s in seeds]

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 2)

    organs = [k for k in rows[0] if k not in PER_SEED_KEYS]
    out = {organ: mean([r[organ] for r in rows]) for organ in organs}
    out["mean"] = mean([r["mean"] for r in rows])
    out["per_seed"] = [r["mean"] for r in rows]
    out["seeds"] = [int(s) for s in seeds]
    out["per_support"] = {supp: mean([r["per_support"][supp] for r in rows]) for supp in rows[0]["per_support"]}
    out["by_seed"] = by_seed
    return out


def training_sessions(folder: Path) -> dict[str, list[Path]]:
    """A method's training runs, per seed: the run folders of its training cell, oldest first (a
    training the sweep resumed after a stop has one folder per session)."""
    out: dict[str, list[Path]] = {}
    for seed_dir in sorted(folder.glob("seed*")):
        runs = sorted((p for p in seed_dir.glob("cells/*/train_*") if (p / "run.json").is_file()),
                      key=lambda p: json.loads((p / "run.json").read_text(encoding="utf-8"))["start_time"])
        if runs:
            out[seed_dir.name] = runs
    return out


def train_seconds(sessions: list[Path]) -> float | None:
    """Seconds of training that count: a completed session from start to stop, an interrupted one
    from its start to its newest snapshot (the step the next session resumed from; the steps after
    it were run again). None until the last session completed."""
    total = 0.0
    for i, run_dir in enumerate(sessions):
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        start = datetime.fromisoformat(info["start_time"])
        if info.get("status") == "COMPLETED":
            total += (datetime.fromisoformat(info["stop_time"]) - start).total_seconds()
        elif i == len(sessions) - 1:
            return None
        else:
            snapshots = sorted((run_dir / "snapshots").glob("step_*.pth"))
            if snapshots:  # Sacred's times are naive UTC
                written = datetime.fromtimestamp(snapshots[-1].stat().st_mtime, timezone.utc).replace(tzinfo=None)
                total += (written - start).total_seconds()
    return round(total)


def val_curve(sessions: list[Path]) -> list[tuple[int, float]]:
    """The validation curve over a training's sessions (a later session's point wins a step)."""
    points: dict[int, float] = {}
    for run_dir in sessions:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        series = metrics.get("val_dice_mean", {"steps": [], "values": []})
        points.update((int(s), round(100 * v, 2)) for s, v in zip(series["steps"], series["values"]))
    return sorted(points.items())


def folder_rows(method_dir: Path) -> dict[str, dict]:
    """The per-seed rows of one method's run folder: Dice (:func:`seed_rows`) plus, for a trained
    method, ``train_s``, ``val_curve`` and the ``load`` before and after the unit, and ``run_dir``."""
    rows = seed_rows(method_dir)
    sessions = training_sessions(method_dir)
    for seed, row in rows.items():
        seed_dir = method_dir / f"seed{seed}"
        row["run_dir"] = str(seed_dir if seed_dir.is_dir() else method_dir)
        if f"seed{seed}" in sessions:
            row["train_s"] = train_seconds(sessions[f"seed{seed}"])
            row["val_curve"] = [list(point) for point in val_curve(sessions[f"seed{seed}"])]
        if (seed_dir / "load.json").is_file():
            record = json.loads((seed_dir / "load.json").read_text(encoding="utf-8"))
            row["load"] = {"load_before": record["load_before"], "load_after": record.get("load_after")}
    return rows


def earlier_rows(entry: dict, cell: dict, method: str) -> dict[str, dict]:
    """The per-seed rows of a method's entry in an earlier results JSON. Entries written before
    rows were kept per seed hold one seed: their row is rebuilt from the entry and the cell's
    ``train_s`` and ``load_average`` (their validation curve was not kept)."""
    if "by_seed" in entry:
        return entry["by_seed"]
    if len(entry["seeds"]) != 1:
        raise ValueError(f"cannot merge {method}: its earlier entry pools seeds {entry['seeds']} without "
                         "per-seed rows; re-run collect on its run folder")
    row = {k: v for k, v in entry.items() if k not in ("per_seed", "seeds")}
    if isinstance(cell.get("train_s", {}).get(method), (int, float)):
        row["train_s"] = cell["train_s"][method]
    if cell.get("load_average", {}).get(method):
        row["load"] = cell["load_average"][method][0]
    return {str(entry["seeds"][0]): row}


def collect_cell(cell_dir: Path, earlier: dict) -> tuple[dict, dict[str, list]]:
    """One cell's entry (``dice_percent``, ``train_s``, ``load_average`` per method) from the run
    folders under ``cell_dir`` merged with ``earlier`` (the cell's entry in the results JSON an
    earlier ``collect`` wrote): a (method, seed) with a run folder here is taken from it, one
    without keeps its earlier row. Also the validation curves of the training runs (label -> points)."""
    by_method: dict[str, dict[str, dict]] = {}
    for method, entry in earlier.get("dice_percent", {}).items():
        by_method[method] = dict(earlier_rows(entry, earlier, method))
    if cell_dir.is_dir():
        for method_dir in sorted(p for p in cell_dir.iterdir() if p.is_dir()):
            if list(method_dir.rglob("scores.csv")):
                by_method.setdefault(method_dir.name, {}).update(folder_rows(method_dir))
    dice, seconds, loads, curves = {}, {}, {}, {}
    for method, by_seed in by_method.items():
        dice[method] = method_entry(by_seed)
        times = [by_seed[s]["train_s"] for s in sorted(by_seed, key=int) if by_seed[s].get("train_s") is not None]
        if times:
            seconds[method] = times if len(times) > 1 else times[0]
        loads[method] = [by_seed[s]["load"] for s in sorted(by_seed, key=int) if by_seed[s].get("load")]
        for seed in sorted(by_seed, key=int):
            if "train_s" in by_seed[seed] or "val_curve" in by_seed[seed]:
                curves[f"{method} (seed{seed})"] = by_seed[seed].get("val_curve")
    return {"dice_percent": dice, "train_s": seconds, "load_average": loads}, curves


def plot_curves(curves: dict[str, list[tuple[int, float]]], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="step", ylabel="validation mean Dice (%)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect(args: argparse.Namespace) -> dict:
    """The table from the run folders under ``--dir`` merged with the results JSON in ``--results``
    (rows of units whose run folder is not here, e.g. on an earlier machine, are kept)."""
    root = Path(args.dir).resolve()
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    earlier = earlier_table(results_dir)
    cells: dict = {}
    lines = ["# CPU-budget table (fold 0, self-supervised, `cpu_budget`, every method its own lr)", "",
             "Command: `python bench/cpu_budget_table.py run` (then `collect`); runs in " + str(root) + ".",
             "Dice (%) on the native grid: per support the mean over query scans and organs, then the mean "
             "over supports (and seeds). Training seconds: one core, one thread per training.", ""]
    for cell in CELLS:
        entry, curves = collect_cell(root / cell, earlier.get(cell, {}))
        dice, seconds = entry["dice_percent"], entry["train_s"]
        if not dice:
            continue
        cells[cell] = entry
        organs = [k for k in next(iter(dice.values())) if k not in (*PER_SEED_KEYS, "per_seed", "seeds", "by_seed")]
        copy = dice.get("copy_support", {}).get("mean")
        lines += [f"## {cell}", "", "| method | " + " | ".join(organs) + " | mean | per seed | training (s) |",
                  "|---|" + "---:|" * (len(organs) + 3)]
        for method, row in dice.items():
            flag = " (below copy-support: a defect)" if copy is not None and method != "copy_support" and row["mean"] < copy else ""
            lines.append(f"| {method} | " + " | ".join(str(row.get(o, "")) for o in organs)
                         + f" | {row['mean']}{flag} | {row['per_seed'] if len(row['per_seed']) > 1 else ''} | "
                         f"{seconds.get(method, '')} |")
        lines.append("")
        png = results_dir / f"cpu_budget_table_{cell}.png"
        missing = [name for name, points in curves.items() if not points]
        if any(curves.values()):
            plot_curves({name: points for name, points in curves.items() if points}, cell, png)
            lines += [f"![{cell} validation curves]({png.name})", ""]
        elif png.is_file():  # every curve of the cell predates the stored curves: the earlier figure stays
            lines += [f"![{cell} validation curves]({png.name}) (drawn by an earlier collect)", ""]
        if missing:
            lines += [f"Validation curves not kept (collected before curves were stored per seed): "
                      f"{', '.join(missing)}.", ""]
    if (root / "lr_select").is_dir():  # new rate runs here: merged into cpu_budget_lr.*
        lr_collect(args)
    result = {"name": "cpu_budget_table", "cells": cells, "runs": str(root), **machine()}
    write_text(results_dir / "cpu_budget_table.md", "\n".join(lines))
    emit(result, results_dir / "cpu_budget_table.json")
    return result


def earlier_lr(results: Path) -> dict:
    """The learning-rate results JSON an earlier ``lr`` / ``collect`` wrote (empty if none)."""
    path = results / "cpu_budget_lr.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def lr_select(args: argparse.Namespace) -> dict:
    """Run (or resume) the learning-rate grid of every trained method whose rates are not all in
    the results JSON yet, then choose and record."""
    root = Path(args.dir).resolve() / "lr_select"
    recorded_runs = earlier_lr(Path(args.results)).get("runs", {})
    models = [m for m in LR_MODELS if any(str(lr) not in recorded_runs.get(m, {}) for lr in LR_GRID)]
    if not models:
        print("[lr] every rate of every method is recorded in the results JSON; nothing to run", flush=True)
        return {} if args.dry_run else lr_collect(args)
    command = [args.python, "-m", "tools.sweep", "--out", str(root), "--configs", "abd_mri+setting1+cpu_budget",
               "--settings", "1", "--folds", "0", "--supports", "", "--seeds", "2025",
               f"model={','.join(models)}", f"optim.lr={','.join(map(str, LR_GRID))}",
               "--train", f"n_steps={LR_STEPS}", "--train", "num_workers=0", "--train", f"data_dir={args.data_dir}",
               "--jobs", str(args.slots or len(os.sched_getaffinity(0)))]
    if args.dry_run:
        command.append("--dry-run")
    subprocess.run(command, cwd=REPO, check=False)
    return {} if args.dry_run else lr_collect(args)


def full_budget_unstable(folder: Path) -> dict[tuple[str, float], dict]:
    """(model, lr) -> evidence, for the full-budget trainings kept in ``folder`` (table units moved
    there as they stopped) whose validation fell below half its peak after the peak."""
    out = {}
    for unit in sorted(p for p in folder.glob("*") if p.is_dir()):
        for runs in training_sessions(unit).values():
            config = json.loads((runs[-1] / "config.json").read_text(encoding="utf-8"))
            curve = val_curve(runs)
            if not curve:
                continue
            peak_at = max(range(len(curve)), key=lambda i: curve[i][1])
            low = min(curve[peak_at:], key=lambda point: point[1])
            if low[1] < curve[peak_at][1] / 2:
                out[(config["model"], float(config["optim"]["lr"]))] = {
                    "run": str(unit), "peak": list(curve[peak_at]), "low": list(low), "val_curve": curve}
    return out


def plot_lr_curves(runs: dict[str, dict[str, dict]], path: Path) -> None:
    """One panel per model, one validation curve per rate (model -> rate -> row with ``val_curve``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5 * max(1, len(runs)), 3.5), squeeze=False)
    for ax, (model, by_lr) in zip(axes[0], runs.items()):
        for lr, row in sorted(by_lr.items(), key=lambda kv: float(kv[0])):
            if row["val_curve"]:
                ax.plot(*zip(*row["val_curve"]), marker="o", label=f"lr {lr} ({row['status']})")
        ax.set(title=model, xlabel="step", ylabel="validation mean Dice (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lr_collect(args: argparse.Namespace) -> dict:
    """The learning-rate table from the runs of :func:`lr_select` that exist so far, merged with the
    results JSON an earlier run wrote: a (model, rate) without a run folder here keeps its row."""
    root = Path(args.dir).resolve() / "lr_select"
    earlier = earlier_lr(Path(args.results))
    runs = {model: dict(by_lr) for model, by_lr in earlier.get("runs", {}).items()}
    for run_dir in sorted(root.glob("cells/*/train_*")):
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        curve = val_curve([run_dir])
        collapsed = info.get("status") == "FAILED" and "collapsed" in str(info.get("fail_trace", ""))
        finished_ = info.get("status") == "COMPLETED" or collapsed
        score = (0.0 if collapsed else round(sum(v for _, v in curve[-2:]) / 2, 3)) if finished_ and curve else None
        runs.setdefault(config["model"], {})[str(config["optim"]["lr"])] = {
            "status": "collapsed" if collapsed else info.get("status"), "val_curve": curve, "score": score,
            "train_s": train_seconds([run_dir])}
    unstable = {(row["model"], float(row["lr"])): {k: v for k, v in row.items() if k not in ("model", "lr")}
                for row in earlier.get("full_budget_unstable", [])}
    unstable.update(full_budget_unstable(Path(args.dir).resolve() / "unstable"))
    chosen = {m: max((lr for lr in r if r[lr]["score"] is not None and (m, float(lr)) not in unstable),
                     key=lambda lr: r[lr]["score"], default=None)
              for m, r in runs.items()}
    result = {"name": "cpu_budget_lr", "steps": LR_STEPS, "rates": list(LR_GRID), "runs": runs, "chosen": chosen,
              "full_budget_unstable": [{"model": m, "lr": lr, **row} for (m, lr), row in unstable.items()],
              "rule": "best mean of the last two validations (steps 1000, 1500); collapsed = 0; a rate whose "
                      "full-budget run fell below half its peak validation is excluded", **machine()}
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Learning rates (CHAOST2 fold 0, Setting 1, `cpu_budget`, "
             f"{LR_STEPS} steps, seed 2025)", "", "Command: `python bench/cpu_budget_table.py lr`. "
             "Validation mean Dice (%) on scans 38 and 39; score = mean of the last two.", "",
             "| model | lr | status | " + " | ".join(f"step {s}" for s in range(500, LR_STEPS + 1, 500))
             + " | score | training (s) |", "|---|---:|---|" + "---:|" * (LR_STEPS // 500 + 2)]
    for model, by_lr in runs.items():
        for lr, row in sorted(by_lr.items(), key=lambda kv: float(kv[0])):
            values = dict(row["val_curve"])
            mark = " **chosen**" if chosen[model] == lr else ""
            lines.append(f"| {model} | {lr}{mark} | {row['status']} | "
                         + " | ".join(str(values.get(s, "")) for s in range(500, LR_STEPS + 1, 500))
                         + f" | {row['score'] if row['score'] is not None else ''} | {row['train_s'] or ''} |")
    for (model, lr), row in unstable.items():
        lines.append(f"\n{model} at lr {lr} is excluded: its full-budget run ({row['run']}) validated at "
                     f"{row['peak'][1]} after step {row['peak'][0]} and fell to {row['low'][1]} at step "
                     f"{row['low'][0]} (curve: {row['val_curve']}).")
    plot_lr_curves(runs, results_dir / "cpu_budget_lr.png")
    lines += ["", "![validation curves](cpu_budget_lr.png)", ""]
    write_text(results_dir / "cpu_budget_lr.md", "\n".join(lines))
    return emit(result, results_dir / "cpu_budget_lr.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("lr", "run", "collect"))
    parser.add_argument("--dir", default=str(REPO.parent / "runs" / "cpu_budget_table"),
                        help="grid folder, outside the clone [../runs/cpu_budget_table]")
    parser.add_argument("--data-dir", default=os.environ.get("QAMP_DATA_ROOT"),
                        help="data root holding CHAOST2/ and SABS/ [$QAMP_DATA_ROOT]")
    parser.add_argument("--results", default=str(REPO / "bench" / "results"), help="where collect writes")
    parser.add_argument("--slots", type=int, default=None, help="units at a time [one per core]")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dry-run", action="store_true", help="print the sweep commands, run nothing")
    args = parser.parse_args(argv)
    if args.command != "collect" and not args.data_dir:
        parser.error("the data root is not set: pass --data-dir or export QAMP_DATA_ROOT=/path/to/data")
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    {"lr": lr_select, "run": run, "collect": collect}[args.command](args)


if __name__ == "__main__":
    main()
