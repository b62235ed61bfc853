"""Full-state training snapshots: built (:func:`build_snapshot`), written atomically, found from a
run folder, read safely, and turned back into a model (:func:`load_model`).

A snapshot is a ``torch.save``-d dict (:func:`build_snapshot` is the one place that builds it)::

    {'format': SNAPSHOT_FORMAT, 'step': int (completed steps), 'final': bool,
     'model': state_dict, 'optimizer': state_dict, 'scheduler': state_dict,
     'rng': utils.seed.capture_rng_state(), 'generator': ByteTensor (prototype-sampling generator),
     'history': {'loss': [...], '<term>': [...]}  (one value per completed step),
     'val': [{'step', 'dice', 'mean', 'all_background'}, ...]  (validation points),
     'config': dict (the run's flat config),
     'meta': dict (what a user of the model needs, see :func:`snapshot_meta`),
     # engine.distributed.snapshot_extras, when they apply:
     'amp_scaler': GradScaler state (amp='fp16'),
     'world_size': int, 'rank_states': [{'generator', 'rng'} per rank] (torchrun, W > 1)}

``meta`` makes a snapshot self-describing: ``test.py`` and ``predict.py`` build the model from it
(:func:`load_model`: model keys, ``image_size``, backbone), normalise inputs as it says (per-volume
z-score), orient them as the training scans were (:func:`model_orientation`) and name classes with
the dataset's names. Snapshots written before ``meta`` existed are described from their ``config``
(:func:`describe`); a checkpoint converted from the reference code (``tools.convert``) carries
``meta`` too (with ``config`` None). Which config keys define the model is the model's to say
(``models.MODEL_KEYS``); the functions that only read headers take them as ``model_keys=``.

``meta['encoder_init']`` (added by :func:`build_snapshot` from the model's encoder) says where the
encoder's initial weights came from: ``{'kind', 'path' (pretrained_path as given), 'file' (the file
read), 'sha256', 'tensors'}`` (``models.encoder.load_pretrained``); e.g. another run's snapshot
with ``pretrained_weights='snapshot'``.

Files live in ``<run>/snapshots/``: ``step_<k>.pth`` every ``save_snapshot_every`` steps (the last
``keep_snapshots`` of them are kept) and ``final.pth`` at the end of training. That layout and its
resolution (:func:`find_snapshot`, :func:`intermediate_snapshots`, :func:`step_name`,
:data:`FINAL_NAME`) live in ``utils.run_folder``, re-exported here, so that ``models`` resolves
a run folder the same way.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from data.registry import DATASETS
from engine.distributed import Distributed, snapshot_extras
from engine.runtime import plain_config
from models import MODEL_KEYS, TEST_TIME_KEYS, build_model, check_state_dict
from models.qamp import COMPUTE_ONLY_KEYS
from utils.io import atomic_write, load_torch_file  # noqa: F401 (load_torch_file re-exported)
from utils.run_folder import FINAL_NAME, find_snapshot, intermediate_snapshots, step_name  # noqa: F401 (re-exported)
from utils.seed import capture_rng_state

SNAPSHOT_FORMAT = "qamp-snapshot-v1"
META_VERSION = 1
NORMALISATION = "per-volume z-score"  # what dataloaders.datasets.zscore does to every volume
# Orientation assumed for a snapshot that states neither its own nor a registered dataset: that of
# the CHAOST2 scans the reference models were trained on (data/registry.py holds every dataset's).
DEFAULT_ORIENTATION = DATASETS["CHAOST2"].orientation


def save_snapshot(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def build_snapshot(step: int, final: bool, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                   generator: torch.Generator, history: Mapping[str, Sequence[float]], config: Mapping[str, Any],
                   val_points: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None,
                   dist: Distributed, amp=None) -> dict[str, Any]:
    """The snapshot after ``step`` completed steps (the format of the module docstring): everything
    needed to continue exactly, ``meta`` (:func:`snapshot_meta`, plus ``encoder_init`` when the
    model's encoder records where its weights came from) and the distributed / AMP extras
    (``engine.distributed.snapshot_extras``). Collective under torchrun: every rank must call it."""
    meta = dict(meta or {})
    source = getattr(getattr(model, "encoder", None), "pretrained_source", None)  # models.encoder.load_pretrained
    if source is not None:
        meta["encoder_init"] = dict(source)
    state = {"format": SNAPSHOT_FORMAT, "step": step, "final": final,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": capture_rng_state(cuda=next(model.parameters()).is_cuda),
             "generator": generator.get_state(), "history": {k: list(v) for k, v in history.items()},
             "val": list(val_points), "config": plain_config(config), "meta": meta}
    return state | snapshot_extras(dist, generator, amp)


def load_snapshot(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  key: str = "reload_model_path/resume") -> dict[str, Any]:
    """Read a snapshot with ``weights_only=True``.

    Returns a dict: a training snapshot, a converted reference checkpoint (``{'model', 'meta', ...}``),
    or a plain ``state_dict`` returned as ``{'model': state_dict}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read as a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    obj = load_torch_file(path, "a snapshot or state_dict", key, map_location)
    return _accept(obj, path)


# ----------------------------------------------------------------------------------------------
# Self-description
# ----------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-like plain value (tuples -> lists), for comparing and storing config values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def snapshot_meta(config: Mapping[str, Any], image_size: int, class_names: Mapping[int, str],
                  orientation: str | None = None, dataset: str | None = None, *,
                  model_keys: Sequence[str]) -> dict[str, Any]:
    """The ``meta`` dict of a snapshot: everything needed to rebuild and use the model.

    Args:
        config: the run's flat config (the model keys are taken from it).
        image_size: the in-plane size the model sees (resolved; None only for old snapshots of models
            whose weights do not depend on it, trained at the dataset's native size).
        class_names: label id -> name of the training dataset.
        orientation: ITK orientation code of the training scans (``utils.io.orientation_code``).
        dataset: dataset name (default ``config['dataset']``).
        model_keys: the config keys that define the model (``models.MODEL_KEYS``).
    """
    size = None if image_size is None else int(image_size)
    keys = {k: _plain(config[k]) for k in model_keys if k in config}
    keys["image_size"] = size
    return {"version": META_VERSION, "model_keys": keys, "image_size": size,
            "backbone": keys.get("backbone"), "normalisation": NORMALISATION,
            "class_names": {str(int(k)): str(v) for k, v in class_names.items()},
            "dataset": dataset if dataset is not None else config.get("dataset"),
            "orientation": orientation}


