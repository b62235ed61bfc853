"""Run a grid of train.py / test.py runs (a paper table) on one machine or a SLURM cluster.

    python -m tools.sweep --out runs/table1 --configs abd_mri,abd_ct,prostate_mri --settings 1,2 \\
        --folds 0,1,2,3,4 --supports 0,1,2 --executor local                    # one run per GPU
    python -m tools.sweep --out runs/table1 ... --executor slurm --slurm partition=gpu --time-min 2880
    python -m tools.sweep --out runs/table1 ... --dry-run                      # print cells and commands

Grid. Every combination of ``--configs`` (named configs of config.py; ``a+b`` applies several;
none given: the config's defaults), ``--settings``, ``--folds``, ``--seeds`` and every positional
``KEY=V1,V2`` (any Sacred key; commas inside brackets or quotes do not split, e.g.
``test_label=[1,2],[3]``) is a **train cell**; each train cell has one **test cell** per
``--supports`` index, run after it (test-after-train) with ``reload_model_path`` = the cell's
finished training run. ``--train KEY=V`` / ``--test KEY=V`` add fixed keys to one kind of cell; grid
keys only training reads (``engine.snapshot_config.TRAINING_ONLY_KEYS``, e.g. ``n_steps``) go to the
training cells only (test.py refuses them).
Cell ``c`` uses ``path.log_dir = <out>/cells/<c>``, so its run folder is
``<out>/cells/<c>/train_<dataset>_setting<k>_fold<f>[_n]`` (``test_...`` for test cells); its
command's output goes to ``<out>/cells/<c>/cell.log`` and its status to ``cell.json``.

Resume. Running the same command again skips every finished cell: a training cell whose run
folder has ``snapshots/final.pth`` and Sacred's ``run.json`` with status COMPLETED, a test cell
whose run folder has ``summary.json`` and COMPLETED. A failed or killed training cell is rerun with
``resume=`` its newest snapshot (training continues exactly: same losses as without the break);
a failed test cell is rerun. A cell being run by another sweep (lock file ``.lock``) is left alone.
At the end the finished test cells are summarised with ``tools.summarize``: one table per entry of
``--configs`` (rows: setting and the other grid keys; pooled over folds, supports and seeds) in
``<out>/summary/<config>/summary.md``, all tables in ``<out>/summary.md``.

Executors.

* ``local``: N cells at a time on this machine. With GPUs, the GPUs this process was given (its
  ``CUDA_VISIBLE_DEVICES`` entries, as written: ids, UUIDs or MIG names; all GPUs torch sees when it
  is unset), or those of them that ``--gpus`` picks by position (``--gpus 0,2``: the first and third
  of them, torch's ``cuda:0`` and ``cuda:2`` here). Each running cell holds its own GPUs and sees
  only them (its ``CUDA_VISIBLE_DEVICES`` lists their entries): a test cell one GPU, a training cell
  one, or K with ``--nproc-per-node K`` (``torchrun``); every process gets ``OMP_NUM_THREADS = cores /
  GPUs``. On a CPU ``--jobs N`` cells (default 1), each with ``OMP_NUM_THREADS = cores / N`` (per
  rank: ``/ K``) so that concurrent runs do not oversubscribe the cores, and ``CUDA_VISIBLE_DEVICES``
  empty.
* ``slurm``: through ``submitit``: one job array for the training cells, then per training cell a
  job array of its test cells with ``--dependency=afterok:<train job>``, and a last CPU job
  (``afterany``) that writes the summary. Resources from ``--gpus-per-job``, ``--cpus-per-job``,
  ``--mem-gb``, ``--time-min`` / ``--test-time-min`` and any ``--slurm KEY=VALUE`` (submitit's
  ``slurm_<KEY>``: partition, account, qos, constraint, ...). The command returns once submitted
  (``--wait``: it waits, submitting test arrays as trainings finish, and summarises itself).
  submitit's own logs go to ``<out>/submitit/``.
* ``submitit-local``: submitit's LocalExecutor (processes on this machine, same code path as
  ``slurm --wait``; every job of an array starts at once and sees the same first GPUs), for trying a
  grid before sending it to a cluster.

Sacred observers: ``-F DIR``, ``-m MONGO_URL``, ``-s SQL_URL`` are passed to every cell's command.

A cell is known by its place in the grid (its id), not by its fixed keys: to rerun a finished grid
with other fixed values (say another ``n_steps``), give it another ``--out``.
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
EXECUTORS = ("local", "slurm", "submitit-local")
CELL_LOG, CELL_STATE, CELL_LOCK = "cell.log", "cell.json", ".lock"


# ----------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on top-level commas (not inside ``[]``, ``()``, ``{}`` or quotes)."""
    values, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    values.append("".join(current))
    return [v.strip() for v in values if v.strip()]


