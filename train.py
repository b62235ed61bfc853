#!/usr/bin/env python
"""Self-supervised episodic training of QAMP (or a baseline head: ``model=adnet``, ``model=alpnet``) on one
cross-validation fold.

    python train.py with abd_mri setting1 eval_fold=0
    python train.py with abd_ct setting2 eval_fold=3 n_steps=2000 backbone=resnet50
    python train.py with resume=runs/train_CHAOST2_setting1_fold0        # continue a run, with its own config

Schedule (the reference's): SGD (lr 1e-3, momentum 0.9, weight decay 5e-4), batch 1, the learning
rate multiplied by ``lr_step_gamma`` every ``max_iters_per_load`` steps, ``n_steps`` steps. Episode
``k`` is ``TrainDataset.episode(k)``, a pure function of (seed, k), so a resumed run sees the same
episodes as an uninterrupted one; dropout draws from torch's global stream, seeded from ``seed`` and
saved in every snapshot with the prototype-sampling generator.

Outputs, in the run folder ``<path.log_dir>/train_<dataset>_setting<k>_fold<f>[_n]``:
``config.json``, ``run.json``, ``cout.txt``, ``metrics.json`` (Sacred; per-step loss terms and lr),
``logger.log``, ``loss_curve.png`` (refreshed at each snapshot), ``snapshots/step_<k>.pth`` (every
``save_snapshot_every`` steps, the last ``keep_snapshots`` kept) and ``snapshots/final.pth``; each
snapshot also holds ``meta`` (model keys, image size, normalisation, class names, orientation), so
``test.py`` and ``predict.py`` rebuild the model from it alone.

Resume (``resume=RUN``): the run continues with RUN's own config (restored by config.py); ``n_steps``
may be raised and logging / hardware keys changed (``engine.snapshot_config.RESUME_FREE_KEYS``), any other
changed key (dataset, fold, setting, labels, model keys, seed, image size, optim, ...) is refused
before a run folder exists, naming the keys.

Monitoring: every step logs ``fg_fraction`` (fraction of query pixels predicted foreground) and
``reverse_ran`` (1 when the reverse terms ran, i.e. the predicted query mask was not empty); a print
interval in which no query pixel was predicted foreground is a WARNING in the log (collapse to all
background). Every ``val_interval`` steps (and after the last step) the model is scored with the
test protocol on ``val_scans`` (two training scans by default, never the test fold: each is the
support of the other): per-class Dice and the mean go to ``metrics.json`` (``val_dice_<CLASS>``,
``val_dice_mean``), the log, and ``val_curve.png`` (with the fg-fraction curve below it).
Validation draws from its own generators in eval mode, so it does not change the training run.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import ex, run_commandline
from dataloaders.datasets import fold_positions
from dataloaders.eval_dataset import EvalDataset, ProtocolKeys
from dataloaders.resolved import ResolvedDataset, resolve_dataset
from dataloaders.train_dataset import EpisodeKeys, StepSampler, TrainDataset, worker_init_fn
from models import MODEL_KEYS, MODEL_MONITORS, build_model, make_generator
from engine import distributed as ddp
from engine.amp import Amp
from engine.evaluate import score_queries
from engine.malloc import keep_freed_memory
from utils.io import orientation_code
from utils.plots import plot_loss_curve, plot_validation_curve
from engine.runtime import attach_log_file, plain_config, resolve_device, run_folder, set_determinism
from utils.seed import restore_generator, restore_rng_state
from engine.snapshot_config import RESUME_FREE_KEYS  # noqa: F401  (keys a resumed run may change; re-exported)
from engine.snapshot import (FINAL_NAME, build_snapshot, find_snapshot, load_snapshot, prune_snapshots,
                             save_snapshot, snapshot_meta, step_name)
MONITOR_KEYS = ("fg_fraction", "reverse_ran", *MODEL_MONITORS)  # per-step series that are not losses


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------
def validation_scan_ids(config: Mapping[str, Any], data: ResolvedDataset) -> list[int]:
    """``val_scans``, or the last two training scans of the fold (numeric id order).

    Raises:
        ValueError: a validation scan is in the test fold (or not in the dataset).
    """
    test_positions = set(fold_positions(data.spec, len(data.scans), config["eval_fold"]))
    train_ids = [f.scan_id for pos, f in enumerate(data.scans) if pos not in test_positions]
    if config["val_scans"] is None:
        return train_ids[-2:]
    outside = sorted(set(config["val_scans"]) - set(train_ids))
    if outside:
        raise ValueError(f"val_scans={list(config['val_scans'])}: scans {outside} are not training scans of fold "
                         f"{config['eval_fold']} (validation never touches the test fold); choose among {train_ids}")
    return sorted(set(config["val_scans"]))


def build_dataset(config: Mapping[str, Any], data: ResolvedDataset, val_ids: list[int] | None = None) -> TrainDataset:
    """The fold's training episodes.

    With ``use_gt=True`` the validation scans ``val_ids`` are left out of training (their labels
    would otherwise be a training signal); self-supervised training keeps them (only their
    supervoxels are used, their labels only score).
    """
    return TrainDataset(data, EpisodeKeys.from_config(config), config["eval_fold"],
                        exclude_scan_ids=(val_ids or []) if config["use_gt"] else ())


def build_validation(config: Mapping[str, Any], data: ResolvedDataset, val_ids: list[int]) -> EvalDataset:
    """The validation scans as a protocol test set (support position 0; see :func:`validate`)."""
    return EvalDataset(data, ProtocolKeys(n_part=config["n_part"], eval_mode="protocol"), config["eval_fold"], 0,
                       scan_ids=val_ids)


def build_data(config: Mapping[str, Any], data: ResolvedDataset, is_main: bool,
               log: logging.Logger) -> tuple[TrainDataset, EvalDataset | None]:
    """The training episodes and, with ``val_interval`` on rank 0 (torchrun), the validation scans."""
    val_ids = validation_scan_ids(config, data) if config["val_interval"] else None
    dataset = build_dataset(config, data, val_ids)
    log.info(f"model input {data.image_size} x {data.image_size} px"
             + ("" if not data.resample else f" (slices resampled from the native {data.spec.image_size} px)"))
    if val_ids is None or not is_main:  # rank 0 alone validates (torchrun)
        return dataset, None
    log.info(f"validation every {config['val_interval']} steps on scans {val_ids}"
             + (" (left out of training: use_gt)" if config["use_gt"] else " (labels used for scoring only)"))
    return dataset, build_validation(config, data, val_ids)


def validate(model: torch.nn.Module, vds: EvalDataset, test_label: list[int], label_names: Mapping[int, str],
             config: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Score the model on the validation scans: each scan is the support once and the others are its
    queries (standard protocol, native-grid 3D Dice). Eval mode, own generators (seed, class).

    Returns:
        ``{"dice": {class name: mean Dice in [0, 1]}, "mean": mean over classes,
        "all_background": [class names predicted all background on every validation query]}``.
    """
    model.eval()
    try:
        overlaps: dict[int, list] = defaultdict(list)
        for supp in range(len(vds.fold_scans)):
            scores = score_queries(model, vds.with_support(supp), test_label, config["test_batch_size"], device,
                                   lambda c: make_generator(config["seed"], c, device=device))
            for class_id, values in scores.items():
                overlaps[class_id].extend(values)
    finally:
        model.train()
    dice = {}
    for class_id, values in overlaps.items():
        defined = [o.dice for o in values if not math.isnan(o.dice)]
        dice[label_names[class_id]] = sum(defined) / len(defined) if defined else 0.0
    empty = [label_names[c] for c, values in overlaps.items() if sum(o.tp + o.fp for o in values) == 0]
    return {"dice": dice, "mean": sum(dice.values()) / len(dice), "all_background": empty}


