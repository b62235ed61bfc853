#!/usr/bin/env python
"""Self-supervised episodic training of QAMP (or the ADNet head) on one cross-validation fold.

    python train.py with abd_mri setting1 eval_fold=0
    python train.py with abd_ct setting2 eval_fold=3 n_steps=2000 backbone=resnet50
    python train.py with resume=runs/train_CHAOST2_setting1_fold0        # continue a run

Schedule (the reference's): SGD (lr 1e-3, momentum 0.9, weight decay 5e-4), batch 1, the learning
rate multiplied by ``lr_step_gamma`` every ``max_iters_per_load`` steps, ``n_steps`` steps. Episode
``k`` is ``TrainDataset.episode(k)``, a pure function of (seed, k), so a resumed run sees the same
episodes as an uninterrupted one; dropout draws from torch's global stream, seeded from ``seed`` and
saved in every snapshot with the prototype-sampling generator.

Outputs, in the run folder ``<path.log_dir>/train_<dataset>_setting<k>_fold<f>[_n]``:
``config.json``, ``run.json``, ``cout.txt``, ``metrics.json`` (Sacred; per-step loss terms and lr),
``logger.log``, ``loss_curve.png`` (refreshed at each snapshot), ``snapshots/step_<k>.pth`` (every
``save_snapshot_every`` steps, the last ``keep_snapshots`` kept) and ``snapshots/final.pth``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import RunFolderObserver, ex, run_commandline
from dataloaders.datasets import get_dataset
from dataloaders.train_dataset import StepSampler, TrainDataset, worker_init_fn
from models import build_model, make_generator
from utils import distributed as ddp
from utils.amp import Amp
from utils.malloc import keep_freed_memory
from utils.plots import plot_loss_curve
from utils.seed import capture_rng_state, restore_rng_state
from utils.snapshot import (FINAL_NAME, SNAPSHOT_FORMAT, find_snapshot, load_snapshot, prune_snapshots,
                            save_snapshot, step_name)

# Keys that may differ between a run and the run it resumes (they do not change the loss sequence).
RESUME_FREE_KEYS = {"resume", "n_steps", "path", "num_workers", "print_interval", "save_snapshot_every",
                    "keep_snapshots", "device", "reload_model_path", "supp_idx", "n_part", "eval_mode",
                    "test_batch_size", "n_overlay_slices"}


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------
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
    """The run's folder, created by :class:`config.RunFolderObserver`."""
    for observer in run.observers:
        if isinstance(observer, RunFolderObserver) and observer.dir is not None:
            return Path(observer.dir)
    raise RuntimeError("this run has no run folder: do not start it unobserved (-u / --unobserved)")


def attach_log_file(log: logging.Logger, path: Path) -> logging.Handler:
    """Also write ``log``'s records to ``path`` (``logger.log`` of the run folder)."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
    log.addHandler(handler)
    return handler


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Sacred's read-only config as plain JSON types (storable with ``weights_only`` loading)."""
    return json.loads(json.dumps(config))


def resolve_labels(config: Mapping[str, Any], spec) -> tuple[list[int], list[int]]:
    """``(test_label, exclude_label)`` with the defaults filled in.

    ``test_label=None`` means the dataset's standard test classes; ``exclude_label=None`` follows
    ``setting``: nothing in setting 1, the test classes in setting 2.
    """
    test_label = spec.check_labels("test_label", config["test_label"] or list(spec.test_labels))
    if config["exclude_label"] is not None:
        exclude = spec.check_labels("exclude_label", config["exclude_label"])
    else:
        exclude = list(test_label) if config["setting"] == 2 else []
    return test_label, exclude


def build_dataset(config: Mapping[str, Any]):
    """The fold's training episodes and the dataset spec."""
    spec = get_dataset(config["dataset"], config["data_dir"])
    test_label, exclude_label = resolve_labels(config, spec)
    dataset = TrainDataset(
        config["dataset"], config["data_dir"], config["eval_fold"],
        use_gt=config["use_gt"], test_label=test_label, exclude_label=exclude_label,
        exclude_mode=config["exclude_mode"], n_shot=config["n_shot"], min_size=config["min_size"],
        max_iters_per_load=config["max_iters_per_load"], n_sv=config["n_sv"],
        supervoxel_dir=config["supervoxel_dir"], augment=config["augment"], seed=config["seed"],
        n_steps=config["n_steps"])
    return dataset, spec


def episode_loader(dataset, start: int, n_steps: int, num_workers: int) -> DataLoader:
    """Episodes ``start .. n_steps - 1`` in order (index = global step), batch 1."""
    return DataLoader(dataset, batch_size=1, sampler=StepSampler(start, n_steps), num_workers=num_workers,
                      worker_init_fn=worker_init_fn, pin_memory=torch.cuda.is_available())


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
    """One SGD step on one episode; returns the weighted total ``'loss'`` and each unweighted term.

    ``amp``: mixed precision (utils/amp.py); ``dist``: torchrun ranks, whose gradients are averaged
    and whose returned values are the means over ranks (utils/distributed.py)."""
    inputs = to_model_inputs(batch, device)
    out = model(inputs["supp_imgs"], inputs["supp_masks"], inputs["qry_imgs"], inputs["qry_labels"],
                generator=generator)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} (terms "
                                 f"{ {k: v.item() for k, v in out['losses'].items()} })")
    optimizer.zero_grad(set_to_none=True)
    ddp.backward_step(loss, model, optimizer, amp, dist)  # backward, all-reduce (DDP), step (fp16: scaled)
    scheduler.step()
    values = {"loss": loss.item()}
    values.update({name: term.item() for name, term in out["losses"].items()})
    return values if dist is None else ddp.mean_values(values, dist)