def parse_int_list(text: str) -> list[int]:
    """``'0,1,2'`` or ``'0-4'`` (ranges inclusive) -> ints."""
    out: list[int] = []
    for part in split_values(text):
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = map(int, part.split("-"))
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    return out


def parse_assignment(text: str) -> tuple[str, list[str]]:
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise ValueError(f"{text!r}: expected KEY=VALUE[,VALUE...] (a Sacred config key)")
    return key, split_values(value)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_")


@dataclass
class Cell:
    """One train.py or test.py run of the grid."""

    id: str
    kind: str  # 'train' | 'test'
    args: list[str]  # Sacred arguments after 'with' (named configs and KEY=VALUE)
    log_dir: str
    group: str  # table the cell belongs to (its --configs entry)
    method: str  # row of the table (setting + other grid keys)
    train: Optional[str] = None  # for test cells: the training cell
    nproc: int = 1  # torchrun processes of a training cell


@dataclass
class Spec:
    """Everything a cell runner needs (written to ``<out>/sweep.json``)."""

    out: str
    python: str
    observer_flags: list[str]
    cells: dict[str, Cell] = field(default_factory=dict)

    def save(self) -> Path:
        path = Path(self.out) / "sweep.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**asdict(self), "cells": {k: asdict(c) for k, c in self.cells.items()}},
                                  indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Spec":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(raw["out"], raw["python"], raw["observer_flags"],
                   {k: Cell(**c) for k, c in raw["cells"].items()})


_CONFIG_NAMES = """
import json, config
def flat(c, prefix=""):
    for k, v in c.items():
        yield prefix + k
        if isinstance(v, dict):
            yield from flat(v, prefix + k + ".")
print(json.dumps({"keys": sorted(flat(config.resolve_config([], {}))), "named": sorted(config.ex.named_configs)}))
"""


def config_names(python: str = sys.executable) -> tuple[set[str], set[str]]:
    """Every key of ``config.py`` (dotted: ``optim.lr``) and its named configs, read in a child process
    of this interpreter (``config.py`` is a script, which a package does not import; ``--python`` may
    be a stand-in)."""
    done = subprocess.run([python, "-c", _CONFIG_NAMES], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"could not read the keys of config.py with {python}: {done.stderr.strip().splitlines()[-1:]}")
    names = json.loads(done.stdout.strip().splitlines()[-1])
    return set(names["keys"]), set(names["named"])


def check_known_keys(keys: Sequence[str], named_configs: Sequence[str], python: str = sys.executable) -> None:
    """Refuse (``ValueError``, one line naming the nearest known name) a grid or fixed key that is not
    a key of ``config.py``, or a named config it does not define, before any cell is planned: a
    misspelled key would otherwise fail in every cell once started (on SLURM, after a queue wait)."""
    import difflib

    known, named = config_names(python)
    for kind, names, universe in (("named config", named_configs, named), ("config key", keys, known)):
        for name in names:
            if name not in universe:
                near = difflib.get_close_matches(name, sorted(universe), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"{name!r} is not a {kind} of config.py{hint} "
                                 f"(python train.py print_config lists the keys)")


