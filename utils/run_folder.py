"""Where a training run keeps its snapshots, and how a run folder is resolved to one of them.

The one owner of the run-folder layout: ``engine.snapshot`` (writing, resuming, testing; it
re-exports these names) and ``models.encoder`` (an encoder initialised from a run,
``pretrained_weights='snapshot'``) both resolve through :func:`find_snapshot`, so a run folder
means the same file everywhere. It lives here, below ``models``, because the model layer may not
import ``engine``.

Layout: ``<run>/snapshots/step_<k>.pth`` every ``save_snapshot_every`` steps and
``<run>/snapshots/final.pth`` at the end of training.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SNAPSHOTS_DIR = "snapshots"
FINAL_NAME = "final.pth"
_STEP_PATTERN = re.compile(r"step_(\d+)\.pth")


def step_name(step: int) -> str:
    """File name of the intermediate snapshot after ``step`` completed steps."""
    return f"step_{step:07d}.pth"


def snapshot_dir(run_or_dir: Path) -> Path:
    """``<run>/snapshots`` when ``run_or_dir`` is a run folder, else ``run_or_dir`` itself."""
    return run_or_dir / SNAPSHOTS_DIR if (run_or_dir / SNAPSHOTS_DIR).is_dir() else run_or_dir


def intermediate_snapshots(folder: str | os.PathLike) -> list[Path]:
    """``step_*.pth`` files of a run folder (or its ``snapshots/``), sorted by step."""
    folder = snapshot_dir(Path(folder))
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pth")
             if (m := _STEP_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def find_snapshot(path: str | os.PathLike, which: str = "final") -> Path:
    """Resolve a snapshot file, or a run folder to one of its snapshots.

    Args:
        path: a ``.pth`` file, a training run folder, or its ``snapshots/`` folder.
        which: ``'final'`` (the end-of-training snapshot, for testing) or ``'latest'`` (the final
            one if present, else the intermediate one with the most steps, for resuming).

    Raises:
        ValueError: ``which`` is neither 'final' nor 'latest'.
        FileNotFoundError: the path does not exist or holds no suitable snapshot.
    """
    if which not in ("final", "latest"):
        raise ValueError(f"which={which!r}: expected 'final' or 'latest'")
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: expected a snapshot file or a training run folder")
    folder = snapshot_dir(path)
    if (folder / FINAL_NAME).is_file():
        return folder / FINAL_NAME
    steps = intermediate_snapshots(folder)
    if which == "latest" and steps:
        return steps[-1]
    hint = (f"; its latest intermediate snapshot is {steps[-1]} (pass that file explicitly, or resume "
            f"training with resume={path})") if steps else ""
    raise FileNotFoundError(f"{path} holds no {'final ' if which == 'final' else ''}snapshot "
                            f"({folder}/{FINAL_NAME} missing){hint}")
