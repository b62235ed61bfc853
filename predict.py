#!/usr/bin/env python
"""Segment your own scan: one annotated support scan in, the same organ(s) segmented in new scans out.

    python predict.py --snapshot RUN_OR_FILE --support-image S --support-label SL \\
        --query Q [--query Q2 ...] --out DIR [--classes 1 3] [--label-map 200:1,500:2,600:3] [--device auto]

``RUN_OR_FILE`` is a training run folder (its ``snapshots/final.pth``), a snapshot file, or a
reference QAMP checkpoint converted with ``python -m tools.convert``: the model is rebuilt from the
snapshot's own description (``meta``: model keys, image size, backbone, normalisation, class names,
orientation of the training scans); no config key is needed.

Inputs (``S``, ``SL``, each ``Q``) are NIfTI files or DICOM series folders of any size, spacing and
orientation (see ``dataloaders/predict_io.py``): each volume is re-oriented to the training scans'
orientation, z-scored per volume, its axial slices resampled to the model's image size; the class
probabilities go back to the query's grid (bilinear, then argmax) and the label map is written in the
query's own orientation and geometry. The query's labels are never needed.

Labels as stored: the support label may hold the values its dataset stores (e.g. MS-CMRSeg's 200 / 500 /
600): a snapshot of a dataset with a label map (``data/registry.py``, e.g. CMR: 200 / 500 / 600 -> classes
1 / 2 / 3, LV-MYO / LV-BP / RV) applies it when every value of the label is one of its stored values, and
``--label-map 200:1,500:2,600:3`` (stored value : class id) does it for any snapshot. ``--classes`` and
the written prediction use the label's own values; the JSON names each value's class id and name.

Outputs, in ``--out`` for each query ``<name>`` (file name without extension, or the DICOM folder's):
``<name>_pred.nii.gz`` (the support label's values, 0 background, uint8 or uint16 above 255, the
query's grid), ``<name>_pred.json`` (per value: class id, name, voxels, volume in mL, slice range in
the query's third voxel index, support slices used; the label map applied) and
``<name>_overlay.png`` (the query's middle slices of each predicted class, contours).
The same inputs and ``--seed`` give the same files, bit for bit. Bad input (a support label without
a requested class, a truncated or corrupt file, NaN / inf voxels, a non-3D image, a label with
non-integer values or on another grid than its image, an unreadable snapshot, ...) is one ``error:``
line naming the file and the fix, exit code 2, and nothing written. An earlier prediction of the same query
in ``--out`` is kept: the run is refused unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from data.registry import DATASETS
from dataloaders.datasets import zscore
from dataloaders.eval_dataset import pick_support_slices, split_chunks
from models import make_generator
from engine.evaluate import segment_chunks
from engine.runtime import resolve_device, set_determinism
from utils.io import write_image, write_json
from dataloaders.predict_io import (InputError, Oriented, PlaneGrid, back_to_source, check_same_grid, label_values,
                              orient, read_input, source_slice_index)
from engine.snapshot import DEFAULT_ORIENTATION, load_model, model_orientation

RULE = (
    "Slice matching: every query slice is segmented (or those of --query-range). The query's slices are "
    "split, in order, into --n-part equal chunks; chunk k is segmented against the support slice at the same "
    "relative position, (k + 1/2) / n_part, within the support's annotated extent (its slices holding the "
    "class, in order): with the default 3 chunks the annotated support slices at 1/6, 1/2 and 5/6, the rule "
    "of the evaluation protocol (test.py eval_mode=all_slices). Slices without the object come out empty "
    "through the model's own prediction; the query's labels are never used.")
log = logging.getLogger("qamp.predict")


# ----------------------------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """A scan in the model's orientation: z-scored ``image`` (Z, H, W), its in-plane grid mapping and
    the value padding takes (the volume's minimum)."""

    path: Path
    oriented: Oriented
    image: np.ndarray
    grid: PlaneGrid
    pad_value: float

    @classmethod
    def load(cls, path: Path, sitk_image: sitk.Image, orientation: str, image_size: int, what: str) -> "Volume":
        oriented = orient(sitk_image, orientation)
        try:
            image = zscore(oriented.array, path)
        except ValueError as err:
            raise InputError(f"{what} {err}") from None
        grid = PlaneGrid.make(image.shape[1:], oriented.spacing_hw, image_size)
        return cls(path, oriented, image, grid, float(image.min()))


def output_name(path: Path) -> str:
    """``<name>`` of a query: the file name without its image extension, or the DICOM folder's name."""
    name = path.name
    if path.is_dir():
        return name
    return re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd|\.dcm|\.gz)$", "", name, flags=re.IGNORECASE) or name


