"""Shared pytest fixtures.

Real data lives in ``../shared/data`` (relative to the repository root) or wherever
``QAMP_DATA_ROOT`` points. Tests that need it (those using the ``data_root`` fixture or one built
on it) are skipped when it is missing, with one line at the end of the run saying where the data
comes from; with ``CI=true`` a missing data folder is a failure instead. Everything else (the
synthetic end-to-end test included) runs everywhere.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from helpers import experiment, make_phantoms48, tiny_train_config  # noqa: E402
# Kept short and constant: pytest groups skips by reason, the terminal summary counts them.
NO_DATA_REASON = "real data not found (QAMP_DATA_ROOT)"


def shared_data_root() -> Path:
    """The folder holding CHAOST2/, SABS/ and PROMISE12/."""
    return Path(os.environ.get("QAMP_DATA_ROOT", REPO_ROOT.parent / "shared" / "data")).resolve()


def data_available() -> bool:
    return (shared_data_root() / "CHAOST2").is_dir()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def data_hint() -> str:
    return (f"real test data not found at {shared_data_root()}: it is CHAOST2/ and SABS/ pre-processed "
            "from the official CHAOS and Synapse downloads (data/README.md, `python -m data.preprocess`); "
            "set QAMP_DATA_ROOT to the folder holding them")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not data_available():
        if in_ci():
            pytest.fail(data_hint() + " (CI=true: missing data is a failure)")
        pytest.skip(NO_DATA_REASON)
    return shared_data_root()


# The longest files first: `scripts/test.sh` runs the suite on several workers (pytest-xdist, one file
# per worker at a time), and a long file started last would leave the other workers idle.
LONG_FILES = ("test_sweep.py", "test_distributed.py", "test_pipeline.py", "test_end_to_end.py", "test_predict.py",
              "test_models.py")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (tests/test_gpu.py; "
                                       "`bash scripts/gpu_check.sh` runs them)")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: file order kept otherwise


def pytest_report_header(config) -> str:
    state = "found" if data_available() else "missing: tests that need it are skipped"
    return f"real data: {shared_data_root()} ({state})"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_DATA_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped: {data_hint()}")


@pytest.fixture(scope="session")
def chaos_dir(data_root: Path) -> Path:
    """``CHAOST2/chaos_MR_T2_normalized``: image_<id>.nii.gz / label_<id>.nii.gz, 20 scans."""
    return data_root / "CHAOST2" / "chaos_MR_T2_normalized"


@pytest.fixture(scope="session")
def chaos_sv_dir(data_root: Path) -> Path:
    """The published CHAOST2 supervoxels (``superpix-MIDDLE_<id>.nii.gz``, n_sv = 5000)."""
    return data_root / "CHAOST2" / "supervoxels_5000"


@pytest.fixture(scope="session")
def sabs_dir(data_root: Path) -> Path:
    """``SABS/sabs_CT_normalized``: 30 CT scans, 257 x 257 in-plane."""
    return data_root / "SABS" / "sabs_CT_normalized"


# ---------------------------------------------------------------------------------------------- phantoms
def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session, however many pytest-xdist workers need it: the
    first worker builds under a lock in the session's shared temporary folder (a ``done`` file marks
    it complete), the others wait and reuse it. Returns the folder."""
    import fcntl

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / f"shared_{name}"  # this session's, shared by its workers
    folder.mkdir(exist_ok=True)
    with open(folder.parent / f"shared_{name}.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").is_file():
            build(folder)
            (folder / "done").touch()
    return folder


@pytest.fixture(scope="session")
def phantoms48(tmp_path_factory) -> Path:
    """48 x 48 synthetic phantoms, 5 scans (``helpers.make_phantoms48``). Read-only for tests."""
    return built_once(tmp_path_factory, "phantoms48", lambda folder: make_phantoms48(folder / "data")) / "data"


@pytest.fixture(scope="session")
def tiny_run(phantoms48: Path, tmp_path_factory) -> dict:
    """The result of one short training run (``helpers.tiny_train_config``): ``run_dir``, ``snapshot``,
    ``val``, ... Tests may add run folders beside it, never change it."""
    def build(folder: Path) -> None:
        config = tiny_train_config(phantoms48, folder / "runs")
        result = experiment().run(command_name="train", config_updates=config).result
        (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")

    return json.loads((built_once(tmp_path_factory, "tiny_run", build) / "result.json").read_text(encoding="utf-8"))