def episode_loader(dataset, start: int, n_steps: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Episodes ``start .. n_steps - 1`` in order (index = global step), batch 1. ``pin_memory``:
    page-locked batches, for a CUDA run only (a CPU run on a GPU host must not initialise CUDA)."""
    return DataLoader(dataset, batch_size=1, sampler=StepSampler(start, n_steps), num_workers=num_workers,
                      worker_init_fn=worker_init_fn, pin_memory=pin_memory)


def build_optimizer(model: torch.nn.Module, config: Mapping[str, Any]):
    """SGD with ``optim`` = {lr, momentum, weight_decay}; StepLR x ``lr_step_gamma`` every
    ``max_iters_per_load`` steps (stepped once per training step)."""
    optimizer = torch.optim.SGD(model.parameters(), **config["optim"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config["max_iters_per_load"],
                                                gamma=config["lr_step_gamma"])
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def to_model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated episode (leading B = 1) as model arguments on ``device``.

    Returns ``supp_imgs`` (1, S, 3, H, W), ``supp_masks`` (1, S, H, W), ``qry_imgs`` (1, 3, H, W),
    ``qry_labels`` (1, H, W) int64.
    """
    return {"supp_imgs": batch["support_images"].to(device),
            "supp_masks": batch["support_masks"].to(device),
            "qry_imgs": batch["query_images"][:, 0].to(device),
            "qry_labels": batch["query_labels"][:, 0].to(device)}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               batch: Mapping[str, torch.Tensor], device: torch.device,
               generator: torch.Generator, amp: Amp | None = None,
               dist: ddp.Distributed | None = None) -> dict[str, float]:
    """One SGD step on one episode.

    ``amp``: mixed precision (engine/amp.py); ``dist``: torchrun ranks, whose gradients are averaged
    and whose returned values are the means over ranks (engine/distributed.py). The learning-rate
    schedule steps with the optimizer: not when the fp16 GradScaler skipped the step.

    Raises:
        FloatingPointError: a non-finite loss without the fp16 GradScaler (float32 / bf16: a diverged
            run). Under fp16 a non-finite loss is a float16 overflow: the GradScaler skips the step.

    Returns the weighted total ``'loss'``, each unweighted term, the model's ``monitors`` (e.g.
    ``'threshold'``: ADNet's T, QAMP's mean query threshold), ``'fg_fraction'`` (fraction of
    query pixels predicted foreground, in [0, 1]) and ``'reverse_ran'`` (1.0 when the predicted
    query mask is not empty, the condition under which the reverse terms run, else 0.0).
    """
    inputs = to_model_inputs(batch, device)
    out = model(inputs["supp_imgs"], inputs["supp_masks"], inputs["qry_imgs"], inputs["qry_labels"],
                generator=generator)
    loss = out["loss"]
    if not torch.isfinite(loss) and not (amp is not None and amp.scaler.is_enabled()):
        raise FloatingPointError(f"non-finite loss {loss.item()} (terms "
                                 f"{ {k: v.item() for k, v in out['losses'].items()} })")
    optimizer.zero_grad(set_to_none=True)
    if ddp.backward_step(loss, model, optimizer, amp, dist):  # backward, all-reduce (DDP), step (fp16: scaled)
        scheduler.step()  # fp16: only for the steps the GradScaler took
    values = {"loss": loss.item()}
    values.update({name: term.item() for name, term in out["losses"].items()})
    values.update({name: value.item() for name, value in out.get("monitors", {}).items()})
    foreground = (out["pred"].detach().argmax(dim=1) == 1).float().mean().item()
    values.update(fg_fraction=foreground, reverse_ran=float(foreground > 0))
    return values if dist is None else ddp.mean_values(values, dist)


