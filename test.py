#!/usr/bin/env python
"""Evaluate a trained model (or the copy-support baseline) with the FSMIS protocol on one fold.

    python test.py with abd_mri eval_fold=0 reload_model_path=runs/train_CHAOST2_setting1_fold0
    python test.py with abd_mri eval_fold=0 reload_model_path=runs/.../snapshots/final.pth supp_idx=1
    python test.py with abd_mri eval_fold=0 model=copy_support          # baseline, no network
    python test.py with reload_model_path=runs/train_CHAOST2_setting1_fold0 supp_idx=1   # the run's own keys

The model is built from the snapshot (its ``meta``: model keys, ``image_size``, backbone): model keys
given on the command line that disagree with it are refused, naming both values, before a run folder
exists. ``dataset``, ``data_dir``, ``setting``, ``eval_fold`` and ``test_label`` default to the
snapshot's training values; given, they are used (e.g. another fold or dataset). See engine/snapshot_config.py.

Protocol (``eval_mode='protocol'``, docs/METHOD.md §6): support = the fold's scan at position
``supp_idx``; for each class of ``test_label``, the support slices at 1/6, 1/2, 5/6 of its slices
holding the class; each other fold scan is a query, keeping only its slices holding the class (this
uses the query's labels, as every published table does), split into ``n_part`` chunks; chunk k is
segmented with support slice k. ``eval_mode='all_slices'`` segments every query slice instead.

With ``image_size`` set, the model sees slices resampled to ``image_size`` (image bilinear, support
mask nearest) and its class probabilities are resampled back to the scan's native grid (bilinear,
then argmax) before Dice, NIfTI and overlays: every score is on the native grid.
Each support slice goes through the encoder once per run (its features are cached across classes
and query scans); per chunk the support prototypes are drawn (``model.encode_support``) and the
chunk's query slices go through ``model.segment`` in batches of ``test_batch_size``. Prototype sampling draws from one generator per
class, seeded by (seed, class id): the numbers of a class do not depend on which other classes are
tested, and two runs with the same seed give identical numbers.
``model='copy_support'`` pastes the support mask of the matching chunk onto every query slice.

Outputs, in the run folder ``<path.log_dir>/test_<dataset>_setting<k>_fold<f>_supp<i>[_n]``:
- ``scores.csv``: one row per query scan and class: fold, supp_idx, seed, scan, class, class_name,
  dice, iou, tp, fp, fn, slices (3D counts over the evaluated slices; see utils.metrics for the
  empty-mask rule);
- ``summary.json``: per class mean and std (population, ddof 0) of Dice / IoU over query scans,
  and the overall mean over classes;
- ``predictions/scan<id>_class<c>_<NAME>.nii.gz``: one file per query scan and class, uint8 with
  values {0, c} (c = class id), on the query scan's grid (spacing, origin, direction copied), zero on
  slices that were not evaluated;
- ``overlays/scan<id>_class<c>_z<z>.png``: ``n_overlay_slices`` slices per scan and class (support
  slice + mask, query, ground truth, prediction, QPG prior);
- Sacred's files and ``logger.log``.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
import torch

from config import ex, run_commandline
from dataloaders.eval_dataset import EvalDataset, ProtocolKeys
from dataloaders.resolved import resolve_dataset
from models import make_generator
from engine.amp import Amp
from engine.evaluate import predict_scan
from utils.io import write_image, write_json, write_text
from engine.malloc import keep_freed_memory
from utils.metrics import overlap
from utils.plots import plot_overlay
from engine.runtime import attach_log_file, resolve_device, run_folder, set_determinism
from engine.snapshot import LoadedModel, load_model

CSV_COLUMNS = ("fold", "supp_idx", "seed", "scan", "class", "class_name", "dice", "iou", "tp", "fp",
               "fn", "slices")


@dataclass
class ScanResult:
    """One row of ``scores.csv``."""

    fold: int
    supp_idx: int
    seed: int
    scan: int
    class_id: int
    class_name: str
    dice: float
    iou: float
    tp: int
    fp: int
    fn: int
    slices: int

    def row(self) -> list[Any]:
        values = asdict(self)
        values["class"] = values.pop("class_id")
        return [values[c] for c in CSV_COLUMNS]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def load_test_model(config: Mapping[str, Any], image_size: int, device: torch.device,
                    log: logging.Logger) -> LoadedModel | None:
    """The model of ``reload_model_path`` (``engine.snapshot.load_model``: built from the snapshot's
    ``meta``, which the config's model keys equal, see engine/snapshot_config.py); None for copy_support.
    ``image_size``: the size the model sees, used for old snapshots that do not state it.

    Raises:
        FileNotFoundError: no snapshot at ``reload_model_path``.
        ValueError: the snapshot cannot be used (the message names ``reload_model_path`` and why).
    """
    if config["model"] == "copy_support":
        return None
    try:
        loaded = load_model(config["reload_model_path"], device, compute=config, image_size=image_size)
    except ValueError as err:
        raise ValueError(f"reload_model_path={config['reload_model_path']!r}: {err}") from None
    log.info(f"loaded {loaded.path} (step {loaded.step if loaded.step is not None else 'unknown'}; model "
             f"{config['model']}, backbone {config['backbone']}, image size {image_size})")
    return loaded


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def write_prediction(pred: np.ndarray, class_id: int, reference: sitk.Image, path: Path) -> None:
    """Write a {0, 1} prediction as a uint8 {0, class_id} NIfTI on ``reference``'s grid."""
    image = sitk.GetImageFromArray((pred * np.uint8(class_id)).astype(np.uint8))
    image.CopyInformation(reference)
    write_image(image, path)


def write_overlays(folder: Path, tds, scan, class_id: int, pred: np.ndarray, prior: np.ndarray | None,
                   support_of: np.ndarray, n_slices: int) -> None:
    """Overlay PNGs for ``n_slices`` evenly spaced segmented slices of the scan."""
    segmented = np.flatnonzero(support_of >= 0)
    if n_slices == 0 or segmented.size == 0:
        return
    picks = segmented[np.unique(np.linspace(0, segmented.size - 1, n_slices).round().astype(int))]
    for z in picks:
        sz = int(support_of[z])
        plot_overlay(folder / f"scan{scan.scan_id}_class{class_id}_z{z}.png",
                     support_image=tds.support.image[sz], support_mask=tds.support.label[sz] == class_id,
                     query_image=scan.image[z], ground_truth=scan.label[z] == class_id,
                     prediction=pred[z], prior=None if prior is None else prior[z],
                     title=f"scan {scan.scan_id}, class {class_id}, query z={z}, support z={sz}")


def write_scores(path: Path, results: list[ScanResult]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(r.row() for r in results)
    write_text(path, buffer.getvalue())


def summarize_scores(results: list[ScanResult], header: Mapping[str, Any]) -> dict[str, Any]:
    """Per-class mean / std (ddof 0) over query scans and the mean over classes; ``nan`` scores
    (both masks empty, see utils.metrics) are left out and counted."""
    classes: dict[str, Any] = {}
    for class_id in dict.fromkeys(r.class_id for r in results):
        rows = [r for r in results if r.class_id == class_id]
        dice = np.array([r.dice for r in rows], dtype=np.float64)
        iou = np.array([r.iou for r in rows], dtype=np.float64)
        defined = ~np.isnan(dice)
        classes[str(class_id)] = {
            "name": rows[0].class_name,
            "dice_mean": float(dice[defined].mean()) if defined.any() else None,
            "dice_std": float(dice[defined].std()) if defined.any() else None,
            "iou_mean": float(iou[defined].mean()) if defined.any() else None,
            "iou_std": float(iou[defined].std()) if defined.any() else None,
            "n_scans": int(defined.sum()), "n_undefined": int((~defined).sum())}
    dice_means = [c["dice_mean"] for c in classes.values() if c["dice_mean"] is not None]
    iou_means = [c["iou_mean"] for c in classes.values() if c["iou_mean"] is not None]
    return {**header, "classes": classes,
            "mean_dice": float(np.mean(dice_means)) if dice_means else None,
            "mean_iou": float(np.mean(iou_means)) if iou_means else None}


@ex.command
def test(_run, _config: Mapping[str, Any], _log: logging.Logger) -> dict[str, Any]:
    """Run the protocol over ``test_label``; returns the run folder and the summary."""

    folder = run_folder(_run)
    handler = attach_log_file(_log, folder / "logger.log")
    try:
        device = resolve_device(_config["device"])
        set_determinism(_config["deterministic"])
        if _config["keep_freed_memory"] and not keep_freed_memory():
            _log.info("keep_freed_memory: this C library is not glibc; malloc is left as it is")
        torch.manual_seed(_config["seed"])
        data = resolve_dataset(_config, training=False)  # the dataset, resolved once for the run
        spec, test_label, image_size = data.spec, list(data.test_label), data.image_size
        loaded = load_test_model(_config, image_size, device, _log)
        model = None if loaded is None else loaded.model
        if model is not None:
            Amp(_config["amp"], device).apply(model)  # amp != 'off': encoder under autocast (engine/amp.py)
        tds = EvalDataset(data, ProtocolKeys.from_config(_config), _config["eval_fold"], _config["supp_idx"])
        _log.info(f"run folder {folder}; device {device}; support scan {tds.support.scan_id}; "
                  f"queries {[q.scan_id for q in tds.queries]}; classes {test_label}")
        (folder / "predictions").mkdir()
        (folder / "overlays").mkdir()

        results: list[ScanResult] = []
        support_feats: dict[int, torch.Tensor] = {}  # support slice -> encoder features, shared by all queries
        for class_id in test_label:
            name = spec.label_names[class_id]
            generator = None if model is None else make_generator(_config["seed"], class_id, device=device)
            for scan in tds.queries:
                pred, prior, support_of = predict_scan(model, tds, scan, class_id, _config["test_batch_size"],
                                                       device, generator, support_feats)
                evaluated = support_of >= 0
                scores = overlap(pred[evaluated], scan.label[evaluated] == class_id)
                results.append(ScanResult(_config["eval_fold"], _config["supp_idx"], _config["seed"],
                                          scan.scan_id, class_id, name, scores.dice, scores.iou,
                                          scores.tp, scores.fp, scores.fn, int(evaluated.sum())))
                _log.info(f"class {class_id} {name}, scan {scan.scan_id}: dice {scores.dice:.4f} "
                          f"({int(evaluated.sum())} slices)")
                write_prediction(pred, class_id, scan.reference,
                                 folder / "predictions" / f"scan{scan.scan_id}_class{class_id}_{name}.nii.gz")
                write_overlays(folder / "overlays", tds, scan, class_id, pred, prior, support_of,
                               _config["n_overlay_slices"])
            class_dice = [r.dice for r in results if r.class_id == class_id]
            _log.info(f"class {class_id} {name}: mean dice {np.nanmean(class_dice):.4f}")

        header = {"dataset": _config["dataset"], "fold": _config["eval_fold"], "supp_idx": _config["supp_idx"],
                  "seed": _config["seed"], "model": _config["model"], "eval_mode": _config["eval_mode"],
                  "n_part": _config["n_part"], "support_scan": tds.support.scan_id,
                  "snapshot": None if loaded is None else str(loaded.path), "std": "population (ddof 0) over scans",
                  "model_image_size": image_size, "dice_grid": "native"}
        summary = summarize_scores(results, header)
        write_scores(folder / "scores.csv", results)
        write_json(folder / "summary.json", summary)
        _log.info(f"mean dice over classes {summary['mean_dice']}; outputs in {folder}")
        return {"run_dir": str(folder), "mean_dice": summary["mean_dice"], "test_label": test_label}
    finally:
        _log.removeHandler(handler)
        handler.close()


if __name__ == "__main__":
    run_commandline(sys.argv, "test")
