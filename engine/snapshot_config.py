"""Runs that remember their own config: ``test.py`` builds the model its snapshot describes, and
``train.py with resume=RUN`` continues a run with the run's own config.

Both act at two points of Sacred's config process (``config.py`` wires them):

1. :func:`snapshot_updates`, a config hook, returns the snapshot's values as config updates. Sacred
   applies the explicit updates (``with KEY=VALUE``, named configs, ``ex.run(config_updates=...)``)
   after the hooks' updates, so every key the user did not give takes the snapshot's value.
2. :func:`check_against_snapshot` runs on the final config, before the run starts (no run folder
   exists yet): a key that still differs from the snapshot was given explicitly. For ``test`` a model
   key (``models.MODEL_KEYS``, which config.py passes in) that disagrees is an error naming both
   values, except the test-time keys (``models.TEST_TIME_KEYS``: ``qnet_refine_iters``), where the
   snapshot's value is only the default; for a resumed ``train`` run every key outside :data:`RESUME_FREE_KEYS` that changed is an
   error listing them, and ``n_steps`` must exceed the snapshot's completed steps.

Test runs also take ``dataset``, ``data_dir``, ``setting``, ``eval_fold`` and ``test_label`` from the
snapshot's training config when they are not given (data keys: the command line may change them).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence


from engine.snapshot import _plain, find_snapshot, read_snapshot_header
from models import TEST_TIME_KEYS

# Keys a resumed run may change: they do not change the training run's meaning or its loss sequence
# (n_steps only where training stops; data_dir: the same data moved elsewhere; the rest: logging,
# validation, hardware, test-time keys).
RESUME_FREE_KEYS = frozenset({
    "resume", "n_steps", "path", "num_workers", "print_interval", "save_snapshot_every", "keep_snapshots",
    "device", "keep_freed_memory", "val_interval", "collapse_patience", "data_dir", "pretrained_path",
    "reload_model_path", "supp_idx", "n_part", "eval_mode", "test_batch_size", "n_overlay_slices"})
# Data keys a test run takes from the snapshot's training config when they are not given.
TEST_SNAPSHOT_DEFAULTS = ("dataset", "data_dir", "setting", "eval_fold", "test_label")
# Keys only train.py reads: test.py refuses them on its command line (config.py; a named config such as
# cpu_budget may still set them) and tools.sweep leaves them out of its test cells. The training
# section of config.py, plus the data keys that shape training episodes (supervoxels, ground truth,
# excluded slices, minimum area, augmentation), the training DataLoader's workers and the encoder's
# initial weights (test.py builds the model with pretrained_weights='none' and loads the snapshot).
TRAINING_ONLY_KEYS = (
    "n_steps", "optim", "lr_step_gamma", "max_iters_per_load", "print_interval", "save_snapshot_every",
    "keep_snapshots", "resume", "val_interval", "collapse_patience", "val_scans",
    "supervoxel_dir", "n_sv", "use_gt", "supervoxel_source", "exclude_label", "exclude_mode", "min_size", "augment", "gin_prob",
    "num_workers", "pretrained_weights", "pretrained_path")


def _uses_snapshot(config: Mapping[str, Any], command: str | None) -> str | None:
    """``'test'`` / ``'resume'`` when this run reads its config from a snapshot, else None."""
    if command == "test" and config.get("model") != "copy_support" and config.get("reload_model_path"):
        return "test"
    if command == "train" and config.get("resume"):
        return "resume"
    return None


def _header(config: Mapping[str, Any], kind: str, model_keys: Sequence[str]) -> dict[str, Any]:
    if kind == "test":
        return read_snapshot_header(find_snapshot(config["reload_model_path"], which="final"), model_keys=model_keys)
    header = read_snapshot_header(find_snapshot(config["resume"], which="latest"), model_keys=model_keys)
    if not isinstance(header["config"], dict) or header["step"] is None:
        raise ValueError(f"resume={config['resume']!r}: {header['path']} holds model weights only (no training "
                         "config, optimizer or RNG state), so training cannot continue exactly; resume from a "
                         "snapshot written by train.py")
    return header


def snapshot_updates(config: Mapping[str, Any], command: str | None, model_keys: Sequence[str],
                     known_datasets: Sequence[str] = ()) -> dict[str, Any]:
    """Config hook: the snapshot's values of the keys this run takes from it (see module docstring);
    ``model_keys``: the config keys that define the model (``models.MODEL_KEYS``)."""
    kind = _uses_snapshot(config, command)
    if kind is None:
        return {}
    header = _header(config, kind, model_keys)  # a deep copy: Sacred merges the explicit updates into these values
    stored = header["config"] or {}
    if kind == "resume":
        return {k: v for k, v in stored.items() if k in config and k != "resume"}
    meta = header["meta"]
    updates = {k: v for k, v in meta["model_keys"].items() if k in config}
    updates.update({k: stored[k] for k in TEST_SNAPSHOT_DEFAULTS if k in stored and k in config})
    if "dataset" not in stored and meta.get("dataset") in known_datasets:
        updates["dataset"] = meta["dataset"]  # converted reference checkpoint with --dataset
    return updates


def check_against_snapshot(config: Mapping[str, Any], command: str | None, model_keys: Sequence[str],
                           native_size: Callable[[Mapping[str, Any]], int | None] = lambda config: None) -> None:
    """Refuse, before the run starts, a final config that contradicts its snapshot (``model_keys``:
    as :func:`snapshot_updates`).

    Raises:
        ValueError: test: model keys given that differ from the snapshot's (both values named);
            resume: keys outside :data:`RESUME_FREE_KEYS` that differ from the resumed run's config,
            or ``n_steps`` not above the snapshot's completed steps.
    """
    kind = _uses_snapshot(config, command)
    if kind is None:
        return
    header = _header(config, kind, model_keys)
    if kind == "test":
        _check_test(config, header, native_size)
    else:
        _check_resume(config, header)


def _differs(key: str, stored: Any, requested: Any, owner: str) -> str:
    """One differing key in a refusal: ``key: <owner> has <stored>, requested <requested>``, both values
    under their own name (``owner``: 'the snapshot' or 'the run')."""
    return f"{key}: {owner} has {_plain(stored)!r}, requested {_plain(requested)!r}"


def _check_test(config: Mapping[str, Any], header: Mapping[str, Any],
                native_size: Callable[[Mapping[str, Any]], int | None]) -> None:
    differing, notes = [], []
    for key, stored in header["meta"]["model_keys"].items():
        if key not in config or key in TEST_TIME_KEYS:  # test-time keys: the snapshot's is only the default
            continue
        value = config[key]
        if key == "image_size":
            if stored is None or value == stored:
                continue
            if value is None:
                native = native_size(config)
                if native == stored:
                    continue
                notes.append(f"image_size=None means the native size of dataset {config['dataset']}"
                             + (f", {native} px" if native is not None else ""))
        elif _plain(value) == _plain(stored):
            continue
        differing.append(_differs(key, stored, value, "the snapshot"))
    if differing:
        raise ValueError(
            f"reload_model_path={config['reload_model_path']!r}: the model is built from its snapshot "
            f"({header['path']}), and these model keys differ from it: {'; '.join(differing)}"
            + (f" [{'; '.join(notes)}]" if notes else "")
            + ". Drop these keys from the command line (the snapshot's values are used), or pass a snapshot "
              "trained with the values you want")


def _check_resume(config: Mapping[str, Any], header: Mapping[str, Any]) -> None:
    stored = header["config"]
    changed = [_differs(k, stored[k], config[k], "the run") for k in config
               if k not in RESUME_FREE_KEYS and k in stored and _plain(config[k]) != _plain(stored[k])]
    if stored.get("use_gt") and (stored.get("val_interval", 0) > 0) != (config["val_interval"] > 0):
        # with ground-truth training the validation scans are left out of the training set only while
        # validation is on: switching it on or off would change what the run trains on
        changed.append(_differs("val_interval", stored.get("val_interval", 0), config["val_interval"], "the run")
                       + " (with use_gt=True, validation on or off decides whether the validation scans are trained on)")
    if changed:
        raise ValueError(
            f"resume={config['resume']!r}: a resumed run continues with its own config, and these keys differ "
            f"from it (they change what the run means): {'; '.join(changed)}. Drop them to continue the run, or "
            f"start a new run without resume. Keys that may change: n_steps (to train longer), "
            f"{', '.join(sorted(RESUME_FREE_KEYS - {'resume', 'n_steps'}))}")
    step = int(header["step"])
    if step >= config["n_steps"]:
        raise ValueError(f"resume={config['resume']!r}: the snapshot {header['path']} already has {step} steps "
                         f"and n_steps={config['n_steps']}; raise n_steps to train longer (e.g. n_steps={2 * step})")
