"""Full-state training snapshots: written atomically, found from a run folder, read safely.

A snapshot is a ``torch.save``-d dict::

    {'format': SNAPSHOT_FORMAT, 'step': int (completed steps), 'final': bool,
     'model': state_dict, 'optimizer': state_dict, 'scheduler': state_dict,
     'rng': utils.seed.capture_rng_state(), 'generator': ByteTensor (prototype-sampling generator),
     'history': {'loss': [...], '<term>': [...]}  (one value per completed step),
     'config': dict (the run's flat config)}

Files live in ``<run>/snapshots/``: ``step_<k>.pth`` every ``save_snapshot_every`` steps (the last
``keep_snapshots`` of them are kept) and ``final.pth`` at the end of training.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from utils.io import atomic_write

SNAPSHOT_FORMAT = "qamp-snapshot-v1"
FINAL_NAME = "final.pth"
_STEP_PATTERN = re.compile(r"step_(\d+)\.pth")


def step_name(step: int) -> str:
    """File name of the intermediate snapshot after ``step`` completed steps."""
    return f"step_{step:07d}.pth"


def save_snapshot(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def load_snapshot(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a snapshot with ``weights_only=True``.

    Returns a dict; a plain ``state_dict`` (e.g. a converted reference checkpoint) is returned as
    ``{'model': state_dict}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read as a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for corrupt files
        raise ValueError(f"cannot read snapshot {path}: {err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}. Is it a torch checkpoint?") from None
    if not isinstance(obj, dict):
        raise ValueError(f"snapshot {path}: expected a dict, got {type(obj).__name__}")
    if obj.get("format") == SNAPSHOT_FORMAT:
        return obj
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise ValueError(f"snapshot {path}: neither a {SNAPSHOT_FORMAT} snapshot nor a plain state_dict")


def _snapshot_dir(run_or_dir: Path) -> Path:
    return run_or_dir / "snapshots" if (run_or_dir / "snapshots").is_dir() else run_or_dir


def intermediate_snapshots(folder: str | os.PathLike) -> list[Path]:
    """``step_*.pth`` files of a run folder (or its ``snapshots/``), sorted by step."""
    folder = _snapshot_dir(Path(folder))
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
        FileNotFoundError: the path does not exist or holds no suitable snapshot.
    """
    if which not in ("final", "latest"):
        raise ValueError(f"which={which!r}: expected 'final' or 'latest'")
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: expected a snapshot file or a training run folder")
    folder = _snapshot_dir(path)
    if (folder / FINAL_NAME).is_file():
        return folder / FINAL_NAME
    steps = intermediate_snapshots(folder)
    if which == "latest" and steps:
        return steps[-1]
    hint = (f"; its latest intermediate snapshot is {steps[-1]} (pass that file explicitly, or resume "
            f"training with resume={path})") if steps else ""
    raise FileNotFoundError(f"{path} holds no {'final ' if which == 'final' else ''}snapshot "
                            f"({folder}/{FINAL_NAME} missing){hint}")


def prune_snapshots(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the last ``keep`` intermediate snapshots of a run; returns the deleted paths."""
    steps = intermediate_snapshots(folder)
    doomed = steps[:-keep] if keep > 0 else steps
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