def run_meta(config: Mapping[str, Any], data: ResolvedDataset) -> dict[str, Any]:
    """The snapshots' ``meta``: model keys, image size, normalisation, class names and the
    orientation of the training scans (read from the first scan's header)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(data.scans[0].image))
    reader.ReadImageInformation()
    return snapshot_meta(plain_config(config), data.image_size, data.spec.label_names,
                         orientation_code(reader.GetDirection()), model_keys=MODEL_KEYS)


@dataclass
class TrainState:
    """What training carries from step to step, and what a snapshot saves: the model, its optimizer
    and schedule, the prototype-sampling generator, AMP, completed ``step``, per-step ``history``
    and validation points."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    amp: Amp
    step: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    val_points: list[dict[str, Any]] = field(default_factory=list)


def build_state(config: Mapping[str, Any], image_size: int, device: torch.device,
                dist: ddp.Distributed) -> TrainState:
    """A fresh model (initialised from torch's global stream, seeded from ``seed``; the same on every
    rank), AMP, optimizer, schedule and generator (seed, rank)."""
    model = build_model(config, image_size).to(device).train()
    ddp.broadcast_parameters(model, dist)
    amp = Amp(config["amp"], device).apply(model)  # encoder under autocast (amp != 'off')
    optimizer, scheduler = build_optimizer(model, config)
    # sampling + dropout; on the CPU on every device: its state resumes on any device (restore())
    generator = make_generator(config["seed"], *dist.generator_keys)
    return TrainState(model, optimizer, scheduler, generator, amp)


