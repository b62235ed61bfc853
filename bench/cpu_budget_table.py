"""The CPU-budget table: QAMP, the authors' ADNet and SSL-ALPNet heads, and copy-support under one test
bed (same encoder, data, episodes, seed and protocol), on CHAOST2 Setting 1 and 2 and SABS Setting 1.

    export QAMP_DATA_ROOT=../shared/data        # the root holding CHAOST2/ and SABS/
    python bench/cpu_budget_table.py lr         # the baselines' learning rates: run / resume, then choose
    python bench/cpu_budget_table.py run        # run or resume the grid, then collect (hours: see below)
    python bench/cpu_budget_table.py collect    # tables (and the lr table) from what has finished so far
    python bench/cpu_budget_table.py run --dry-run
    python bench/cpu_budget_table.py pretrained # the pre-trained regime: encoder, rates, 5 folds (overnight)

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

``pretrained`` runs the pre-trained regime under ``<dir>/pretrained/`` (docs/CPU_BUDGET.md, "A
shared pre-trained encoder"): one encoder pre-trained on SABS CT (``cpu_budget`` + ``pretrain_sabs``:
PANet episodes on supervoxels, labels unused), each method's rate at fold 0 (``PRETRAINED_LR_GRID``,
``PRETRAINED_LR_STEPS`` steps, the same rule), then every method on CHAOST2 Setting 1 folds 0-4
from that encoder (``pretrained_weights=snapshot``, ``PRETRAINED_STEPS`` steps, supports 0-2),
copy-support on every fold, and the bias check (the two best methods, fold 0, from a second
encoder pre-trained with ADNet's objective). Units start as their inputs exist, one per core; each
finished unit lands in the results JSON's ``pretrained`` entry at once (per-fold rows, the
encoders' SHA-256), so a new machine runs only what is not recorded there (an encoder is trained
again only for units that still need it, and must reproduce the recorded SHA-256). A gate follows
the budget check: when every budget-check method scored below its own from-scratch fold-0 number,
nothing past it is planned and the runner says why (``--past-gate`` runs the grid anyway). Committed
results hold no absolute path of the machine (``run_dir`` relative to ``--dir``).
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
from models import MODELS  # noqa: E402
from tools.summarize import Method, load_methods, summarize_method  # noqa: E402
from utils.io import write_json, write_text  # noqa: E402

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


def start_unit(command: list[str], folder: Path, slot: int, root: Path) -> tuple[subprocess.Popen, dict]:
    """Start ``command`` pinned to core ``slot`` (``taskset`` where there is one), its output appended to
    ``folder/sweep.log``; returns the process and the record that :func:`end_unit` completes."""
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(slot), *command]
    folder.mkdir(parents=True, exist_ok=True)
    record = {"load_before": os.getloadavg(), "start": datetime.now().isoformat(timespec="seconds"), "core": slot,
              "command": [c.replace(str(root), "<dir>") for c in command]}
    with open(folder / "sweep.log", "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    (folder / "running.json").write_text(json.dumps(record, indent=1), encoding="utf-8")  # a later runner reads the core
    return process, record


def held_core(folder: Path) -> int | None:
    """The core a unit started by another (earlier) runner is pinned to, from its ``running.json``."""
    path = folder / "running.json"
    return json.loads(path.read_text(encoding="utf-8")).get("core") if path.is_file() else None


def end_unit(process: subprocess.Popen, record: dict, folder: Path) -> None:
    """Write the unit's ``load.json``: the load average before and after, times, return code."""
    record.update(load_after=os.getloadavg(), end=datetime.now().isoformat(timespec="seconds"),
                  returncode=process.returncode)
    (folder / "load.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


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
            process, record = start_unit(sweep_command(unit, root, args.data_dir, args.python), unit.folder(root),
                                         slot, root)
            running[slot] = (process, unit, record)
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
            end_unit(process, record, unit.folder(root))
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
        row["run_dir"] = str(seed_dir if seed_dir.is_dir() else method_dir)  # made relative by collect_cell
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
    for by_seed in by_method.values():
        for row in by_seed.values():
            if "run_dir" in row:
                row["run_dir"] = relative_run_dir(row["run_dir"], cell_dir.parent)
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
             "Command: `python bench/cpu_budget_table.py run` (then `collect`); runs in `--dir` (outside the clone).",
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
    result = {"name": "cpu_budget_table", "cells": cells, "runs": args.dir if not Path(args.dir).is_absolute()
              else Path(args.dir).name, **machine()}
    earlier_json = results_dir / "cpu_budget_table.json"
    recorded = json.loads(earlier_json.read_text(encoding="utf-8")).get("pretrained", {}) if earlier_json.is_file() else {}
    if recorded or (root / "pretrained").is_dir():
        result["pretrained"] = pretrained_collect(root, recorded)
        lines += pretrained_lines(result["pretrained"])
        ablation_table(result["pretrained"], results_dir)
        curves = {f"{m} (fold {f})": row["val_curve"] for m, e in
                  result["pretrained"]["cells"]["CHAOST2_setting1"]["dice_percent"].items()
                  for f, row in e["by_fold"].items() if row.get("val_curve")}
        if curves:
            plot_curves(curves, "pre-trained encoder, CHAOST2 Setting 1", results_dir / "cpu_budget_table_pretrained.png")
            lines += ["![pre-trained regime validation curves](cpu_budget_table_pretrained.png)", ""]
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


# ---------------------------------------------------------------------------------------------- pre-trained regime
# One shared encoder, pre-trained self-supervised on SABS CT (labels never read), then every method on
# CHAOST2 Setting 1, folds 0-4, from that encoder: ``python bench/cpu_budget_table.py pretrained``.
# Units under <dir>/pretrained/: encoders/<source>, lr/<method>, <source>/<method>/fold<f>,
# <source>/copy_support. What finished is recorded in the results JSON's "pretrained" entry
# (per-fold rows, the encoders' SHA-256), so a new machine runs only what is not recorded there.
ENCODER_SOURCES = {  # source -> (named configs, extra training keys, objective in words)
    "panet_sabs": ("cpu_budget+pretrain_sabs", (),
                   "PANet episodes (model=panet): masked-average prototypes and a cosine classifier, no head "
                   "parameters; SABS CT supervoxels generated on load at 64 px, every slice through a fresh GIN "
                   "intensity network (gin_prob=1), labels unused"),
    "adnet_sabs": ("cpu_budget+pretrain_sabs+cpu_budget_adnet", (),
                   "ADNet episodes (model=adnet, lr 0.005): one foreground prototype and a learned threshold; "
                   "SABS CT supervoxels generated on load at 64 px, GIN on every slice, labels unused")}
SHARED_ENCODER = "panet_sabs"  # the encoder every method starts from
BIAS_ENCODER = "adnet_sabs"  # the second source of the bias check (the two best methods, fold 0)
PRETRAIN_SEED = 2025
PRETRAINED_METHODS = tuple(m for m in ("qamp", "adnet", "alpnet", "qnet", "gmrd") if m in MODELS)
PRETRAINED_FOLDS = (0, 1, 2, 3, 4)
PRETRAINED_LR_GRID = (0.001, 0.005, 0.02)
PRETRAINED_LR_STEPS = 1500  # the from-scratch grid's length (LR_STEPS); docs/CPU_BUDGET.md says what it favours
# The budget from the encoder: cpu_budget's own (6000 steps, x0.25 at 3000). A shorter one needs curves that
# flatten sooner; the budget check's did not (QAMP: 49.1 at step 3000, 59.8 at 4500; docs/CPU_BUDGET.md).
PRETRAINED_STEPS = 6000
PRETRAINED_SCHEDULE = ("max_iters_per_load=3000",)
# The ablation (fold 0, the shared encoder, QAMP's rate): QAMP with one addition over GMRD off per row
# (models/qamp.py ModelConfig; the prototype loss compares the reverse pass's prototypes, so the
# reverse pass goes with it), and Q-Net tested without its test-time refinement.
ABLATIONS = {"qamp-no_query_prototypes": ("use_query_prototypes=False",),
             "qamp-no_edge_samples": ("use_edge_samples=False",),
             "qamp-no_mlp_prototypes": ("use_mlp_prototypes=False",),
             "qamp-no_boundary_loss": ("use_boundary_loss=False",),
             "qamp-no_proto_loss": ("use_proto_loss=False",),
             "qamp-no_reverse_pass": ("use_alignment=False", "use_proto_loss=False")}
UNREFINED = "qnet-no_refinement"  # test-only: the fold-0 Q-Net training, tested with qnet_refine_iters=0
# The budget check: the from-scratch configuration exactly (6000 steps, the method's from-scratch rate),
# started from the shared encoder, fold 0. Its validation curve shows whether PRETRAINED_STEPS suffices,
# and its Dice is the method's pre-trained number beside its from-scratch one at the same budget.
BUDGET_CHECK = ("qamp", "alpnet")


@dataclass(frozen=True)
class Job:
    """One resumable unit of the pre-trained regime: a ``tools.sweep`` (or test.py) command writing under
    ``folder``; ``needs``: the names of jobs that must have finished first."""
    name: str
    folder: Path
    needs: tuple[str, ...] = ()


def encoder_file(folder: Path) -> Path | None:
    """The final snapshot of a finished pre-training unit (COMPLETED), else None."""
    for run_dir in sorted(folder.glob("cells/*/train_*")):
        info = run_dir / "run.json"
        final = run_dir / "snapshots" / "final.pth"
        if final.is_file() and info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("status") == "COMPLETED":
            return final
    return None


_DIGESTS: dict[tuple, str] = {}  # (kind, path, size, mtime) -> digest: the scheduler collects every POLL_S


def _cached(kind: str, path: Path, compute) -> str:
    stat = path.stat()
    key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = compute(path)
    return _DIGESTS[key]


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoder_digest(path: Path) -> str:
    """SHA-256 over the encoder tensors of a snapshot (names and bytes, name order): equal for the same
    weights whatever else the file holds (its run folder, times), so a pre-training run again on
    another machine can be checked against the recorded one."""
    import hashlib

    from engine.snapshot import load_snapshot

    model = load_snapshot(path)["model"]
    digest = hashlib.sha256()
    for name in sorted(k for k in model if k.startswith("encoder.")):
        digest.update(name.encode())
        digest.update(model[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_gate(recorded: dict, scratch: dict) -> str | None:
    """Why the grid past the budget check should not run (None: it should): every budget-check method
    scored below its own from-scratch fold-0 number (same configuration and seed). ``recorded``: the
    "pretrained" entry; ``scratch``: the from-scratch ``cells`` of the results JSON."""
    rows = scratch.get("CHAOST2_setting1", {}).get("dice_percent", {})
    pairs = {m: (recorded.get("budget_check", {}).get(m, {}).get("mean"),
                 rows.get(m, {}).get("by_seed", {}).get(str(PRETRAIN_SEED), {}).get("mean")) for m in BUDGET_CHECK}
    if any(None in pair for pair in pairs.values()) or any(pre >= own for pre, own in pairs.values()):
        return None
    return ("the shared encoder is a worse start than a random one: from it " + ", ".join(
        f"{m} {pre} against {own} from scratch" for m, (pre, own) in pairs.items()) + " (fold 0, seed "
        f"{PRETRAIN_SEED}); the five folds would measure a start that hurts every method. Improve the "
        "pre-training (docs/CPU_BUDGET.md), or pass --past-gate to run them anyway")


def pretrained_jobs(recorded: dict, best: list[str] | None, closed: bool = False) -> list[Job]:
    """Every job not recorded in ``recorded`` (the results JSON's "pretrained" entry), dependencies
    first. ``best``: the two best methods over five folds (None until every fold is in). ``closed``
    (:func:`encoder_gate`): the encoder and the budget check only."""
    root = Path("pretrained")
    cells = recorded.get("cells", {}).get("CHAOST2_setting1", {}).get("dice_percent", {})
    lr_done = recorded.get("lr", {}).get("chosen", {})
    jobs = [Job(f"budget/{m}", root / "budget" / m, (f"encoder/{SHARED_ENCODER}",))
            for m in BUDGET_CHECK if m not in recorded.get("budget_check", {})]
    if closed:
        return ([Job(f"encoder/{SHARED_ENCODER}", root / "encoders" / SHARED_ENCODER)] if jobs else []) + jobs
    for method in PRETRAINED_METHODS:
        if method not in lr_done:
            jobs.append(Job(f"lr/{method}", root / "lr" / method, (f"encoder/{SHARED_ENCODER}",)))
        for fold in PRETRAINED_FOLDS:
            if str(fold) not in cells.get(method, {}).get("by_fold", {}):
                jobs.append(Job(f"{SHARED_ENCODER}/{method}/fold{fold}", root / SHARED_ENCODER / method / f"fold{fold}",
                                (f"encoder/{SHARED_ENCODER}", f"lr/{method}")))
    for variant in ABLATIONS:
        if "0" not in cells.get(variant, {}).get("by_fold", {}):
            jobs.append(Job(f"{SHARED_ENCODER}/{variant}/fold0", root / SHARED_ENCODER / variant / "fold0",
                            (f"encoder/{SHARED_ENCODER}", "lr/qamp")))
    if "qnet" in PRETRAINED_METHODS and "0" not in cells.get(UNREFINED, {}).get("by_fold", {}):
        jobs += [Job(f"{UNREFINED}/fold0/supp{s}", root / SHARED_ENCODER / UNREFINED / "fold0" / f"supp{s}",
                     (f"{SHARED_ENCODER}/qnet/fold0",)) for s in SUPPORTS]
    for fold in PRETRAINED_FOLDS:
        if str(fold) not in cells.get("copy_support", {}).get("by_fold", {}):
            jobs += [Job(f"copy_support/fold{fold}/supp{s}", root / "copy_support" / f"fold{fold}" / f"supp{s}")
                     for s in SUPPORTS]
    bias = recorded.get("bias_check", {}).get("dice_percent", {})
    for method in best or ():
        if method not in bias:
            jobs.append(Job(f"{BIAS_ENCODER}/{method}/fold0", root / BIAS_ENCODER / method / "fold0",
                            (f"encoder/{BIAS_ENCODER}", f"lr/{method}")))
    needed = {n.split("/", 1)[1] for job in jobs for n in job.needs if n.startswith("encoder/")}
    return [Job(f"encoder/{source}", root / "encoders" / source) for source in ENCODER_SOURCES
            if source in needed] + jobs


def pretrained_command(job: Job, root: Path, args: argparse.Namespace, recorded: dict, encoders: dict) -> list[str]:
    """The command of ``job`` (paths under ``root``, the grid folder)."""
    out = str(root / job.folder)
    kind, _, rest = job.name.partition("/")
    common = ["--seeds", str(PRETRAIN_SEED), "--jobs", "1", "--train", "num_workers=0",
              "--train", f"data_dir={args.data_dir}", "--test", f"data_dir={args.data_dir}", "--test", "n_overlay_slices=1"]
    if kind == "encoder":
        configs, extra, _ = ENCODER_SOURCES[rest]
        command = [args.python, "-m", "tools.sweep", "--out", out, "--configs", configs, "--settings", "1",
                   "--folds", "0", "--supports", "", *common]
        return command + [x for key in extra for x in ("--train", key)]
    if kind == "copy_support":
        fold, supp = (part[4:] for part in rest.split("/"))
        return [args.python, "test.py", "with", "abd_mri", "setting1", "model=copy_support", f"eval_fold={fold}",
                f"supp_idx={supp}", f"data_dir={args.data_dir}", "n_overlay_slices=1", f"path.log_dir={out}"]
    if kind == UNREFINED:
        trained = root / "pretrained" / SHARED_ENCODER / "qnet" / "fold0"
        run_dir = next(trained.glob("cells/*/train_*/snapshots/final.pth"), trained).parents[1]
        return [args.python, "test.py", "with", f"reload_model_path={run_dir}", "qnet_refine_iters=0",
                f"supp_idx={rest.split('/')[1][4:]}", f"data_dir={args.data_dir}", "n_overlay_slices=1",
                f"path.log_dir={out}"]
    start = ["--train", "pretrained_weights=snapshot", "--train",
             f"pretrained_path={encoders[BIAS_ENCODER if kind == BIAS_ENCODER else SHARED_ENCODER]}"]
    if kind == "budget":
        return [args.python, "-m", "tools.sweep", "--out", out, "--configs", f"abd_mri+setting1+{named_configs(rest)}",
                "--settings", "1", "--folds", "0", "--supports", ",".join(map(str, SUPPORTS)), *common, *start]
    if kind == "lr":
        return [args.python, "-m", "tools.sweep", "--out", out, "--configs", "abd_mri+setting1+cpu_budget",
                "--settings", "1", "--folds", "0", "--supports", "", *common, *start, f"model={rest}",
                f"optim.lr={','.join(map(str, PRETRAINED_LR_GRID))}", "--train", f"n_steps={PRETRAINED_LR_STEPS}"]
    method, fold = rest.split("/")
    model = "qamp" if method in ABLATIONS else method
    lr = recorded.get("lr", {}).get("chosen", {}).get(model)
    return [args.python, "-m", "tools.sweep", "--out", out, "--configs", "abd_mri+setting1+cpu_budget",
            "--settings", "1", "--folds", fold.removeprefix("fold"), "--supports", ",".join(map(str, SUPPORTS)),
            *common, *start, f"model={model}", "--train", f"optim.lr={lr}", "--train", f"n_steps={PRETRAINED_STEPS}",
            *(x for key in PRETRAINED_SCHEDULE + ABLATIONS.get(method, ()) for x in ("--train", key))]


def collapsed_at(folder: Path) -> list[tuple[int, float]] | None:
    """The validation curve of a unit whose training was stopped by ``collapse_patience`` (None when
    it was not): a stopped run is a row of the table with its status, never a gap."""
    for run_dir in sorted(folder.glob("cells/*/train_*")):
        info = run_dir / "run.json"
        if info.is_file():
            record = json.loads(info.read_text(encoding="utf-8"))
            if record.get("status") == "FAILED" and "collapsed" in str(record.get("fail_trace", "")):
                return val_curve([run_dir])
    return None


def job_finished(job: Job, root: Path, entry: dict) -> bool:
    """A job is finished when what depends on it can start: an encoder's final snapshot, a method's
    chosen rate (every rate scored), a test run's summaries."""
    kind, _, rest = job.name.partition("/")
    folder = root / job.folder
    if kind == "encoder":
        return encoder_file(folder) is not None
    if kind == "lr":
        return rest in entry["lr"]["chosen"]
    if kind in ("copy_support", UNREFINED):
        return any(folder.glob("test_*/summary.json"))
    return finished(folder) or collapsed_at(folder) is not None


def lr_row(run_dir: Path) -> tuple[str, str, dict]:
    """(model, rate, row) of one learning-rate training: status, curve, score (mean of the last two
    validations; a collapsed run scores 0), seconds."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    curve = val_curve([run_dir])
    collapsed = info.get("status") == "FAILED" and "collapsed" in str(info.get("fail_trace", ""))
    finished_ = info.get("status") == "COMPLETED" or collapsed
    score = (0.0 if collapsed else round(sum(v for _, v in curve[-2:]) / 2, 3)) if finished_ and curve else None
    row = {"status": "collapsed" if collapsed else info.get("status"), "val_curve": curve, "score": score,
           "train_s": train_seconds([run_dir])}
    return config["model"], str(config["optim"]["lr"]), row


def pretrained_lr(root: Path, recorded: dict) -> dict:
    """The "lr" entry: per method the rows of its rate runs (recorded ones kept) and the chosen rate."""
    runs = {m: dict(r) for m, r in recorded.get("lr", {}).get("runs", {}).items()}
    for run_dir in sorted(root.glob("pretrained/lr/*/cells/*/train_*")):
        # a run that has just started has no metrics.json yet: it is collected on a later poll
        if all((run_dir / name).is_file() for name in ("run.json", "config.json", "metrics.json")):
            model, lr, row = lr_row(run_dir)
            runs.setdefault(model, {})[lr] = row
    chosen = dict(recorded.get("lr", {}).get("chosen", {}))
    for model, by_lr in runs.items():
        scored = [lr for lr, row in by_lr.items() if row["score"] is not None]
        if model not in chosen and len(scored) == len(PRETRAINED_LR_GRID):
            chosen[model] = max(scored, key=lambda lr: by_lr[lr]["score"])
    return {"rates": list(PRETRAINED_LR_GRID), "steps": PRETRAINED_LR_STEPS, "runs": runs, "chosen": chosen}


def relative_run_dir(path: str, root: Path) -> str:
    """A run folder as stored in a committed result: relative to the grid folder (an absolute path of
    the machine that ran it means nothing elsewhere). An absolute path of another grid folder keeps
    its part from the cell (or ``pretrained``) on."""
    p = Path(path)
    if not p.is_absolute():
        return path
    if p.is_relative_to(root):
        return str(p.relative_to(root))
    anchors = [i for i, part in enumerate(p.parts) if part in CELLS or part == "pretrained"]
    return str(Path(*p.parts[anchors[0]:])) if anchors else p.name


def fold_entry(by_fold: dict[str, dict]) -> dict:
    """Mean and population std over folds (the field's convention), per fold, per organ."""
    folds = sorted(by_fold, key=int)
    means = [by_fold[f]["mean"] for f in folds]
    mean = sum(means) / len(means)
    out = {"mean": round(mean, 2), "std_over_folds": round(math.sqrt(sum((m - mean) ** 2 for m in means) / len(means)), 2),
           "per_fold": means, "folds": [int(f) for f in folds]}
    organs = list(dict.fromkeys(k for f in folds for k in by_fold[f] if k not in (*PER_SEED_KEYS, "status")))
    out.update({o: round(sum(by_fold[f].get(o, 0.0) for f in folds) / len(folds), 2) for o in organs})  # collapsed: 0
    stopped = [int(f) for f in folds if by_fold[f].get("status") == "collapsed"]
    if stopped:
        out["collapsed_folds"] = stopped
    out["by_fold"] = by_fold
    return out


def unit_row(folder: Path, root: Path) -> dict:
    """The row of one finished fold unit (its one seed): Dice, training seconds, curve, load."""
    row = next(iter(seed_rows(folder).values()))
    sessions = [p for p in sorted(folder.glob("cells/*/train_*")) if (p / "run.json").is_file()]
    if sessions:
        sessions.sort(key=lambda p: json.loads((p / "run.json").read_text(encoding="utf-8"))["start_time"])
        row["train_s"] = train_seconds(sessions)
        row["val_curve"] = [list(point) for point in val_curve(sessions)]
    if (folder / "load.json").is_file():
        record = json.loads((folder / "load.json").read_text(encoding="utf-8"))
        row["load"] = {"load_before": record["load_before"], "load_after": record.get("load_after")}
    row["run_dir"] = relative_run_dir(str(folder), root)
    return row


def pretrained_collect(root: Path, recorded: dict) -> dict:
    """The "pretrained" entry from the unit folders under ``root`` merged with ``recorded``."""
    entry = {"steps": PRETRAINED_STEPS, "encoder": dict(recorded.get("encoder", {})),
             "bias_check": dict(recorded.get("bias_check", {})),
             "budget_check": dict(recorded.get("budget_check", {}))}
    for folder in sorted((root / "pretrained" / "budget").glob("*")):
        if finished(folder):
            entry["budget_check"][folder.name] = unit_row(folder, root)
    for source, key in ((SHARED_ENCODER, "encoder"), (BIAS_ENCODER, "bias_check")):
        file = encoder_file(root / "pretrained" / "encoders" / source)
        if file is not None:
            configs, extra, objective = ENCODER_SOURCES[source]
            record = {"source": source, "configs": configs, "objective": objective,
                      "steps": json.loads((file.parents[1] / "config.json").read_text(encoding="utf-8"))["n_steps"],
                      "sha256": _cached("file", file, sha256_of),
                      "encoder_tensors_sha256": _cached("tensors", file, encoder_digest),
                      "run_dir": relative_run_dir(str(file.parents[1]), root)}
            target = entry[key] if key == "encoder" else entry["bias_check"].setdefault("encoder", {})
            if target.get("encoder_tensors_sha256") not in (None, record["encoder_tensors_sha256"]):
                raise SystemExit(f"[pretrained] the encoder {source} in {file} (tensors sha256 "
                                 f"{record['encoder_tensors_sha256']}) is not the recorded one "
                                 f"({target['encoder_tensors_sha256']}): units trained from the recorded encoder would "
                                 "mix with new ones; restore that file or remove the recorded 'pretrained' entry")
            target.update(record)
    entry["lr"] = pretrained_lr(root, recorded)
    cells = recorded.get("cells", {}).get("CHAOST2_setting1", {}).get("dice_percent", {})
    by_method: dict[str, dict[str, dict]] = {m: dict(e.get("by_fold", {})) for m, e in cells.items()}
    for folder in sorted(f for f in (root / "pretrained").glob(f"{SHARED_ENCODER}/*/fold*") if f.parent.name != UNREFINED):
        curve = None if finished(folder) else collapsed_at(folder)
        if finished(folder):
            row = unit_row(folder, root)
        elif curve is not None:  # predicts background everywhere: Dice 0 on every organ, with its status
            row = {"mean": 0.0, "status": "collapsed", "val_curve": [list(p) for p in curve],
                   "run_dir": relative_run_dir(str(folder), root)}
        else:
            continue
        by_method.setdefault(folder.parent.name, {})[folder.name.removeprefix("fold")] = row
    for folder in sorted((root / "pretrained").glob("copy_support/fold*")) + \
            sorted((root / "pretrained").glob(f"{SHARED_ENCODER}/{UNREFINED}/fold*")):
        if len(list(folder.glob("supp*/test_*/summary.json"))) >= len(SUPPORTS):
            by_method.setdefault(folder.parent.name, {})[folder.name.removeprefix("fold")] = unit_row(folder, root)
    dice = {m: fold_entry(rows) for m, rows in by_method.items() if rows}
    seconds = {m: [rows[f].get("train_s") for f in sorted(rows, key=int)] for m, rows in by_method.items()
               if m != "copy_support" and rows}
    entry["cells"] = {"CHAOST2_setting1": {"dice_percent": dice, "train_s": seconds}}
    bias = dict(entry["bias_check"].get("dice_percent", {}))
    for folder in sorted((root / "pretrained").glob(f"{BIAS_ENCODER}/*/fold0")):
        if finished(folder):
            bias[folder.parent.name] = unit_row(folder, root)
    entry["bias_check"]["dice_percent"] = bias
    return entry


def pretrained_lines(entry: dict) -> list[str]:
    """The markdown of the pre-trained regime: encoder, rates, the five-fold table, the bias check."""
    encoder = entry.get("encoder", {})
    lines = ["## Pre-trained regime: CHAOST2 Setting 1, folds 0-4", "",
             f"Encoder: {encoder.get('objective', 'not trained yet')}; {encoder.get('steps', '?')} steps "
             f"(`{encoder.get('configs', '')}`), sha256 `{encoder.get('sha256', '')[:16]}`. Every method trains "
             f"{entry['steps']} steps from it at its own rate (chosen at fold 0 on the validation curve): "
             f"{entry.get('lr', {}).get('chosen', {})}. Dice (%): mean over folds +- population std over folds "
             "(the field's convention); per fold the mean over supports 0-2.", ""]
    dice = entry["cells"]["CHAOST2_setting1"]["dice_percent"]
    if dice:
        organs = [k for k in next(iter(dice.values())) if k not in ("mean", "std_over_folds", "per_fold", "folds", "by_fold",
                                                                      "collapsed_folds")]
        copy = dice.get("copy_support", {}).get("per_fold")
        lines += ["| method | " + " | ".join(organs) + " | mean +- std | per fold | training (s) |",
                  "|---|" + "---:|" * (len(organs) + 3)]
        for method, row in ((m, r) for m, r in dice.items() if m in (*PRETRAINED_METHODS, "copy_support")):
            below = [f for f, v in zip(row["folds"], row["per_fold"]) if copy and method != "copy_support"
                     and f in dice["copy_support"]["folds"] and v < copy[dice["copy_support"]["folds"].index(f)]]
            flag = f" (below copy-support on fold {below}: a defect)" if below else ""
            if row.get("collapsed_folds"):
                flag += f" (stopped as collapsed on fold {row['collapsed_folds']}: 0 there)"
            seconds = entry["cells"]["CHAOST2_setting1"]["train_s"].get(method, "")
            lines.append(f"| {method} | " + " | ".join(str(row.get(o, "")) for o in organs)
                         + f" | {row['mean']} +- {row['std_over_folds']}{flag} | {row['per_fold']} (folds {row['folds']}) | {seconds} |")
        lines.append("")
    for method, row in entry.get("budget_check", {}).items():
        lines += [f"Budget check, {method}, fold 0, the from-scratch configuration (6000 steps, its from-scratch "
                  f"rate) from the shared encoder: {row['mean']}; validation curve {row.get('val_curve')}.", ""]
    bias = entry.get("bias_check", {})
    if bias.get("dice_percent"):
        lines += [f"Bias check, fold 0, from the second encoder ({bias.get('encoder', {}).get('objective', '')}): "
                  + ", ".join(f"{m} {row['mean']}" for m, row in bias["dice_percent"].items()), ""]
    return lines


ABLATION_ROWS = ("qamp", *ABLATIONS, "gmrd", "qnet", UNREFINED, "adnet", "alpnet", "copy_support")


def ablation_table(entry: dict, results_dir: Path) -> dict:
    """``bench/results/ablation.{json,md}``: fold 0 of the pre-trained regime, one row per variant."""
    dice = entry["cells"]["CHAOST2_setting1"]["dice_percent"]
    rows = {name: dice[name]["by_fold"]["0"] for name in ABLATION_ROWS if "0" in dice.get(name, {}).get("by_fold", {})}
    result = {"name": "ablation", "regime": "pretrained", "encoder": entry.get("encoder", {}).get("source"),
              "fold": 0, "steps": PRETRAINED_STEPS, "lr": entry.get("lr", {}).get("chosen", {}),
              "keys": {name: list(keys) for name, keys in ABLATIONS.items()}, "rows": rows, **machine()}
    organs = list(dict.fromkeys(k for row in rows.values() for k in row if k not in (*PER_SEED_KEYS, "status")))
    lines = ["# QAMP's components, its ancestors and the baselines (CHAOST2 Setting 1, fold 0)", "",
             f"The shared pre-trained encoder ({result['encoder']}), {PRETRAINED_STEPS} steps, each method at its own "
             "rate (the QAMP variants at QAMP's), supports 0-2; command: `python bench/cpu_budget_table.py "
             "pretrained`. Dice (%) on the native grid.", "",
             "| row | keys | " + " | ".join(organs) + " | mean | training (s) |", "|---|---|" + "---:|" * (len(organs) + 2)]
    for name, row in rows.items():
        keys = " ".join(ABLATIONS.get(name, ("qnet_refine_iters=0",) if name == UNREFINED else ()))
        lines.append(f"| {name} | {keys} | " + " | ".join(str(row.get(o, '')) for o in organs)
                     + f" | {row['mean']}{' (collapsed)' if row.get('status') == 'collapsed' else ''} | "
                     f"{row.get('train_s', '')} |")
    curves = {name: row["val_curve"] for name, row in rows.items() if row.get("val_curve")}
    if curves:
        plot_curves(curves, "ablation, fold 0 (pre-trained encoder)", results_dir / "ablation.png")
        lines += ["", "![validation curves](ablation.png)"]
    write_text(results_dir / "ablation.md", "\n".join(lines) + "\n")
    write_json(results_dir / "ablation.json", result)  # collect prints its own JSON line
    return result


def two_best(entry: dict) -> list[str] | None:
    """The two trained methods with the highest five-fold mean, once every method has every fold."""
    dice = entry.get("cells", {}).get("CHAOST2_setting1", {}).get("dice_percent", {})
    complete = {m: e["mean"] for m, e in dice.items() if m in PRETRAINED_METHODS and len(e["per_fold"]) == len(PRETRAINED_FOLDS)}
    if len(complete) < len(PRETRAINED_METHODS):
        return None
    return sorted(complete, key=complete.get, reverse=True)[:2]


def write_pretrained(results_dir: Path, entry: dict) -> None:
    """Put ``entry`` under "pretrained" in the results JSON, keeping everything else in it."""
    path = results_dir / "cpu_budget_table.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"name": "cpu_budget_table", "cells": {}}
    data["pretrained"] = entry
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


# Straight through: the scheduler of the pre-trained regime (collect, plan, start on free cores, wait).
def pretrained(args: argparse.Namespace) -> dict:
    """Run or resume the pre-trained regime, then collect it into the results JSON."""
    root, results_dir = Path(args.dir).resolve(), Path(args.results)
    started: dict[int, tuple[subprocess.Popen, Job, dict]] = {}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    slots = cores[:args.slots or len(cores)]
    launched: set[str] = set()
    while True:
        earlier = json.loads((results_dir / "cpu_budget_table.json").read_text(encoding="utf-8")) \
            if (results_dir / "cpu_budget_table.json").is_file() else {}
        entry = pretrained_collect(root, earlier.get("pretrained", {}))
        if not args.dry_run and json.loads(json.dumps(entry)) != earlier.get("pretrained"):
            write_pretrained(results_dir, entry)  # each finished unit lands at once; unchanged polls write nothing
        gate = None if args.past_gate else encoder_gate(entry, earlier.get("cells", {}))
        jobs = pretrained_jobs(entry, two_best(entry), closed=gate is not None)
        done = {job.name for job in jobs if job_finished(job, root, entry)}
        waiting = [job for job in jobs if job.name not in done]
        encoders = {s: encoder_file(root / "pretrained" / "encoders" / s) for s in ENCODER_SOURCES}
        if args.dry_run:
            for job in waiting:
                ready = all(n in done or n not in {j.name for j in jobs} for n in job.needs)
                command = pretrained_command(job, root, args, entry, {k: v or "<encoder>" for k, v in encoders.items()})
                print(f"[{'ready' if ready else 'waits'}] {job.name}: " + " ".join(command))
            if gate is not None:
                print(f"[gate] nothing past the budget check is planned: {gate}")
            return entry
        names = {job.name for job in jobs}
        held = [job for job in waiting if job.name not in launched and held_elsewhere(root / job.folder)]
        ready = [job for job in waiting if job.name not in launched and job not in held
                 and all(n in done or n not in names for n in job.needs)]
        # a unit another process runs (e.g. of an earlier runner) takes its core too, and is waited for
        busy = {held_core(root / job.folder) for job in held} - {None}
        free = [s for s in slots if s not in started and s not in busy]
        for slot in free[:max(0, len(slots) - len(started) - len(held))]:
            if not ready:
                break
            job = ready.pop(0)
            process, record = start_unit(pretrained_command(job, root, args, entry, encoders), root / job.folder,
                                         slot, root)
            started[slot] = (process, job, record)
            launched.add(job.name)
            print(f"[pretrained] {job.name}: started on core {slot}", flush=True)
        if not started and not held:
            if waiting:
                stuck = ", ".join(job.name for job in waiting)
                raise SystemExit(f"[pretrained] nothing can start: {stuck} wait for units that failed; see their "
                                 f"sweep.log under {root / 'pretrained'}")
            if gate is not None:
                print(f"[pretrained] stopped after the budget check: {gate}", flush=True)
            return collect(args)["pretrained"]
        time.sleep(POLL_S)
        for slot, (process, job, record) in list(started.items()):
            if process.poll() is None:
                continue
            del started[slot]
            end_unit(process, record, root / job.folder)
            print(f"[pretrained] {job.name}: ended with {process.returncode}", flush=True)
            if process.returncode != 0:
                launched.add(job.name)  # not started again in this call; a new call retries it (resume)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("lr", "run", "collect", "pretrained"))
    parser.add_argument("--dir", default=str(REPO.parent / "runs" / "cpu_budget_table"),
                        help="grid folder, outside the clone [../runs/cpu_budget_table]")
    parser.add_argument("--data-dir", default=os.environ.get("QAMP_DATA_ROOT"),
                        help="data root holding CHAOST2/ and SABS/ [$QAMP_DATA_ROOT]")
    parser.add_argument("--results", default=str(REPO / "bench" / "results"), help="where collect writes")
    parser.add_argument("--slots", type=int, default=None, help="units at a time [one per core]")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dry-run", action="store_true", help="print the sweep commands, run nothing")
    parser.add_argument("--past-gate", action="store_true",
                        help="pretrained: run the grid even when the budget check says the encoder hurts")
    args = parser.parse_args(argv)
    if args.command != "collect" and not args.data_dir:
        parser.error("the data root is not set: pass --data-dir or export QAMP_DATA_ROOT=/path/to/data")
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    {"lr": lr_select, "run": run, "collect": collect, "pretrained": pretrained}[args.command](args)


if __name__ == "__main__":
    main()
