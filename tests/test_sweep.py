"""tools.sweep: grid expansion, dry run, the local executor's scheduling (a stand-in interpreter) and
its GPUs (the parent's CUDA_VISIBLE_DEVICES entries, one per test cell, K per torchrun training), and
a tiny grid on the phantoms: a training cell killed mid-run under the local executor, then resumed
and tested through submitit's local executor, with Sacred's SQL and file observers on every cell
(read back afterwards)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import TINY_ARGS, make_phantoms  # noqa: E402
from tools import sweep  # noqa: E402
from engine.snapshot import load_snapshot  # noqa: E402


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms32"))


def grid_args(phantoms: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--gpus", "", *TINY_ARGS, f"data_dir={phantoms}", *extra]


# ----------------------------------------------------------------------------------------------
def test_split_and_ranges() -> None:
    assert sweep.split_values("0.1,0.01") == ["0.1", "0.01"]
    assert sweep.split_values("[1,2],[3]") == ["[1,2]", "[3]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    assert sweep.parse_int_list("0-2,4") == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_assignment("oops")


def test_grid_expansion(tmp_path: Path) -> None:
    cells = sweep.expand_grid(tmp_path, ["abd_mri", "abd_ct+setting2"], [1, 2], [0, 1], [0, 2], [7],
                              ["optim.lr=0.1,0.01", "backbone=resnet50"], ["n_steps=10"], ["n_part=1"])
    trains = [c for c in cells.values() if c.kind == "train"]
    tests = [c for c in cells.values() if c.kind == "test"]
    assert len(trains) == 2 * 2 * 2 * 2 and len(tests) == 2 * len(trains)
    assert list(cells)[:len(trains)] == [c.id for c in trains]  # trainings first
    cell = cells["abd_mri-setting2-optim.lr_0.01-seed7-fold1"]
    assert cell.args == ["abd_mri", "setting=2", "optim.lr=0.01", "backbone=resnet50", "seed=7", "eval_fold=1",
                         "n_steps=10"]
    assert cell.method == "setting2 optim.lr:0.01" and cell.group == "abd_mri"
    assert cell.log_dir == str(tmp_path.resolve() / "cells" / cell.id)
    test = cells[cell.id + "-supp2"]
    assert test.train == cell.id and test.args[-2:] == ["supp_idx=2", "n_part=1"]
    assert cells["abd_ct+setting2-setting1-optim.lr_0.1-seed7-fold0"].args[:2] == ["abd_ct", "setting2"]
    with pytest.raises(ValueError, match="set by the sweep itself"):
        sweep.expand_grid(tmp_path, [], [1], [0], [0], [1], ["eval_fold=1,2"])


@pytest.mark.parametrize("argv, message", [
    (["n_stepz=1,2"], "'n_stepz' is not a config key of config.py; did you mean 'n_steps'?"),
    (["--train", "optim.lrr=0.1"], "'optim.lrr' is not a config key of config.py; did you mean 'optim.lr'?"),
    (["--test", "supp_idxx=1"], "'supp_idxx' is not a config key of config.py; did you mean 'supp_idx'?"),
    (["--configs", "abd_mri+cpu_budgte"], "'cpu_budgte' is not a named config of config.py; did you mean 'cpu_budget'?"),
])
def test_unknown_keys_are_refused_before_anything_is_planned(tmp_path: Path, capsys, argv, message) -> None:
    capsys.readouterr()
    assert sweep.main(["--out", str(tmp_path / "grid"), "--dry-run", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "training cell(s)" not in captured.out and not (tmp_path / "grid").exists()


def test_dry_run_prints_cells_and_commands(tmp_path: Path, capsys) -> None:
    code = sweep.main(["--out", str(tmp_path), "--configs", "abd_mri", "--settings", "1,2", "--folds", "0",
                       "--supports", "0,1", "-s", "sqlite:///runs.db", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "2 training cell(s), 4 test cell(s)" in out
    assert "train.py -s sqlite:///runs.db with abd_mri setting=2 seed=2025 eval_fold=0" in out
    assert "'reload_model_path=<run folder of abd_mri-setting1-seed2025-fold0>'" in out
    assert not (tmp_path / "cells").exists()  # nothing ran


def _train_dir(out: Path, cell_id: str) -> Path:
    return out / "cells" / cell_id


FAKE_PYTHON = """#!/usr/bin/env python3
# A stand-in interpreter for the scheduling test: `FAKE train.py|test.py [-F DIR] with KEY=V ...`
# notes when it ran (times.json in the cell folder), sleeps a moment, then writes the run folder a
# finished run leaves (run.json COMPLETED + the final snapshot or summary.json); eval_fold=0 trainings
# fail instead.
import json, os, sys, time
script, args = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
start = time.time()
time.sleep(1.0)
json.dump({"start": start, "end": time.time()}, open(os.path.join(args["path.log_dir"], "times.json"), "w", encoding="utf-8"))
if script == "train.py" and args["eval_fold"] == "0":
    sys.exit(3)