def expand_grid(out: str | os.PathLike, configs: Sequence[str], settings: Sequence[int], folds: Sequence[int],
                supports: Sequence[int], seeds: Sequence[int], grid: Sequence[str] = (),
                train_args: Sequence[str] = (), test_args: Sequence[str] = (), nproc: int = 1) -> dict[str, Cell]:
    """The cells of the grid, training cells first (see the module docstring)."""
    from engine.snapshot_config import TRAINING_ONLY_KEYS

    out = Path(out).resolve()
    axes = [parse_assignment(a) for a in grid]
    check_known_keys([k for k, _ in axes] + [a.partition("=")[0] for a in (*train_args, *test_args)],
                     [c for config in configs for c in config.split("+") if c])
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a grid key is given twice: {keys}")
    for reserved in ("setting", "eval_fold", "seed", "supp_idx", "path.log_dir", "resume", "reload_model_path"):
        if reserved in keys:
            raise ValueError(f"{reserved}=... is set by the sweep itself; use --settings / --folds / --seeds / "
                             f"--supports (path.log_dir is --out)")
    cells: dict[str, Cell] = {}
    tests: list[Cell] = []
    for config in configs or [""]:
        named = [c for c in config.split("+") if c]
        group = config or "default"
        for setting, values, seed, fold in itertools.product(settings, itertools.product(*[v for _, v in axes]),
                                                             seeds, folds):
            assigned = [f"{k}={v}" for k, v in zip(keys, values)]
            varying = [(k, v) for (k, vs), v in zip(axes, values) if len(vs) > 1]  # single values: fixed keys
            method = " ".join([f"setting{setting}", *(f"{k}:{v}" for k, v in varying)])  # no "=" (summarize)
            train_id = slug("-".join([group, f"setting{setting}", *(f"{k}_{v}" for k, v in varying),
                                      f"seed{seed}", f"fold{fold}"]))
            common = [*named, f"setting={setting}", *assigned, f"seed={seed}", f"eval_fold={fold}"]
            cells[train_id] = Cell(train_id, "train", [*common, *train_args], str(out / "cells" / train_id),
                                   group, method, nproc=nproc)
            testing = [a for a in common if a.split("=", 1)[0].split(".")[0] not in TRAINING_ONLY_KEYS]
            for supp in supports:
                test_id = f"{train_id}-supp{supp}"
                tests.append(Cell(test_id, "test", [*testing, f"supp_idx={supp}", *test_args],
                                  str(out / "cells" / test_id), group, method, train=train_id))
    cells.update((c.id, c) for c in tests)
    return cells


# ----------------------------------------------------------------------------------------------
# Cell state (from the run folders: robust to killed sweeps)
# ----------------------------------------------------------------------------------------------
def _suffix(name: str) -> int:
    match = re.search(r"_(\d+)$", name)  # '<name>_<n>' (the n-th run of a name); '..._fold0' is 1
    return int(match.group(1)) if match else 1