def model_orientation(meta: Mapping[str, Any]) -> str:
    """ITK orientation code of the scans a model was trained on: ``meta['orientation']`` (read from
    the training scans), else the registered orientation of ``meta['dataset']`` (``data.registry``),
    else :data:`DEFAULT_ORIENTATION`."""
    spec = DATASETS.get(meta.get("dataset") or "")
    return meta.get("orientation") or (spec.orientation if spec is not None else None) or DEFAULT_ORIENTATION


def describe(snapshot: Mapping[str, Any], path: str | os.PathLike = "snapshot", *,
             model_keys: Sequence[str]) -> dict[str, Any]:
    """The ``meta`` of a loaded snapshot: its own, or rebuilt from its training ``config`` (snapshots
    written before ``meta`` existed; class names and orientation unknown then), or from its tensors
    (reference checkpoints converted before ``meta`` existed: backbone, sizes, MLP widths).
    ``model_keys``: as :func:`snapshot_meta` (``models.MODEL_KEYS``).

    Raises:
        ValueError: nothing describes the model (a bare state_dict): its model keys are unknown.
    """
    meta = snapshot.get("meta")
    if isinstance(meta, dict) and "model_keys" in meta:
        return dict(meta)
    config = snapshot.get("config")
    if isinstance(config, dict):
        image_size = config.get("image_size") or _size_from_tensors(snapshot.get("model", {}))
        # image_size None: the dataset's native size
        return snapshot_meta(config, image_size, {}, None, model_keys=model_keys)
    state = snapshot.get("model", {})
    if "converted_from" in snapshot and "fg_mlp.fc1.weight" in state:
        keys = {"model": "qamp", "backbone": snapshot.get("backbone"),
                "feature_dim": int(state["encoder.reduce1.weight"].shape[0]),
                "n_mlp_fg": int(state["fg_mlp.fc2.weight"].shape[0]),
                "n_mlp_bg": int(state["bg_mlp.fc2.weight"].shape[0])}
        return snapshot_meta(keys, _size_from_tensors(state), {}, None, dataset=None, model_keys=model_keys)
    raise ValueError(f"{path} holds model weights only, nothing says which model they belong to (backbone, "
                     "prototype counts, image size): use a snapshot written by train.py, or convert a reference "
                     "checkpoint with `python -m tools.convert REF.pth OUT.pth`")


@dataclass
class LoadedModel:
    """A model rebuilt from a snapshot: ``model`` (eval mode, on the requested device), the
    snapshot's ``meta`` (:func:`describe`), its file ``path`` and completed training ``step``."""

    model: nn.Module
    meta: dict[str, Any]
    path: Path
    step: int | None


