"""Any NIfTI MR data set (image + label pairs) through the SSL-ALPNet MR recipe; CMR is a preset.

Pairs are found by two regular expressions, searched in every file path under ``--raw`` (relative,
``/``-separated); each must have a named group ``id`` and the two ids pair an image with its label.
Recipe: optional reorientation, clip at a percentile, linear resampling to a spacing (label:
per-class), centre crop / pad in-plane; label values are checked against an explicit set (or mapped
through an explicit map) so that an unexpected value is an error, not a silent new class.

Presets:

* ``CMR`` (MS-CMRSeg 2019 bSSFP / C0): ``patient<N>_C0.nii.gz`` with ``patient<N>_C0_manual.nii.gz``
  (anywhere under ``--raw``, e.g. ``c0t2lge/`` and ``labels/``), labels 200 / 500 / 600 kept on
  disk, 1.25 x 1.25 x 7.99 mm, 256 x 256.
* ``Prostate_MRI`` (QAMP's pelvic set): class names and label set 0..8; give ``--spacing`` and the
  file patterns of your copy.

Any other data set name writes a ``dataset.json`` (label names, image size) beside the scans, so the
loaders' ``dataset='custom'`` reads the folder as it is.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from data.preprocess.common import (DATASETS, DatasetSpec, PreprocessError, check_label_values,
                                    check_same_grid, label_image, reorient, standardize_mr)
from data.preprocess.output import Case, Processed, check_output_free, write_dataset
from data.registry import CUSTOM_SPEC_FILE  # read by dataloaders.datasets.load_custom_spec
from utils.io import read_volume

GENERIC_DEFAULTS: dict[str, Any] = {
    "image_pattern": r"(^|/)images?(Tr)?/(?P<id>[^/]+?)(_0000)?\.nii(\.gz)?$",
    "label_pattern": r"(^|/)labels?(Tr)?/(?P<id>[^/]+?)\.nii(\.gz)?$",
    "spacing": None,              # (x, y, z) mm, None entries keep that axis; required overall
    "crop_xy": (256, 256),
    "clip_percentile": 99.5,
    "orientation": None,          # e.g. "LAS"; None keeps the stored orientation
    "label_map": None,            # {stored value: output value}; values outside it are errors
    "label_values": None,         # allowed output values when no map is given
    "renumber": False,            # ids 0..N-1 in sorted order (forced when ids are not integers)
}
PRESETS: dict[str, dict[str, Any]] = {
    "CMR": {
        "image_pattern": r"(^|/)patient(?P<id>\d+)_C0\.nii(\.gz)?$",
        "label_pattern": r"(^|/)patient(?P<id>\d+)_C0_manual\.nii(\.gz)?$",
        "spacing": (1.25, 1.25, 7.99),
        "label_values": (0, 200, 500, 600),
    },
    "Prostate_MRI": {"label_values": tuple(range(9))},
}


def _sort_key(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def discover(raw: Path, image_pattern: str, label_pattern: str, renumber: bool) -> tuple[list[Case], dict]:
    """Pair images and labels under ``raw`` by the ``id`` group of the two patterns.

    Returns:
        ``(cases sorted by id, id_map output id -> original id)``.
    """
    if not raw.is_dir():
        raise PreprocessError(f"--raw: folder not found: {raw}")
    image_re, label_re = re.compile(image_pattern), re.compile(label_pattern)
    for name, rx in (("image_pattern", image_re), ("label_pattern", label_re)):
        if "id" not in rx.groupindex:
            raise ValueError(f"{name}: expected a named group (?P<id>...), got {rx.pattern!r}")
    files = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    images: dict[str, str] = {}
    labels: dict[str, str] = {}
    for rel in files:
        for found, rx, kind in ((labels, label_re, "label"), (images, image_re, "image")):
            m = rx.search(rel)
            if m:
                if m["id"] in found:
                    raise PreprocessError(f"{raw}: two {kind} files for id {m['id']!r}: "
                                          f"{found[m['id']]} and {rel}; make the pattern stricter")
                found[m["id"]] = rel
                break  # a file is a label or an image, not both
    if not images or not labels:
        raise PreprocessError(
            f"{raw}: expected image files matching {image_pattern!r} and label files matching "
            f"{label_pattern!r}; found {len(images)} images and {len(labels)} labels among "
            f"{len(files)} files, e.g. {files[:8]}")
    if set(images) != set(labels):
        raise PreprocessError(
            f"{raw}: images and labels do not pair up: images without a label "
            f"{sorted(set(images) - set(labels), key=_sort_key)[:10]}, labels without an image "
            f"{sorted(set(labels) - set(images), key=_sort_key)[:10]}")
    ids = sorted(images, key=_sort_key)
    numeric = all(i.isdigit() for i in ids)
    new_ids = list(range(len(ids))) if renumber or not numeric else [int(i) for i in ids]
    cases = [Case(new, {"image": images[old], "label": labels[old], "original_id": old},
                  (raw / images[old], raw / labels[old])) for new, old in zip(new_ids, ids)]
    return cases, {str(new): old for new, old in zip(new_ids, ids)}


def map_labels(array: np.ndarray, label_map: Mapping[int, int] | None,
               allowed: Sequence[int], source: str) -> np.ndarray:
    """Apply ``label_map`` (every stored value must be a key) and check the result is ``allowed``."""
    values = np.unique(array)
    if not np.all(values == np.round(values)):
        raise PreprocessError(f"{source}: label values must be integers, got {values[:10]}")
    array = np.rint(array).astype(np.int64)
    if label_map is not None:
        check_label_values(np.unique(array), label_map, source,
                           "Add the value to --label-map or fix the label file.")
        lut_keys = np.array(sorted(label_map), dtype=np.int64)
        lut_vals = np.array([label_map[k] for k in sorted(label_map)], dtype=np.int64)
        array = lut_vals[np.searchsorted(lut_keys, array)]
    check_label_values(np.unique(array), allowed, source,
                       "Pass the full label set with --label-values (or a --label-map).")
    return array


def process(case: Case, params: dict[str, Any], allowed: Sequence[int]) -> Processed:
    image_path, label_path = case.payload
    _, image = read_volume(image_path)
    label_array, label = read_volume(label_path)
    check_same_grid(image, label, str(image_path), str(label_path))
    label = label_image(map_labels(label_array, params["label_map"], allowed, str(label_path)), label)
    image = reorient(image, params["orientation"])
    label = reorient(label, params["orientation"])
    out_image, out_label, info = standardize_mr(
        image, label, spacing=params["spacing"], crop_xy=params["crop_xy"],
        clip_percentile_value=params["clip_percentile"])
    info.update({"raw_size_xyz": list(image.GetSize()),
                 "raw_spacing_xyz": [round(s, 6) for s in image.GetSpacing()]})
    return Processed(out_image, out_label, info)


def build_spec(dataset: str, params: Mapping[str, Any],
               class_names: Mapping[int, str] | None) -> tuple[DatasetSpec, list[int]]:
    """The output spec (class names, expected grid) and the allowed output label values."""
    known = DATASETS.get(dataset)
    if params["label_map"] is not None:
        allowed = sorted(set(int(v) for v in params["label_map"].values()) | {0})
    elif params["label_values"] is not None:
        allowed = sorted(set(int(v) for v in params["label_values"]) | {0})
    elif known is not None:
        allowed = sorted(known.class_names)
    else:
        raise ValueError("generic: the label set must be explicit: pass --label-values (e.g. "
                         "0,1,2) or --label-map (e.g. 0:0,255:1)")
    names = dict(class_names) if class_names else (dict(known.class_names) if known else {})
    names = {v: names.get(v, "BG" if v == 0 else f"CLASS_{v}") for v in allowed}
    crop = params["crop_xy"]
    spacing = tuple(params["spacing"])
    spec = DatasetSpec(
        name=dataset, folder=known.folder if known else f"{dataset}_normalized", classmap_names=names,
        image_size=int(crop[0]) if crop is not None and crop[0] == crop[1] else None,
        spacing=spacing, orientation=params["orientation"], n_scans=None,
        min_tps=known.min_tps if known else (1,))
    return spec, allowed


def run(raw: Path, out: Path, *, dataset: str = "custom", overwrite: bool = False,
        min_tps: Sequence[int] | None = None, class_names: Mapping[int, str] | None = None,
        folder: str | None = None, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Pre-process a NIfTI MR data set into ``out/<folder>`` (default ``<dataset>_normalized``).

    Args:
        dataset: a preset name (``CMR``, ``Prostate_MRI``) or any name for a custom set.
        overrides: keys of ``GENERIC_DEFAULTS`` (preset values apply first).
    """
    unknown = set(overrides) - set(GENERIC_DEFAULTS)
    if unknown:
        raise ValueError(f"generic: unknown parameters {sorted(unknown)}; expected "
                         f"{sorted(GENERIC_DEFAULTS)}")
    params = {**GENERIC_DEFAULTS, **PRESETS.get(dataset, {}), **overrides}
    if params["spacing"] is None:
        raise ValueError(f"{dataset}: --spacing X Y Z is required (mm; 0 keeps an axis)")
    params["spacing"] = tuple(None if (s is None or s == 0) else float(s) for s in params["spacing"])
    if params["crop_xy"] is not None:
        params["crop_xy"] = tuple(int(c) for c in params["crop_xy"])
    spec, allowed = build_spec(dataset, params, class_names)
    final = out / (folder or spec.folder)
    check_output_free(final, overwrite)
    cases, id_map = discover(raw, params["image_pattern"], params["label_pattern"],
                             params["renumber"])
    extra_json = None
    if dataset not in DATASETS:  # the loaders' 'custom' dataset reads its label names from here
        extra_json = {CUSTOM_SPEC_FILE: {
            "name": dataset, "modality": "MR",
            "labels": {str(v): name for v, name in spec.class_names.items() if v != 0},
            **({"image_size": spec.inplane_size} if spec.inplane_size else {})}}
    return write_dataset(cases, lambda case: process(case, params, allowed), out=final, spec=spec,
                         recipe=f"generic_mr:{dataset}", parameters=params, raw=raw,
                         min_tps=tuple(min_tps or spec.min_tps), overwrite=overwrite,
                         extra_manifest={"id_map": id_map}, extra_json=extra_json,
                         progress=progress)