def resume(state: TrainState, config: Mapping[str, Any], dist: ddp.Distributed, device: torch.device,
           log: logging.Logger) -> None:
    """Continue from ``config['resume']`` (its latest snapshot): :func:`restore` plus the rank states
    and the GradScaler (``engine.distributed.restore_extras``)."""
    source = find_snapshot(config["resume"], which="latest")
    snapshot = load_snapshot(source)  # on the CPU: restore() puts every tensor where it belongs
    state.step, state.history, state.val_points = restore(snapshot, state.model, state.optimizer, state.scheduler,
                                                          state.generator, config, log)
    ddp.restore_extras(snapshot, dist, state.generator, state.amp, source=str(source), log=log)  # rank states, scaler
    log.info(f"resumed from {source} after step {state.step}")


def take_snapshot(folder: Path | None, state: dict[str, Any], keep: int, history, log: logging.Logger) -> Path | None:
    """Write ``state`` (final.pth or step_<k>.pth), prune old ones, refresh the loss curve."""
    if folder is None:  # torchrun rank != 0: rank 0 alone writes
        return None
    path = folder / "snapshots" / (FINAL_NAME if state["final"] else step_name(state["step"]))
    save_snapshot(path, state)
    prune_snapshots(folder / "snapshots", keep)
    plot_loss_curve({k: v for k, v in history.items() if k not in MONITOR_KEYS}, folder / "loss_curve.png")
    if state["val"] or any(k in history for k in MONITOR_KEYS):
        plot_validation_curve(state["val"], history, folder / "val_curve.png")
    log.info(f"snapshot after step {state['step']}: {path}")
    return path


def restore(snapshot: Mapping[str, Any], model, optimizer, scheduler, generator: torch.Generator,
            config: Mapping[str, Any], log: logging.Logger) -> tuple[int, dict[str, list[float]], list[dict]]:
    """Load a snapshot's full state; returns ``(completed steps, per-step history, validation points)``.

    The config of a resumed run is the snapshot's own (config.py restores it and refuses changes
    to keys outside ``RESUME_FREE_KEYS``, engine/snapshot_config.py); the keys that did change (logging,
    ``n_steps``, ...) are logged, and so is the learning rate the restored optimizer continues with.

    Devices: the snapshot is read onto the CPU; ``load_state_dict`` copies the weights onto the
    model's device and moves the optimizer state to its parameters'. The prototype-sampling /
    dropout generator is a CPU generator on every device, so it continues exactly on any device,
    as do torch's CPU, numpy and python streams. A run resumed on another kind of device (CPU <->
    CUDA) continues with a log line saying so: torch's global CUDA streams (which this project does
    not draw from) are restored only on CUDA and for the GPUs visible (``utils.seed``), and float
    rounding differs between devices, so its losses are not bit-identical to an uninterrupted run.
    A snapshot whose generator is a CUDA generator (written before it lived on the CPU) restarts
    that generator from the run's seed, with a warning.

    Raises:
        ValueError: the snapshot is not a full training snapshot, or it already has ``n_steps`` steps.
    """
    if "optimizer" not in snapshot:
        raise ValueError("resume: the snapshot holds model weights only (no optimizer / RNG state), so "
                         "training cannot continue exactly; resume from a snapshot written by train.py")
    step = int(snapshot["step"])
    if step >= config["n_steps"]:
        raise ValueError(f"resume: the snapshot already has {step} steps and n_steps={config['n_steps']}; "
                         f"raise n_steps to train longer")
    current = plain_config(config)
    changed = sorted(k for k in current if k != "resume" and k in snapshot["config"]
                     and snapshot["config"][k] != current[k])
    if changed:
        log.info("resume: changed from the resumed run (they do not change its loss sequence): "
                 + ", ".join(f"{k} {snapshot['config'][k]!r} -> {current[k]!r}" for k in changed))
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    scheduler.load_state_dict(snapshot["scheduler"])
    cuda = next(model.parameters()).is_cuda
    if ("cuda" in snapshot["rng"]) != cuda:
        log.info(f"resume: the snapshot was written by a run {'with' if 'cuda' in snapshot['rng'] else 'without'} "
                 f"CUDA and this run {'uses' if cuda else 'does not use'} it: the prototype-sampling / dropout "
                 "generator and torch's CPU, numpy and python random streams continue; float rounding differs "
                 "between devices, so the losses are not bit-identical to an uninterrupted run")
    if not restore_generator(generator, snapshot["generator"]):
        log.warning("resume: the snapshot's prototype-sampling / dropout generator is a CUDA generator (snapshots "
                    "written before it lived on the CPU): it restarts from the run's seed, so the losses differ "
                    "from an uninterrupted run")
    for note in restore_rng_state(snapshot["rng"], cuda):
        log.info(f"resume: {note}")
    log.info(f"resume: learning rate {optimizer.param_groups[0]['lr']:.3e} (restored optimizer and schedule, "
             f"x {config['lr_step_gamma']} every {config['max_iters_per_load']} steps)")
    history = defaultdict(list, {k: list(v) for k, v in snapshot["history"].items()})
    return step, history, list(snapshot.get("val", []))


