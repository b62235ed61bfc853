"""scripts/run_folds.sh (behind scripts/train_*.sh / test_*.sh): the commands it runs per fold, with a
stand-in interpreter that records its arguments (no training)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, tmp_path: Path, **env) -> list[list[str]]:
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(log)!r}, 'a').write('\\t'.join(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    subprocess.run(["bash", str(REPO / "scripts" / script)], check=True, cwd=tmp_path, capture_output=True,
                   env={**os.environ, "PYTHON": str(fake), "FOLDS": "0 3", **env})
    return [line.split("\t") for line in log.read_text().splitlines()]


def test_model_picks_the_head_and_its_own_log_dir(tmp_path: Path) -> None:
    calls = run_script("train_abd_mri.sh", tmp_path, MODEL="adnet")
    assert [c[0] for c in calls] == ["train.py", "train.py"]
    for call, fold in zip(calls, ("0", "3")):
        assert "model=adnet" in call and "path.log_dir=./runs/adnet" in call and f"eval_fold={fold}" in call
    default = run_script("train_abd_ct.sh", tmp_path / "..", FOLDS="1")[-1]
    assert "path.log_dir=./runs" in default and not any(a.startswith("model=") for a in default)


def test_test_runs_find_the_models_training_runs(tmp_path: Path) -> None:
    for fold in (0, 3):
        final = tmp_path / "runs" / "qnet" / f"train_CHAOST2_setting1_fold{fold}" / "snapshots" / "final.pth"
        final.parent.mkdir(parents=True)
        final.write_bytes(b"")
    # the scripts run from the repository root, so the runs are named by an absolute LOG_DIR here
    calls = run_script("test_abd_mri.sh", tmp_path, MODEL="qnet", SUPP_IDX="0 2", LOG_DIR=str(tmp_path / "runs" / "qnet"))
    assert len(calls) == 4 and all(c[0] == "test.py" for c in calls)
    expected = f"reload_model_path={tmp_path}/runs/qnet/train_CHAOST2_setting1_fold"
    assert all(any(a.startswith(expected) for a in c) for c in calls)
    assert not any(a.startswith("model=") for c in calls for a in c)  # the snapshot says which head