def run_folders(cell: Cell) -> list[Path]:
    """The cell's run folders (``<kind>_*`` holding Sacred's run.json), oldest first."""
    root = Path(cell.log_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{cell.kind}_*") if p.is_dir()]
    return sorted(found, key=lambda p: (_suffix(p.name), p.name))


def _completed(folder: Path) -> bool:
    try:
        return json.loads((folder / "run.json").read_text(encoding="utf-8")).get("status") == "COMPLETED"
    except (OSError, ValueError):
        return False


def finished_run(cell: Cell) -> Optional[Path]:
    """The cell's finished run folder, or None."""
    marker = "snapshots/final.pth" if cell.kind == "train" else "summary.json"
    for folder in reversed(run_folders(cell)):
        if (folder / marker).is_file() and _completed(folder):
            return folder
    return None


def resume_snapshot(cell: Cell) -> Optional[Path]:
    """The newest intermediate snapshot of an unfinished training cell (None: start afresh)."""
    from engine.snapshot import intermediate_snapshots

    best: tuple[int, Optional[Path]] = (-1, None)
    for folder in run_folders(cell):
        for path in intermediate_snapshots(folder):
            step = int(re.search(r"step_(\d+)", path.name).group(1))
            if step > best[0]:
                best = (step, path)
    return best[1]


def cell_command(spec: Spec, cell: Cell, dry_run: bool = False) -> list[str]:
    """The command of a cell as it would run now (dry run: placeholders for unknown paths)."""
    script = "train.py" if cell.kind == "train" else "test.py"
    launcher = [spec.python]
    if cell.kind == "train" and cell.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cell.nproc}"]
    args = [*cell.args, f"path.log_dir={cell.log_dir}"]
    if cell.kind == "train":
        snapshot = resume_snapshot(cell)
        if snapshot is not None:
            args.append(f"resume={snapshot}")
    else:
        trained = finished_run(spec.cells[cell.train])
        if trained is None and not dry_run:
            raise RuntimeError(f"cell {cell.id}: its training cell {cell.train} has not finished")
        args.append(f"reload_model_path={trained if trained else '<run folder of ' + cell.train + '>'}")
    return [*launcher, script, *spec.observer_flags, "with", *args]