def log_interval(log: logging.Logger, step: int, window: Mapping[str, list[float]], lr: float) -> None:
    """One line of mean loss terms and monitors over the interval; a WARNING when the model predicted
    all background on every query of the interval (collapse: the reverse terms never ran)."""
    terms = ", ".join(f"{k}={sum(v) / len(v):.4f}" for k, v in window.items())
    log.info(f"step {step}: {terms}, lr={lr:.3e}")
    if window.get("fg_fraction") and max(window["fg_fraction"]) == 0.0:
        n = len(window["fg_fraction"])
        log.warning(f"all background: no query pixel was predicted foreground in steps {step - n + 1}-{step}, "
                    "so the reverse terms did not run (early training from scratch does this; if it persists "
                    "the run has collapsed: see val_curve.png)")


def log_validation(log: logging.Logger, run, step: int, point: Mapping[str, Any], seconds: float,
                   train_seconds: float) -> None:
    """Validation numbers to the log and Sacred's metrics (``val_dice_<CLASS>``, ``val_dice_mean``)."""
    for name, value in point["dice"].items():
        run.log_scalar(f"val_dice_{name}", value, step)
    run.log_scalar("val_dice_mean", point["mean"], step)
    per_class = ", ".join(f"{k} {100 * v:.2f}" for k, v in point["dice"].items())
    share = 100 * seconds / train_seconds if train_seconds > 0 else float("nan")
    log.info(f"validation after step {step}: Dice % {per_class}; mean {100 * point['mean']:.2f} "
             f"({seconds:.1f} s, {share:.1f} % of the training time since the last validation)")
    if point["all_background"]:
        log.warning(f"validation after step {step}: all background predicted for {point['all_background']} "
                    "on every validation query")


def check_collapse(val_points: list[Mapping[str, Any]], patience: int, model_name: str) -> None:
    """Stop a run whose last ``patience`` validations predicted background on every validation query
    of every class (a collapsed model: its Dice stays 0). ``patience=0`` never stops.

    A slow start is not a collapse: the rule counts only the validations after the first one that
    predicted foreground somewhere. From a random encoder QAMP validates at 0.0 after 500 steps at
    lr 0.001, 0.02 and 0.05 alike, and at 0.02 that became 32.9 at step 1000 and 60.1 at step 6000
    (CHAOST2 fold 0, docs/CPU_BUDGET.md); a run that never predicts foreground trains to the end and
    its Dice of 0 is reported, not hidden.

    Raises:
        RuntimeError: naming the steps, the method and the fix.
    """
    def blind(p: Mapping[str, Any]) -> bool:
        return bool(p["all_background"]) and len(p["all_background"]) == len(p["dice"])

    seen = next((i for i, p in enumerate(val_points) if not blind(p)), None)
    last = [] if seen is None else val_points[seen + 1:][-patience:]
    if patience == 0 or len(last) < patience or not all(blind(p) for p in last):
        return
    steps = ", ".join(str(p["step"]) for p in last)
    raise RuntimeError(
        f"model={model_name!r} collapsed: every validation query was predicted all background at steps {steps} "
        f"(mean Dice 0). This is not a result: check its threshold in the log and lower optim.lr (see "
        f"docs/CPU_BUDGET.md for the chosen rates), or set collapse_patience=0 to train on regardless")


