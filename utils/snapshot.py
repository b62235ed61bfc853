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


def _describe_content(path: Path) -> str:
    """A short description of what a file holds, from its first bytes (for error messages)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as err:
        return f"an unreadable file ({err.strerror or err})"
    if not head:
        return "an empty file"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data (an image or an archive?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that torch cannot read (truncated or not a torch.save file)"
    if head.startswith(b"\x80"):
        return "a pickle that torch cannot read (truncated, or saved by another program)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting with {head[:8]!r}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file starting with {first!r}"


def load_torch_file(path: str | os.PathLike, what: str, key: str,
                    map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for files that are not torch files.

    Every weights / snapshot reader (``load_snapshot``, ``models.encoder.load_pretrained``,
    ``models.convert``) goes through here, so a text file, an image or a truncated download gets
    the same message everywhere instead of a raw ``KeyError`` / ``UnpicklingError``.

    Args:
        path: the file.
        what: what the file should be, e.g. ``"snapshot"``, ``"pretrained weights"``.
        key: the config key or option that named it (used in the fix).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``"{key}={path}: expected a PyTorch file (torch.save) holding {what}, got ..."``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: {what} file not found; pass an existing file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises KeyError, UnpicklingError, RuntimeError, EOFError ...
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise ValueError(
            f"{key}={str(path)!r}: expected a PyTorch file (written by torch.save) holding {what}, "
            f"got {_describe_content(path)} ({err.__class__.__name__}: {detail}); point {key} at "
            f"the right .pth file (re-download or re-create it if it is damaged)"
        ) from None


def load_snapshot(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  key: str = "reload_model_path/resume") -> dict[str, Any]:
    """Read a snapshot with ``weights_only=True``.

    Returns a dict; a plain ``state_dict`` (e.g. a converted reference checkpoint) is returned as
    ``{'model': state_dict}``. ``key`` names the config key that gave ``path`` in errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read as a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    obj = load_torch_file(path, "a snapshot or state_dict", key, map_location)
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