kind = script[:-3]
folder = os.path.join(args["path.log_dir"], kind + "_fake")
os.makedirs(os.path.join(folder, "snapshots"), exist_ok=True)
open(os.path.join(folder, "snapshots/final.pth" if kind == "train" else "summary.json"), "w", encoding="utf-8").close()
json.dump({"status": "COMPLETED"}, open(os.path.join(folder, "run.json"), "w", encoding="utf-8"))
"""


def test_local_executor_runs_cells_side_by_side_and_isolates_a_failure(tmp_path: Path) -> None:
    """Scheduling alone (a stand-in interpreter, no training): two folds on two slots run at the same
    time; fold 0's training fails, so its test is blocked while fold 1 trains and tests; a rerun
    skips what finished and retries the failed cell."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON, encoding="utf-8")
    fake.chmod(0o755)
    out = tmp_path / "grid"
    argv = ["--out", str(out), "--gpus", "", "--folds", "0,1", "--supports", "0", "--jobs", "2",
            "--python", str(fake)]
    assert sweep.main(argv) == 1
    cells = out / "cells"
    state = {p.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in cells.glob("*/cell.json")}
    assert state["default-setting1-seed2025-fold0"]["status"] == "failed"
    assert state["default-setting1-seed2025-fold1"]["status"] == "done"
    assert state["default-setting1-seed2025-fold1-supp0"]["status"] == "done"
    assert "default-setting1-seed2025-fold0-supp0" not in state  # blocked: never started
    times = {p.parent.name[len("default-setting1-seed2025-"):]: json.loads(p.read_text(encoding="utf-8"))
             for p in cells.glob("*/times.json")}
    assert times["fold0"]["start"] < times["fold1"]["end"] and times["fold1"]["start"] < times["fold0"]["end"]  # together
    assert times["fold1-supp0"]["start"] >= times["fold1"]["end"]  # a test after its training
    assert sweep.main(argv) == 1  # rerun: fold 1 skipped, fold 0 retried (and fails again)
    for fold, attempts in ((0, 2), (1, 1)):
        cell_state = (cells / f"default-setting1-seed2025-fold{fold}" / "cell.json").read_text(encoding="utf-8")
        assert json.loads(cell_state)["attempts"] == attempts


def test_local_slots_are_the_gpus_the_parent_was_given(monkeypatch) -> None:
    """The parent's CUDA_VISIBLE_DEVICES entries (ids, UUIDs), --gpus as positions among them, one GPU
    per test cell and K per training cell with --nproc-per-node K; none: CPU slots."""
    parent = {"CUDA_VISIBLE_DEVICES": "2,GPU-0a1b,7"}
    slots = sweep.local_slots(None, None, 2, parent)
    assert slots.gpu and slots.units == ["2", "GPU-0a1b", "7"]
    train = sweep.Cell("t", "train", [], "", "g", "m", nproc=2)
    test = sweep.Cell("t-supp0", "test", [], "", "g", "m", train="t")
    assert (slots.need(train), slots.need(test)) == (2, 1)
    assert slots.env(["GPU-0a1b", "7"])["CUDA_VISIBLE_DEVICES"] == "GPU-0a1b,7"
    assert sweep.local_slots(None, ["1", "2"], 1, parent).units == ["GPU-0a1b", "7"]
    with pytest.raises(ValueError, match=r"positions among the 3 GPU\(s\).*\['3'\] is not"):
        sweep.local_slots(None, ["3"], 1, parent)
    with pytest.raises(ValueError, match="cannot hold one cell of 4 GPU"):
        sweep.local_slots(None, None, 4, parent)
    cpu = sweep.local_slots(2, None, 1, {"CUDA_VISIBLE_DEVICES": ""})
    assert not cpu.gpu and cpu.units == ["0", "1"] and cpu.need(train) == 1
    assert cpu.env(["0"])["CUDA_VISIBLE_DEVICES"] == ""
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sweep.local_slots(None, None, 1, {}).units == ["0", "1"]  # unset: the GPUs torch sees


GPU_PYTHON = """#!/usr/bin/env python3
# A stand-in interpreter: notes the cell's CUDA_VISIBLE_DEVICES, the script and when it ran, then
# writes the run folder a finished run leaves.
import json, os, sys, time
script = next(a for a in sys.argv[1:] if a.endswith(".py"))
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
start = time.time()
time.sleep(0.5)
json.dump({"gpus": os.environ["CUDA_VISIBLE_DEVICES"], "argv": sys.argv[1:], "start": start, "end": time.time()},
          open(os.path.join(args["path.log_dir"], "gpus.json"), "w", encoding="utf-8"))
kind = script[:-3]
folder = os.path.join(args["path.log_dir"], kind + "_fake")
os.makedirs(os.path.join(folder, "snapshots"), exist_ok=True)
open(os.path.join(folder, "snapshots/final.pth" if kind == "train" else "summary.json"), "w", encoding="utf-8").close()
json.dump({"status": "COMPLETED"}, open(os.path.join(folder, "run.json"), "w", encoding="utf-8"))
"""


