"""Shared pytest fixtures.

Real data lives in ``../shared/data`` (relative to the repository root) or wherever
``QAMP_DATA_ROOT`` points. Tests that need it fail, never skip, when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """The folder holding CHAOST2/, SABS/ and PROMISE12/."""
    return Path(os.environ.get("QAMP_DATA_ROOT", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if not (root / "CHAOST2").is_dir():
        pytest.fail(
            f"real test data not found at {root}: set QAMP_DATA_ROOT to the folder holding "
            "CHAOST2/ and SABS/ (pre-processed as described in data/README.md)"
        )
    return root


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