def _write_state(cell: Cell, **state: Any) -> None:
    path = Path(cell.log_dir) / CELL_STATE
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    old.update(state, cell=cell.id, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(old, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def run_cell(spec: Spec | str, cell_id: str, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run one cell to its end (the job of every executor); never raises for a failed run.

    Returns ``{'cell', 'status': 'done'|'skipped'|'failed'|'blocked'|'busy', 'returncode', 'run'}``.
    """
    spec = Spec.load(spec) if not isinstance(spec, Spec) else spec
    cell = spec.cells[cell_id]
    done = finished_run(cell)
    if done is not None:
        return {"cell": cell_id, "status": "skipped", "returncode": 0, "run": str(done)}
    if cell.kind == "test" and finished_run(spec.cells[cell.train]) is None:
        return {"cell": cell_id, "status": "blocked", "returncode": None, "run": None}
    Path(cell.log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cell.log_dir) / CELL_LOCK, "w", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return {"cell": cell_id, "status": "busy", "returncode": None, "run": None}
        command = cell_command(spec, cell)
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH")]))
        attempts = 1
        try:
            attempts = json.loads((Path(cell.log_dir) / CELL_STATE).read_text(encoding="utf-8")).get("attempts", 0) + 1
        except (OSError, ValueError):
            pass
        with open(Path(cell.log_dir) / CELL_LOG, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempts} on {socket.gethostname()}: "
                      f"{shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT)
            _write_state(cell, status="running", pid=process.pid, host=socket.gethostname(), attempts=attempts,
                         command=command, env={k: v for k, v in (env or {}).items()})
            try:
                returncode = process.wait()
            except BaseException:  # the runner itself is stopped: stop the run too
                process.terminate()
                raise
        finished = finished_run(cell)
        status = "done" if returncode == 0 and finished is not None else "failed"
        _write_state(cell, status=status, returncode=returncode, run=str(finished) if finished else None)
        return {"cell": cell_id, "status": status, "returncode": returncode,
                "run": str(finished) if finished else None}


# ----------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------
def visible_gpus(environ: Optional[dict[str, str]] = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: the parent's list when the
    variable is set (entries as written: ids, ``GPU-<uuid>``, ``MIG-<uuid>``; empty: none), else
    ``0 .. N-1`` for the N GPUs torch sees (physical ids then)."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class LocalSlots:
    """What the local executor hands out. With GPUs, ``units`` are ``CUDA_VISIBLE_DEVICES`` entries and
    a cell holds as many as it runs processes on (:meth:`need`); on a CPU, ``units`` are the ``--jobs``
    concurrent cells. ``threads``: OMP / MKL threads per process; ``max_cells``: ``--jobs`` with GPUs."""

    units: list[str]
    gpu: bool
    threads: int
    max_cells: Optional[int] = None

    def need(self, cell: Cell) -> int:
        """GPUs of a cell: its torchrun processes for a training cell, one for a test cell; a CPU slot: 1."""
        return (cell.nproc if cell.kind == "train" else 1) if self.gpu else 1

    def env(self, units: Sequence[str]) -> dict[str, str]:
        """The environment of a cell holding ``units``: it sees only its GPUs (none on a CPU)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(units) if self.gpu else "", "OMP_NUM_THREADS": str(self.threads),
                "MKL_NUM_THREADS": str(self.threads)}


def local_slots(jobs: Optional[int], gpus: Optional[Sequence[str]], nproc: int,
                environ: Optional[dict[str, str]] = None) -> LocalSlots:
    """GPUs or CPU slots of the local executor (see the module docstring).

    Args:
        jobs: ``--jobs`` (cells at a time; on a CPU default 1).
        gpus: ``--gpus`` as positions in :func:`visible_gpus` (None: all of them; empty: none, CPU).
        nproc: ``--nproc-per-node`` (GPUs, or CPU ranks, of a training cell).

    Raises:
        ValueError: a position outside the visible GPUs, or fewer GPUs than one training cell needs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    visible = visible_gpus(environ)
    if gpus is None:
        chosen = visible
    else:
        outside = [g for g in gpus if not (g.isdigit() and int(g) < len(visible))]
        if outside:
            raise ValueError(f"--gpus {','.join(gpus)}: positions among the {len(visible)} GPU(s) this process sees "
                             f"({visible}) are 0..{len(visible) - 1}; {outside} is not")
        chosen = [visible[int(g)] for g in gpus]
    if chosen:
        per = max(1, nproc)
        if len(chosen) < per:
            raise ValueError(f"{len(chosen)} GPU(s) cannot hold one cell of {per} GPU(s)")
        return LocalSlots(list(chosen), True, max(1, cores // len(chosen)), jobs)
    n = jobs or 1
    return LocalSlots([str(i) for i in range(n)], False, max(1, cores // (n * max(1, nproc))))


def run_local(spec: Spec, slots: LocalSlots, log=print) -> dict[str, dict]:
    """Run every unfinished cell, as many at a time as ``slots`` hold, tests after their training."""
    results: dict[str, dict] = {}
    pending = [c for c in spec.cells.values()]
    free = list(slots.units)
    running: dict[Future, tuple[Cell, list[str]]] = {}
    limit = slots.max_cells or len(slots.units)
    with ThreadPoolExecutor(max_workers=limit) as pool:
        while pending or running:
            for cell in list(pending):
                if len(running) >= limit or slots.need(cell) > len(free):
                    continue
                if cell.kind == "test":
                    state = results.get(cell.train, {}).get("status")
                    if state in ("failed", "blocked", "busy"):
                        pending.remove(cell)
                        results[cell.id] = {"cell": cell.id, "status": "blocked", "returncode": None, "run": None}
                        log(f"[sweep] {cell.id}: blocked (training cell {state})")
                        continue
                    if finished_run(spec.cells[cell.train]) is None:
                        continue
                pending.remove(cell)
                if finished_run(cell) is not None:
                    results[cell.id] = {"cell": cell.id, "status": "skipped", "returncode": 0,
                                        "run": str(finished_run(cell))}
                    log(f"[sweep] {cell.id}: finished before, skipped")
                    continue
                held, free = free[:slots.need(cell)], free[slots.need(cell):]
                env = slots.env(held)
                where = f"GPU {','.join(held)}" if slots.gpu else f"CPU slot {held[0]}"
                log(f"[sweep] {cell.id}: start ({where}: {env})")
                running[pool.submit(run_cell, spec, cell.id, env)] = (cell, held)
            if not running:
                if pending:  # tests waiting for a training cell that nobody runs
                    for cell in pending:
                        results[cell.id] = {"cell": cell.id, "status": "blocked", "returncode": None, "run": None}
                    pending.clear()
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell, held = running.pop(future)
                free.extend(held)
                try:
                    results[cell.id] = future.result()
                except Exception as err:  # the runner failed before or around the run (e.g. a full disk)
                    results[cell.id] = {"cell": cell.id, "status": "failed", "returncode": None, "run": None,
                                        "error": f"{err.__class__.__name__}: {err}"}
                log(f"[sweep] {cell.id}: {results[cell.id]['status']} (rc {results[cell.id]['returncode']})")
    return results


def _submitit_executor(args, cluster: str, kind: str):
    import submitit

    executor = submitit.AutoExecutor(folder=Path(args.out) / "submitit" / "%j", cluster=cluster)
    params: dict[str, Any] = {"timeout_min": args.time_min if kind == "train" else args.test_time_min,
                              "cpus_per_task": args.cpus_per_job, "mem_gb": args.mem_gb,
                              "name": f"qamp-{kind}", "nodes": 1, "tasks_per_node": 1}
    gpus = args.gpus_per_job * (args.nproc_per_node if kind == "train" else 1)
    if cluster == "local":  # submitit's LocalExecutor shows every job the first `gpus` GPUs of the machine
        import torch
        params["gpus_per_node"] = min(gpus, torch.cuda.device_count())
    if cluster == "slurm":
        params["gpus_per_node"] = gpus
        params["slurm_array_parallelism"] = args.max_parallel
        for item in args.slurm:
            key, _, value = item.partition("=")
            params[f"slurm_{key}"] = int(value) if value.isdigit() else value
    executor.update_parameters(**params)
    return executor


def run_submitit(spec: Spec, args, cluster: str, log=print) -> Optional[dict[str, dict]]:
    """Submit the grid through submitit; waits (and returns the results) unless slurm without --wait."""
    from tools import sweep as module  # pickled by reference (not __main__) for the jobs

    spec_path = str(spec.save())
    threads = {"train": max(1, args.cpus_per_job // max(1, args.nproc_per_node)), "test": args.cpus_per_job}

    def env(cell: Cell) -> dict[str, str]:  # torch threads = the job's CPUs (per torchrun rank)
        return {"OMP_NUM_THREADS": str(threads[cell.kind]), "MKL_NUM_THREADS": str(threads[cell.kind])}

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    trains = [c for c in spec.cells.values() if c.kind == "train" and finished_run(c) is None]
    tests_of = {c.id: [t for t in spec.cells.values() if t.train == c.id and finished_run(t) is None]
                for c in spec.cells.values() if c.kind == "train"}
    train_ex = _submitit_executor(args, cluster, "train")
    with train_ex.batch():
        train_jobs = {c.id: train_ex.submit(module.run_cell, spec_path, c.id, env(c)) for c in trains}
    log(f"[sweep] submitted {len(train_jobs)} training cell(s): " + ", ".join(
        f"{k}={j.job_id}" for k, j in train_jobs.items()))
    ready = [t for c in spec.cells.values() if c.kind == "train" and c.id not in train_jobs for t in tests_of[c.id]]

    def submit_tests(cells: list[Cell], dependency: Optional[str] = None) -> list[tuple[str, Any]]:
        if not cells:
            return []
        test_ex = _submitit_executor(args, cluster, "test")
        if dependency and cluster == "slurm":
            test_ex.update_parameters(slurm_additional_parameters={"dependency": dependency})
        with test_ex.batch():
            jobs = [(c.id, test_ex.submit(module.run_cell, spec_path, c.id, env(c))) for c in cells]
        log(f"[sweep] submitted {len(jobs)} test cell(s){' after ' + dependency if dependency else ''}")
        return jobs

    test_jobs = submit_tests(ready)
    if cluster == "slurm" and not args.wait:
        for train_id, job in train_jobs.items():
            test_jobs += submit_tests(tests_of[train_id], f"afterok:{job.job_id}")
        _submit_summary(args, cluster, module, spec_path, [*train_jobs.values(), *(job for _, job in test_jobs)], log)
        return None

    results: dict[str, dict] = {}
    waiting = dict(train_jobs)
    while waiting:
        for train_id, job in list(waiting.items()):
            if job.done():
                waiting.pop(train_id)
                results[train_id] = _job_result(job, train_id)
                log(f"[sweep] {train_id}: {results[train_id]['status']}")
                if results[train_id]["status"] in ("done", "skipped"):
                    test_jobs += submit_tests(tests_of[train_id])
                else:
                    for t in tests_of[train_id]:
                        results[t.id] = {"cell": t.id, "status": "blocked", "returncode": None, "run": None}
        time.sleep(1.0)
    for cell_id, job in test_jobs:
        results[cell_id] = _job_result(job, cell_id)
        log(f"[sweep] {cell_id}: {results[cell_id]['status']}")
    return results


def _submit_summary(args, cluster: str, module, spec_path: str, jobs: list, log=print) -> None:
    """The SLURM job that writes the sweep's tables once every job in ``jobs`` has ended."""
    summary_ex = _submitit_executor(args, cluster, "summary")
    summary_ex.update_parameters(timeout_min=30, gpus_per_node=0, cpus_per_task=1, mem_gb=4)
    if jobs:
        summary_ex.update_parameters(slurm_additional_parameters={"dependency": "afterany:" + ":".join(
            j.job_id for j in jobs)})
    job = summary_ex.submit(module.summarize_sweep, spec_path)
    log(f"[sweep] submitted the summary job {job.job_id}; rerun this command to resume failed cells")


def _job_result(job, cell_id: str) -> dict:
    try:
        return job.result()
    except Exception as err:  # the job itself died (killed, out of time, out of memory)
        return {"cell": cell_id, "status": "failed", "returncode": None, "run": None,
                "error": f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def summarize_sweep(spec: Spec | str) -> Optional[Path]:
    """``tools.summarize`` per ``--configs`` entry over the finished test cells; returns summary.md."""
    from tools import summarize

    spec = Spec.load(spec) if not isinstance(spec, Spec) else spec
    out = Path(spec.out)
    groups: dict[str, list[str]] = {}
    for cell in spec.cells.values():
        if cell.kind == "test" and (folder := finished_run(cell)) is not None:
            groups.setdefault(cell.group, []).append(f"{cell.method}={folder}")
    if not groups:
        return None
    parts = []
    for group, runs in groups.items():
        target = out / "summary" / slug(group)
        code = summarize.main([*runs, "--out", str(target), "--overwrite"])
        if code == 0:
            parts.append(f"## {group}\n\n" + (target / "summary.md").read_text(encoding="utf-8"))
    path = out / "summary.md"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def report(results: dict[str, dict], log=print) -> int:
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    log("[sweep] cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    bad = [r for r in results.values() if r["status"] in ("failed", "blocked", "busy")]
    for r in bad:
        log(f"[sweep]   {r['status']}: {r['cell']}" + (f" ({r.get('error')})" if r.get("error") else ""))
    if bad:
        log("[sweep] rerun the same command to resume: finished cells are skipped, trainings continue "
            "from their last snapshot (logs: <out>/cells/<cell>/cell.log)")
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See python -m pydoc tools.sweep for the grid, resume and executors.")
    parser.add_argument("grid", nargs="*", metavar="KEY=V1,V2", help="extra grid axes (or fixed keys)")
    parser.add_argument("--out", required=True, help="sweep folder (cells/, summary/, sweep.json)")
    parser.add_argument("--configs", default="", help="named configs, comma separated (a+b: several at once)")
    parser.add_argument("--settings", default="1", help="settings, e.g. 1,2")
    parser.add_argument("--folds", default="0-4", help="test folds, e.g. 0,1,2,3,4 or 0-4")
    parser.add_argument("--supports", default="2", help="support indices of the test cells, e.g. 0,1,2")
    parser.add_argument("--seeds", default="2025", help="run seeds (training and test)")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=V", help="fixed key of training cells")
    parser.add_argument("--test", action="append", default=[], metavar="KEY=V", help="fixed key of test cells")
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and their commands, run nothing")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the cells [this one]")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="torchrun processes (GPUs) per training cell")
    local = parser.add_argument_group("local executor")
    local.add_argument("--jobs", type=int, default=None,
                       help="cells at a time [as many as the GPUs hold, or 1 on a CPU]")
    local.add_argument("--gpus", default=None,
                       help="GPUs to use, by position among those this process sees (CUDA_VISIBLE_DEVICES), "
                            "e.g. 0,1 [all]; '' for none")
    slurm = parser.add_argument_group("slurm / submitit-local executors")
    slurm.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per cell (x nproc-per-node for training)")
    slurm.add_argument("--cpus-per-job", type=int, default=8)
    slurm.add_argument("--mem-gb", type=int, default=32)
    slurm.add_argument("--time-min", type=int, default=24 * 60, help="time limit of a training cell")
    slurm.add_argument("--test-time-min", type=int, default=120, help="time limit of a test cell")
    slurm.add_argument("--max-parallel", type=int, default=64, help="array tasks running at once")
    slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="submitit slurm_<KEY> parameter, e.g. partition=gpu, account=..., qos=...")
    slurm.add_argument("--wait", action="store_true", help="slurm: stay until every cell ended, then summarise")
    observers = parser.add_argument_group("Sacred observers (passed to every cell)")
    observers.add_argument("-F", "--file_storage", metavar="DIR")
    observers.add_argument("-m", "--mongo_db", metavar="MONGO_URL")
    observers.add_argument("-s", "--sql", metavar="SQL_URL")
    return parser.parse_args(argv)


def build_spec(args: argparse.Namespace) -> Spec:
    flags: list[str] = []
    for flag, value in (("-F", args.file_storage), ("-m", args.mongo_db), ("-s", args.sql)):
        if value:
            flags += [flag, str(Path(value).resolve()) if flag == "-F" else value]
    cells = expand_grid(args.out, split_values(args.configs), parse_int_list(args.settings),
                        parse_int_list(args.folds), parse_int_list(args.supports), parse_int_list(args.seeds),
                        args.grid, args.train, args.test, args.nproc_per_node)
    return Spec(str(Path(args.out).resolve()), args.python, flags, cells)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        spec = build_spec(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in spec.cells.values():
            state = "finished" if finished_run(cell) else "to run"
            print(f"{cell.kind} {cell.id} [{state}]\n    {shlex.join(cell_command(spec, cell, dry_run=True))}")
        n_train = sum(c.kind == "train" for c in spec.cells.values())
        print(f"{n_train} training cell(s), {len(spec.cells) - n_train} test cell(s)")
        return 0
    spec.save()
    if args.executor == "local":
        gpus = None if args.gpus is None else [g for g in args.gpus.split(",") if g]
        results = run_local(spec, local_slots(args.jobs, gpus, args.nproc_per_node))
    else:
        results = run_submitit(spec, args, "slurm" if args.executor == "slurm" else "local")
        if results is None:
            return 0
    summary = summarize_sweep(spec)
    if summary is not None:
        print(f"[sweep] table: {summary}")
    return report(results)


if __name__ == "__main__":
    sys.exit(main())