def test_local_executor_gives_each_cell_its_own_gpus(tmp_path: Path, monkeypatch) -> None:
    """Under CUDA_VISIBLE_DEVICES=5,7 with --nproc-per-node 2: each training cell holds both GPUs
    (torchrun, 2 processes), each test cell one of them, two tests run at once, and cells that run
    at the same time never share a GPU."""
    fake = tmp_path / "fake_python"
    fake.write_text(GPU_PYTHON, encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    out = tmp_path / "grid"
    assert sweep.main(["--out", str(out), "--folds", "0,1", "--supports", "0,1", "--nproc-per-node", "2",
                       "--python", str(fake)]) == 0
    cells = {p.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in (out / "cells").glob("*/gpus.json")}
    assert len(cells) == 6
    for name, cell in cells.items():
        if name.endswith(("fold0", "fold1")):
            assert cell["gpus"] == "5,7" and "--nproc_per_node=2" in cell["argv"]
        else:
            assert cell["gpus"] in ("5", "7") and "torch.distributed.run" not in cell["argv"]
    runs = list(cells.values())
    overlapping = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping  # tests side by side, one GPU each
    for a, b in overlapping:
        assert not set(a["gpus"].split(",")) & set(b["gpus"].split(","))


def test_kill_resume_through_submitit_with_observers(phantoms: Path, tmp_path: Path, capsys) -> None:
    """The real programs, with Sacred's SQL and file observers on every cell: a training cell killed
    (local executor) after its first snapshot fails and blocks its test; the rerun, through submitit's
    local executor, resumes it from the snapshot (new run folder, same loss prefix), tests it and
    writes the table; a third run finds everything finished."""
    import sqlalchemy as sa

    out, db = tmp_path / "grid", tmp_path / "runs.db"
    args = grid_args(phantoms, out, "--folds", "0", "--supports", "0", "-F", str(tmp_path / "sacred_files"),
                     "-s", f"sqlite:///{db}", "--cpus-per-job", "1", "--mem-gb", "2",
                     "--train", "n_steps=6", "--train", "save_snapshot_every=2", "--train", "keep_snapshots=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-m", "tools.sweep", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8")
    victim = _train_dir(out, "default-setting1-seed2025-fold0")
    deadline = time.time() + 240
    while not list(victim.glob("train_*/snapshots/step_*.pth")):
        assert driver.poll() is None and time.time() < deadline, "no snapshot before the grid ended"
        time.sleep(0.05)
    os.kill(json.loads((victim / "cell.json").read_text(encoding="utf-8"))["pid"], signal.SIGKILL)
    log, _ = driver.communicate(timeout=240)
    assert driver.returncode == 1, log
    assert "default-setting1-seed2025-fold0: failed" in log
    assert "blocked: default-setting1-seed2025-fold0-supp0" in log
    killed = load_snapshot(next(victim.glob("train_*/snapshots/step_*.pth")))
    assert not list(victim.glob("train_*/snapshots/final.pth"))

    assert sweep.main([*args, "--executor", "submitit-local"]) == 0, capsys.readouterr().out
    second = capsys.readouterr().out
    assert "default-setting1-seed2025-fold0: done" in second
    assert "default-setting1-seed2025-fold0-supp0: done" in second
    assert list((out / "submitit").glob("*/*_log.out"))  # submitit's own logs
    resumed = victim / "train_custom_setting1_fold0_2"
    config = json.loads((resumed / "config.json").read_text(encoding="utf-8"))
    assert config["resume"].endswith(f"step_{killed['step']:07d}.pth")
    final = load_snapshot(resumed / "snapshots" / "final.pth")
    assert final["step"] == 6 and final["history"]["loss"][:killed["step"]] == killed["history"]["loss"]
    cell = out / "cells" / "default-setting1-seed2025-fold0-supp0"
    assert (cell / "test_custom_setting1_fold0_supp0" / "summary.json").is_file()
    cell_log = (cell / "cell.log").read_text(encoding="utf-8")
    assert "test.py -F " in cell_log and " -s sqlite:///" in cell_log
    table = (out / "summary.md").read_text(encoding="utf-8")
    assert "| setting1 |" in table and "1 run(s)" in table
    # both observers got every run: the killed training (never completed), the resumed one, the test
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "sacred_files").glob("*/run.json")]
    assert sorted(r["command"] for r in runs if r["status"] == "COMPLETED") == ["test", "train"]
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        rows = connection.execute(sa.text("select command, status, config, info from run order by id")).fetchall()
    assert [r[0] for r in rows] == ["train", "train", "test"] and [r[1] for r in rows[1:]] == ["COMPLETED"] * 2
    assert rows[0][1] != "COMPLETED" and json.loads(rows[2][2])["eval_fold"] == 0
    result = json.loads(rows[2][3])["result"]
    assert result["run_dir"].endswith("test_custom_setting1_fold0_supp0") and "mean_dice" in result

    assert sweep.main(args) == 0
    third = capsys.readouterr().out
    assert "default-setting1-seed2025-fold0: finished before, skipped" in third
    assert "default-setting1-seed2025-fold0-supp0: finished before, skipped" in third