def snapshot_state(step: int, final: bool, model, optimizer, scheduler, generator: torch.Generator,
                   history: Mapping[str, list[float]], config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything needed to continue exactly after ``step`` completed steps (see utils.snapshot)."""
    return {"format": SNAPSHOT_FORMAT, "step": step, "final": final,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": capture_rng_state(),
            "generator": generator.get_state(), "history": {k: list(v) for k, v in history.items()},
            "config": plain_config(config)}


def take_snapshot(folder: Path | None, state: dict[str, Any], keep: int, history, log: logging.Logger) -> Path | None:
    """Write ``state`` (final.pth or step_<k>.pth), prune old ones, refresh the loss curve."""
    if folder is None:  # torchrun rank != 0: rank 0 alone writes
        return None
    path = folder / "snapshots" / (FINAL_NAME if state["final"] else step_name(state["step"]))
    save_snapshot(path, state)
    prune_snapshots(folder / "snapshots", keep)
    plot_loss_curve(history, folder / "loss_curve.png")
    log.info(f"snapshot after step {state['step']}: {path}")
    return path


def restore(snapshot: Mapping[str, Any], model, optimizer, scheduler, generator: torch.Generator,
            config: Mapping[str, Any], log: logging.Logger) -> tuple[int, dict[str, list[float]]]:
    """Load a snapshot's full state; returns ``(completed steps, loss history)``.

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
    changed = sorted(k for k in config if k not in RESUME_FREE_KEYS
                     and snapshot["config"].get(k) != plain_config({k: config[k]})[k])
    if changed:
        log.warning("resume: these keys differ from the resumed run, so the loss sequence will differ "
                    "from an uninterrupted run: "
                    + ", ".join(f"{k}={snapshot['config'].get(k)!r}->{config[k]!r}" for k in changed))
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    scheduler.load_state_dict(snapshot["scheduler"])
    generator.set_state(snapshot["generator"])
    restore_rng_state(snapshot["rng"])
    history = defaultdict(list, {k: list(v) for k, v in snapshot["history"].items()})
    return step, history


def log_interval(log: logging.Logger, step: int, window: Mapping[str, list[float]], lr: float) -> None:
    terms = ", ".join(f"{k}={sum(v) / len(v):.4f}" for k, v in window.items())
    log.info(f"step {step}: {terms}, lr={lr:.3e}")


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

        dataset, spec = build_dataset(_config)
        model = build_model(_config, spec.image_size).to(device).train()
        ddp.broadcast_parameters(model, dist)
        amp = Amp(_config["amp"], device).apply(model)  # encoder under autocast (amp != 'off')
        optimizer, scheduler = build_optimizer(model, _config)
        generator = make_generator(_config["seed"], *dist.generator_keys, device=device)  # sampling + dropout
        start, history = 0, defaultdict(list)
        if _config["resume"] is not None:
            source = find_snapshot(_config["resume"], which="latest")
            snapshot = load_snapshot(source, map_location=device)
            start, history = restore(snapshot, model, optimizer, scheduler, generator, _config, _log)
            ddp.restore_extras(snapshot, dist, generator, amp, source=str(source))  # rank states, scaler
            _log.info(f"resumed from {source} after step {start}")

        n_steps = _config["n_steps"]
        window: dict[str, list[float]] = defaultdict(list)
        loader = episode_loader(ddp.rank_episodes(dataset, dist), start, n_steps, _config["num_workers"])
        bar = tqdm(loader, total=n_steps, initial=start, desc="train", dynamic_ncols=True, disable=not dist.is_main)
        step = start
        for batch in bar:
            lr = optimizer.param_groups[0]["lr"]
            values = train_step(model, optimizer, scheduler, batch, device, generator, amp, dist)
            step += 1
            for name, value in values.items():
                history[name].append(value)
                window[name].append(value)
                _run.log_scalar(name if name == "loss" else f"{name}_loss", value, step)
            _run.log_scalar("lr", lr, step)
            bar.set_postfix(loss=f"{sum(window['loss']) / len(window['loss']):.4f}")
            if step % _config["print_interval"] == 0:
                log_interval(_log, step, window, lr)
                window.clear()
            if step % _config["save_snapshot_every"] == 0 and step < n_steps:
                take_snapshot(folder, snapshot_state(step, False, model, optimizer, scheduler, generator, history,
                                                     _config) | ddp.snapshot_extras(dist, generator, amp),
                              _config["keep_snapshots"], history, _log)
        bar.close()
        final = take_snapshot(folder, snapshot_state(step, True, model, optimizer, scheduler, generator, history,
                                                     _config) | ddp.snapshot_extras(dist, generator, amp),
                              _config["keep_snapshots"], history, _log)
        _log.info(f"end of training after {step} steps; final snapshot {final}")
        return {"run_dir": str(folder), "snapshot": str(final), "steps": step,
                "last_loss": history["loss"][-1] if history["loss"] else None}
    finally:
        _log.removeHandler(handler)
        handler.close()
        ddp.teardown(dist)


if __name__ == "__main__":
    run_commandline(sys.argv, "train")
