"""Run helpers shared by ``train.py`` and ``test.py``: device, determinism, run folder, log file,
config as plain JSON.

Duck-typed and free of project imports above ``utils`` (the run folder observer is recognised by
its ``is_run_folder`` attribute), so any script can use them without importing another script.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch


def resolve_device(name: str) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises:
        ValueError: a CUDA device was asked for but CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here: use device='auto' or 'cpu'")
    return device


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels (warn-only where none exists) and no cuDNN autotuning."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


def run_folder(run) -> Path:
    """The run's folder, created by ``config.RunFolderObserver`` (an observer with ``is_run_folder``)."""
    for observer in run.observers:
        if getattr(observer, "is_run_folder", False) and observer.dir is not None:
            return Path(observer.dir)
    raise RuntimeError("this run has no run folder: do not start it unobserved (-u / --unobserved)")


def attach_log_file(log: logging.Logger, path: Path) -> logging.Handler:
    """Also write ``log``'s records to ``path`` (``logger.log`` of the run folder)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
    log.addHandler(handler)
    return handler


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Sacred's read-only config as plain JSON types (storable with ``weights_only`` loading)."""
    return json.loads(json.dumps(config))