def query_slices(query: Volume, query_range: Sequence[int] | None) -> np.ndarray:
    """Model-frame slice indices to segment: all, or those whose source index k is in ``query_range``."""
    depth = query.image.shape[0]
    if query_range is None:
        return np.arange(depth)
    k0, k1 = int(query_range[0]), int(query_range[1])
    nk = query.oriented.source.GetSize()[2]
    if not 0 <= k0 <= k1 < nk:
        raise InputError(f"--query-range {k0} {k1} is outside query {query.path} (third index 0..{nk - 1})")
    k_of = source_slice_index(query.oriented)
    if k_of is None:
        raise InputError(f"--query-range: the third axis of query {query.path} is not its axial axis "
                         f"(orientation {query.oriented.source_code}); leave --query-range out")
    return np.flatnonzero((k_of >= k0) & (k_of <= k1))


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def segment(model: torch.nn.Module, support: Volume, support_label: np.ndarray, query: Volume,
            classes: Sequence[int], slices: np.ndarray, n_part: int, batch_size: int, device: torch.device,
            seed: int, support_feats: dict[int, torch.Tensor], bar: tqdm | None = None
            ) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Multi-class label map of ``query`` in the model's orientation on its native grid.

    Each class is segmented on its own (generator ``make_generator(seed, class)``, so a class's result
    depends on neither the other classes nor the other queries), chunk by chunk by the test protocol's
    loop (``engine.evaluate.segment_chunks``; ``support_feats`` caches the support slices' encoder
    features across classes and queries). A voxel takes the class whose foreground probability beats
    its background and is the highest among the classes.

    Returns:
        ``(labels uint8 (Z, H, W), {class: support slices used, one per chunk})``.
    """
    depth, height, width = query.image.shape
    labels = np.zeros((depth, height, width), dtype=np.uint8)
    best = np.zeros((depth, height, width), dtype=np.float32)
    used: dict[int, list[int]] = {}
    for class_id in classes:
        generator = make_generator(seed, class_id, device=device)
        used[class_id] = pick_support_slices(support_label, class_id, n_part)

        def support_input(z: int, class_id: int = class_id) -> tuple[torch.Tensor, torch.Tensor]:
            return (support.grid.images(support.image[[z]], support.pad_value).unsqueeze(0),  # (1, 1, 3, S, S)
                    support.grid.masks(support_label[[z]] == class_id).unsqueeze(0))  # (1, 1, S, S)

        chunks = zip(used[class_id], split_chunks(slices, n_part))
        for zs, out in segment_chunks(model, chunks, support_input,
                                      lambda zs: query.grid.images(query.image[zs], query.pad_value),
                                      batch_size, device, generator, support_feats):
            probs = query.grid.probabilities(out["pred"]).float().cpu().numpy()  # (N, 2, H, W)
            fg = probs[:, 1]
            wins = (fg > probs[:, 0]) & (fg > best[zs])
            labels[zs] = np.where(wins, np.uint8(class_id), labels[zs])
            best[zs] = np.where(wins, fg, best[zs])
            if bar is not None:
                bar.update(len(zs))
    return labels, used


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def support_k(support: Volume, used: dict[int, list[int]]) -> dict[int, list[int]]:
    """Support slices used per class as the support file's third voxel index (model frame when its
    third axis is not the axial one)."""
    k_of = source_slice_index(support.oriented)
    return {c: [int(z) if k_of is None else int(k_of[z]) for z in zs] for c, zs in used.items()}


def class_report(pred: sitk.Image, classes: Sequence[int], values: dict[int, int], names: dict[int, str],
                 used: dict[int, list[int]]) -> dict[str, Any]:
    """Per class, keyed by its value in the prediction (the support label's value): class id, name,
    voxels, volume in mL, slice range (third voxel index k of the output) and the support slices used
    (one per chunk)."""
    array = sitk.GetArrayFromImage(pred)  # (k, j, i)
    voxel_ml = float(np.prod(pred.GetSpacing())) / 1000.0
    report = {}
    for class_id in classes:
        mask = array == values[class_id]
        ks = np.flatnonzero(mask.any(axis=(1, 2)))
        voxels = int(mask.sum())
        report[str(values[class_id])] = {
            "class_id": class_id, "name": names[class_id], "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 4),
            "slice_range": [int(ks[0]), int(ks[-1])] if ks.size else None, "support_slices": used[class_id]}
    return report


def plot_prediction(path: Path, query: Volume, labels: np.ndarray, classes: Sequence[int],
                    names: dict[int, str], slices: np.ndarray, title: str) -> list[int]:
    """PNG of the query's middle slices (model orientation): the middle slice of each predicted class
    (at most 4 panels), or the middle of the segmented slices when nothing was found. Returns the slices."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from utils.io import atomic_write

    picks: list[int] = []
    for class_id in classes:
        zs = np.flatnonzero((labels == class_id).any(axis=(1, 2)))
        if zs.size and int(zs[zs.size // 2]) not in picks:
            picks.append(int(zs[zs.size // 2]))
    picks = sorted(picks[:4]) or [int(slices[slices.size // 2])]
    colours = ["tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:olive", "tab:pink"]
    fig = Figure(figsize=(4 * len(picks), 4.4), dpi=80)
    for i, z in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), i + 1)
        ax.imshow(query.image[z], cmap="gray")
        for c, class_id in enumerate(classes):
            mask = labels[z] == class_id
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=colours[c % len(colours)], linewidths=1.2)
        ax.set_title(f"slice {z} (model frame)", fontsize=9)
        ax.axis("off")
    legend = ", ".join(f"{names[c]} ({colours[i % len(colours)][4:]})" for i, c in enumerate(classes))
    fig.suptitle(f"{title}: {legend}", fontsize=9)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return picks


# ----------------------------------------------------------------------------------------------
# Labels as stored
# ----------------------------------------------------------------------------------------------
MAX_STORED_VALUE = 65535  # the prediction holds the label's values: uint8, or uint16 above 255


def parse_label_map(text: str) -> dict[int, int]:
    """``--label-map 200:1,500:2,600:3`` -> ``{200: 1, 500: 2, 600: 3}`` (stored value -> class id)."""
    example = "e.g. --label-map 200:1,500:2,600:3"
    label_map: dict[int, int] = {}
    for item in text.split(","):
        stored, sep, class_id = item.strip().partition(":")
        try:
            pair = int(stored), int(class_id)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected STORED:ID pairs, {example}; got {item!r}") from None
        if not sep or not 1 <= pair[0] <= MAX_STORED_VALUE or not 1 <= pair[1] <= 255:
            raise argparse.ArgumentTypeError(f"{item!r}: stored values must be in 1..{MAX_STORED_VALUE} and class "
                                             f"ids in 1..255 (0 is the background, mapped to 0), {example}")
        if pair[0] in label_map or pair[1] in label_map.values():
            raise argparse.ArgumentTypeError(f"{item!r}: each stored value and each class id may appear once")
        label_map[pair[0]] = pair[1]
    return label_map


def choose_label_map(present: Sequence[int], requested: Sequence[int], explicit: dict[int, int] | None,
                     dataset: str | None, label: Path) -> dict[int, int] | None:
    """The stored value -> class id map of a support label holding the non-zero ``present`` values, of
    which ``requested`` are segmented: ``--label-map``; else the snapshot's dataset's
    (``data/registry.py``) when every present value is one of its stored values; else None (the
    values are the class ids).

    Raises:
        InputError: requested values the map does not map, or above 255 without a map.
    """
    spec = DATASETS.get(str(dataset))
    stored = {k: v for k, v in spec.label_remap.items() if k != 0} if spec is not None else {}
    label_map = explicit if explicit is not None else (stored if stored and set(present) <= set(stored) else None)
    if label_map is not None:
        unmapped = [v for v in requested if v not in label_map]
        if unmapped:
            raise InputError(f"the support label {label} holds values {unmapped} that --label-map does not map (it "
                             f"maps {sorted(label_map)}): add them to --label-map, e.g. {unmapped[0]}:<class id>")
        return label_map
    large = [v for v in requested if v > 255]
    if large:
        hint = ("" if not stored else f"; dataset {spec.name}'s own map is "
                + ",".join(f"{k}:{v}" for k, v in sorted(stored.items())) + ", but the label also holds other values")
        raise InputError(f"the support label {label} holds values {large} above 255 and no label map says which "
                         f"classes they are (snapshot dataset {dataset}{hint}): pass --label-map STORED:ID,..., e.g. "
                         "--label-map 200:1,500:2,600:3")
    return None


def value_table(values: dict[int, int]) -> np.ndarray:
    """Class id -> the label's value, as a lookup table over the model's uint8 ids (uint8, or uint16
    when a value exceeds 255)."""
    table = np.zeros(256, dtype=np.uint8 if max(values.values(), default=0) <= 255 else np.uint16)
    for class_id, value in values.items():
        table[class_id] = value
    return table


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="predict.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment query scans from one annotated support scan with a trained QAMP snapshot.",
        epilog=RULE + "\n\nInputs may have any size, spacing and orientation: they are re-oriented to the "
                      "training scans' orientation, z-scored per volume and their axial slices resampled to "
                      "the model's image size; predictions are written on the query's own grid and geometry.")
    parser.add_argument("--snapshot", required=True, help="training run folder, snapshot .pth, or converted "
                                                         "reference checkpoint (python -m tools.convert)")
    parser.add_argument("--support-image", required=True, type=Path, help="support scan: NIfTI file or DICOM folder")
    parser.add_argument("--support-label", required=True, type=Path,
                        help="its label map (same grid; 0 background, class ids as integers)")
    parser.add_argument("--query", required=True, type=Path, action="append",
                        help="query scan (NIfTI file or DICOM folder); repeat for several")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prediction, JSON and overlay of a query already in --out (default: refuse)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="classes to segment, as the support label stores them (default: every class of "
                             "the support label)")
    parser.add_argument("--label-map", type=parse_label_map, default=None, metavar="STORED:ID,...",
                        help="stored label value -> class id of the snapshot, e.g. 200:1,500:2,600:3 (default: "
                             "the snapshot's dataset's map when the label holds its stored values, e.g. CMR)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:<i>")
    parser.add_argument("--seed", type=int, default=2025, help="prototype sampling seed (default 2025)")
    parser.add_argument("--n-part", type=int, default=3, help="query chunks, each with its own support slice (default 3)")
    parser.add_argument("--query-range", type=int, nargs=2, default=None, metavar=("K0", "K1"),
                        help="segment only the query slices K0..K1 (inclusive; the query's third voxel index)")
    parser.add_argument("--batch-size", type=int, default=16, help="query slices per forward (default 16)")
    parser.add_argument("--orientation", default=None,
                        help="ITK orientation code the model expects (default: the snapshot's, else its "
                             f"dataset's in data/registry.py, else {DEFAULT_ORIENTATION})")
    args = parser.parse_args(argv)
    for key in ("n_part", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Read and check every input before anything is written.

    Raises:
        InputError: the first problem found (see the module docstring).
    """
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"--device {args.device}: {err}") from None
    try:
        loaded = load_model(args.snapshot, device)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"--snapshot {args.snapshot}: {err}") from None
    model, meta, snapshot = loaded.model, loaded.meta, loaded.path
    orientation = (args.orientation or model_orientation(meta)).upper()
    if sorted({"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(a, 9) for a in orientation) != [0, 1, 2]:
        raise InputError(f"--orientation {orientation!r}: expected an ITK code such as LAS, LPS or RAS")
    size = int(meta["image_size"])

    support_image = read_input(args.support_image, "support image")
    support_label_image = read_input(args.support_label, "support label")
    check_same_grid(support_image, support_label_image, str(args.support_image), str(args.support_label))
    support = Volume.load(args.support_image, support_image, orientation, size, "support image")
    stored = label_values(orient(support_label_image, orientation).array, str(args.support_label))
    present = [int(v) for v in np.unique(stored) if v != 0]
    if not present:
        raise InputError(f"the support label {args.support_label} holds no annotated voxel (all 0)")
    requested = present if args.classes is None else list(dict.fromkeys(args.classes))
    missing = [c for c in requested if c not in present]
    if missing:
        raise InputError(f"the support label {args.support_label} holds no voxel of class {missing} (it holds "
                         f"classes {present}): choose --classes among them (the label's own values), or annotate the support")
    if max(requested) > MAX_STORED_VALUE:
        raise InputError(f"the support label {args.support_label} holds class {max(requested)}: values above "
                         f"{MAX_STORED_VALUE} cannot be written (uint16 prediction); renumber its classes")
    label_map = choose_label_map(present, requested, args.label_map, meta.get("dataset"), args.support_label)
    to_id = label_map or {v: v for v in requested}
    support_label = np.zeros(stored.shape, dtype=np.uint8)  # class ids, as the model's training labels
    for value in requested:
        support_label[stored == value] = to_id[value]
    classes = [to_id[v] for v in requested]
    values = {to_id[v]: v for v in requested}
    spec = DATASETS.get(str(meta.get("dataset")))
    known = {**({str(k): v for k, v in spec.label_names.items()} if spec else {}), **meta.get("class_names", {})}
    names = {c: known.get(str(c), f"class{c}") for c in classes}

    queries, seen = [], {}
    for path in args.query:
        name = output_name(path)
        if name in seen:
            raise InputError(f"queries {seen[name]} and {path} would both write {name}_pred.nii.gz: rename one")
        seen[name] = path
        volume = Volume.load(path, read_input(path, "query"), orientation, size, "query")
        queries.append((name, volume, query_slices(volume, args.query_range)))
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")
    return {"device": device, "model": model, "meta": meta, "snapshot": snapshot, "orientation": orientation,
            "support": support, "support_label": support_label, "classes": classes, "values": values,
            "names": names, "label_map": label_map, "queries": queries}


def check_no_earlier_prediction(out: Path, names: list[str]) -> None:
    """Refuse to replace an earlier prediction, JSON or overlay of these queries in ``out`` (``--overwrite`` does)."""
    earlier = [out / f"{name}{suffix}" for name in names for suffix in ("_pred.nii.gz", "_pred.json", "_overlay.png")
               if (out / f"{name}{suffix}").exists()]
    if earlier:
        more = f" and {len(earlier) - 1} more file(s)" if len(earlier) > 1 else ""
        raise InputError(f"--out {out} already holds a prediction ({earlier[0].name}{more}): "
                         f"choose another --out, or pass --overwrite to replace it")


def predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check the inputs, then segment and write every query; returns the per-query reports."""
    set_determinism(True)
    torch.manual_seed(args.seed)
    job = prepare(args)
    if not args.overwrite:
        check_no_earlier_prediction(args.out, [name for name, _, _ in job["queries"]])
    args.out.mkdir(parents=True, exist_ok=True)
    support_feats: dict[int, torch.Tensor] = {}
    reports = []
    for name, query, slices in job["queries"]:
        t0 = time.perf_counter()
        with tqdm(total=slices.size * len(job["classes"]), desc=name, unit="slice", dynamic_ncols=True) as bar:
            labels, used = segment(job["model"], job["support"], job["support_label"], query, job["classes"],
                                   slices, args.n_part, args.batch_size, job["device"], args.seed, support_feats, bar)
        seconds = time.perf_counter() - t0
        pred = back_to_source(value_table(job["values"])[labels], query.oriented)  # the label's own values
        write_image(pred, args.out / f"{name}_pred.nii.gz")
        k_of = source_slice_index(query.oriented)
        report = {
            "query": str(query.path), "prediction": f"{name}_pred.nii.gz",
            "support_image": str(args.support_image), "support_label": str(args.support_label),
            "snapshot": str(job["snapshot"]), "seed": args.seed, "n_part": args.n_part,
            "query_range": list(args.query_range) if args.query_range else None,
            "segmented_slices": int(slices.size),
            "segmented_k_range": None if k_of is None else [int(k_of[slices].min()), int(k_of[slices].max())],
            "orientation": {"query": query.oriented.source_code, "model": job["orientation"]},
            "model_image_size": int(job["meta"]["image_size"]), "spacing_mm": list(pred.GetSpacing()),
            "slice_range_index": "k, the third voxel index of the query and of the prediction",
            "label_map": None if job["label_map"] is None else {str(k): v for k, v in job["label_map"].items()},
            "classes": class_report(pred, job["classes"], job["values"], job["names"],
                                    support_k(job["support"], used)),
            "rule": RULE}
        write_json(args.out / f"{name}_pred.json", report)
        plot_prediction(args.out / f"{name}_overlay.png", query, labels, job["classes"], job["names"], slices, name)
        per_slice = seconds / max(1, slices.size * len(job["classes"]))
        print(f"{name}: {slices.size} slices x {len(job['classes'])} classes in {seconds:.1f} s "
              f"({per_slice:.3f} s per slice and class) -> {args.out / (name + '_pred.nii.gz')}; "
              + ", ".join(f"{c['name']} {c['volume_ml']:.1f} mL" for c in report["classes"].values()))
        reports.append({**report, "seconds": seconds, "seconds_per_slice": per_slice})
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        predict(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