def load_model(snapshot: str | os.PathLike, device: torch.device, *, compute: Mapping[str, Any] | None = None,
               image_size: int | None = None) -> LoadedModel:
    """The model a snapshot describes (its ``meta``'s model keys), with its weights, in eval mode on
    ``device``; the one loader of ``test.py`` and ``predict.py``.

    Args:
        snapshot: a snapshot file, a training run folder or its ``snapshots/`` (the final snapshot).
        compute: values of the compute-only keys (``models.qamp.COMPUTE_ONLY_KEYS``: how the same
            numbers are computed, not stored in ``meta``); missing ones take ``ModelConfig``'s. Also the
            test-time model keys (``models.TEST_TIME_KEYS``, e.g. ``qnet_refine_iters``), which
            override the snapshot's values when given.
        image_size: the size to build at when the snapshot does not state one (written before
            ``meta`` existed, trained at its dataset's native size); None refuses such a snapshot.

    Raises:
        FileNotFoundError: no snapshot at ``snapshot``.
        ValueError: a file that is not a snapshot, one that does not describe its model, another
            normalisation than :data:`NORMALISATION`, no image size, or tensors that do not fit the
            described model (:func:`models.check_state_dict` names them and the likely cause).
    """
    path = find_snapshot(snapshot, which="final")
    state = load_snapshot(path, map_location="cpu")
    meta = describe(state, path, model_keys=MODEL_KEYS)
    if meta.get("normalisation", NORMALISATION) != NORMALISATION:
        raise ValueError(f"{path}: normalisation {meta['normalisation']!r} is not supported (only {NORMALISATION!r})")
    size = meta.get("image_size") or image_size
    if size is None:
        raise ValueError(f"{path} does not state the image size its model sees (a snapshot written before meta "
                         "existed, trained at its dataset's native size): test it with test.py, which takes the "
                         "size from the dataset")
    # The snapshot holds every weight: the pre-training file is not needed.
    keys = {**{k: v for k, v in (compute or {}).items() if k in COMPUTE_ONLY_KEYS}, **meta["model_keys"],
            **{k: v for k, v in (compute or {}).items() if k in TEST_TIME_KEYS}, "pretrained_weights": "none"}
    model = build_model(keys, int(size))
    check_state_dict(model, state["model"], source=str(path))
    model.load_state_dict(state["model"])
    return LoadedModel(model.to(device).eval(), meta, path, state.get("step"))


def _size_from_tensors(state: Mapping[str, torch.Tensor]) -> int | None:
    weight = state.get("fg_mlp.fc1.weight")
    if weight is None:
        return None
    side = int(round(weight.shape[1] ** 0.5))
    return side if side * side == weight.shape[1] else None


_HEADERS: dict[tuple, dict[str, Any]] = {}


def read_snapshot_header(path: str | os.PathLike, *, model_keys: Sequence[str]) -> dict[str, Any]:
    """``{'path', 'meta', 'config', 'step', 'final'}`` of a snapshot file, read without loading its
    tensors into memory (memory-mapped; cached per file version), for config checks before a run.
    ``model_keys``: as :func:`snapshot_meta` (``models.MODEL_KEYS``).

    Raises:
        FileNotFoundError / ValueError: as :func:`load_snapshot`; ValueError also when nothing
            describes the model (see :func:`describe`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, tuple(model_keys))
    if key not in _HEADERS:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip-format file (or corrupt): the full reader gives the error
            obj = None
        snapshot = load_snapshot(path) if obj is None else _accept(obj, path)
        _HEADERS.clear()  # one entry is enough: a run reads one snapshot (twice)
        _HEADERS[key] = {"path": str(path), "meta": describe(snapshot, path, model_keys=model_keys),
                         "config": snapshot.get("config"), "step": snapshot.get("step"),
                         "final": snapshot.get("final")}
    return copy.deepcopy(_HEADERS[key])  # callers (Sacred's config updates) may modify what they get


def _accept(obj: Any, path: Path) -> dict[str, Any]:
    """The checks of :func:`load_snapshot` on an already loaded object."""
    if not isinstance(obj, dict):
        raise ValueError(f"snapshot {path}: expected a dict, got {type(obj).__name__}")
    if obj.get("format") == SNAPSHOT_FORMAT:
        return obj
    if isinstance(obj.get("model"), dict) and ("meta" in obj or "converted_from" in obj):
        return obj  # a converted reference checkpoint (tools.convert)
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise ValueError(f"snapshot {path}: neither a {SNAPSHOT_FORMAT} snapshot nor a plain state_dict")


def prune_snapshots(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the last ``keep`` intermediate snapshots of a run; returns the deleted paths."""
    steps = intermediate_snapshots(folder)
    doomed = steps[:-keep] if keep > 0 else steps
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