def train_steps(run, config: Mapping[str, Any], state: TrainState, loader: DataLoader, device: torch.device,
                dist: ddp.Distributed, validation: Callable[[int, float], float] | None,
                save: Callable[[bool], Path | None], log: logging.Logger) -> float:
    """Steps ``state.step + 1 .. n_steps``: each step's values to ``state.history`` and Sacred's
    metrics, a log line every ``print_interval`` steps, ``validation(step, training seconds since the
    last one)`` every ``val_interval`` steps and after the last, an intermediate snapshot
    (``save(final=False)``) every ``save_snapshot_every``. Returns the seconds spent validating."""
    n_steps = config["n_steps"]
    window: dict[str, list[float]] = defaultdict(list)
    bar = tqdm(loader, total=n_steps, initial=state.step, desc="train", dynamic_ncols=True, disable=not dist.is_main)
    timer, train_since_val, val_seconds = time.perf_counter(), 0.0, 0.0
    for batch in bar:
        lr = state.optimizer.param_groups[0]["lr"]
        skipped = state.amp.skipped_steps
        values = train_step(state.model, state.optimizer, state.scheduler, batch, device, state.generator,
                            state.amp, dist)
        state.step += 1
        step = state.step
        if state.amp.skipped_steps > skipped:
            log.warning(f"amp=fp16: step {step} skipped by the GradScaler (inf/NaN gradients; loss "
                        f"{values['loss']}); scale now {state.amp.scaler.get_scale():g}, {state.amp.skipped_steps} "
                        "step(s) skipped in all")
        for name, value in values.items():
            state.history[name].append(value)
            window[name].append(value)
            run.log_scalar(name if name == "loss" or name in MONITOR_KEYS else f"{name}_loss", value, step)
        run.log_scalar("lr", lr, step)
        if validation is not None and (step % config["val_interval"] == 0 or step == n_steps):
            now = time.perf_counter()
            train_since_val += now - timer
            val_seconds += validation(step, train_since_val)
            train_since_val, timer = 0.0, time.perf_counter()
        bar.set_postfix(loss=f"{sum(window['loss']) / len(window['loss']):.4f}")
        if step % config["print_interval"] == 0:
            log_interval(log, step, window, lr)
            window.clear()
        if step % config["save_snapshot_every"] == 0 and step < n_steps:
            save(False)
    bar.close()
    return val_seconds


@ex.command
def train(_run, _config: Mapping[str, Any], _log: logging.Logger) -> dict[str, Any]:
    """Train on one fold; returns the run folder, final snapshot and last loss."""
    dist = ddp.setup(_config["device"])  # torchrun world; one process without torchrun
    folder = run_folder(_run) if dist.is_main else None  # ranks != 0 run --unobserved: no folder
    handler = attach_log_file(_log, folder / "logger.log") if folder else logging.NullHandler()
    try:
        device = dist.device or resolve_device(_config["device"])
        set_determinism(_config["deterministic"])
        if _config["keep_freed_memory"] and not keep_freed_memory():
            _log.info("keep_freed_memory: this C library is not glibc; malloc is left as it is")
        torch.manual_seed(_config["seed"])  # dropout's stream (the only global one used)
        _log.info(f"run folder {folder}; device {device}")

        data = resolve_dataset(_config, training=True)  # the dataset, resolved once for the whole run
        dataset, vds = build_data(_config, data, dist.is_main, _log)
        meta = run_meta(_config, data)
        state = build_state(_config, data.image_size, device, dist)
        if _config["resume"] is not None:
            resume(state, _config, dist, device, _log)

        def run_validation(step: int, train_seconds: float) -> float:
            t0 = time.perf_counter()
            point = {"step": step, **validate(state.model, vds, list(data.test_label), data.spec.label_names,
                                              _config, device)}
            state.val_points.append(point)
            seconds = time.perf_counter() - t0
            log_validation(_log, _run, step, point, seconds, train_seconds)
            check_collapse(state.val_points, _config["collapse_patience"], _config["model"])
            return seconds

        def save(final: bool) -> Path | None:  # every rank (collective), rank 0 writes
            snapshot = build_snapshot(state.step, final, state.model, state.optimizer, state.scheduler,
                                      state.generator, state.history, _config, state.val_points, meta, dist, state.amp)
            return take_snapshot(folder, snapshot, _config["keep_snapshots"], state.history, _log)

        loader = episode_loader(ddp.rank_episodes(dataset, dist), state.step, _config["n_steps"], _config["num_workers"],
                                pin_memory=device.type == "cuda")
        val_seconds = train_steps(_run, _config, state, loader, device, dist,
                                  None if vds is None else run_validation, save, _log)
        final = save(True)
        _log.info(f"end of training after {state.step} steps; final snapshot {final}"
                  + (f"; validation took {val_seconds:.1f} s in all" if vds is not None else ""))
        return {"run_dir": str(folder), "snapshot": str(final), "steps": state.step,
                "last_loss": state.history["loss"][-1] if state.history["loss"] else None,
                "val": state.val_points[-1] if state.val_points else None}
    finally:
        _log.removeHandler(handler)
        handler.close()
        ddp.teardown(dist)


if __name__ == "__main__":
    run_commandline(sys.argv, "train")
