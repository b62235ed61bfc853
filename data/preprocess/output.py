"""The output folder of a pre-processing recipe, written in one piece.

:func:`write_dataset` writes ``image_<id>.nii.gz``, ``label_<id>.nii.gz``,
``classmap_<min_tp>.json``, ``pixel_counts.json`` and ``manifest.json`` into a hidden partial
folder, verifies it (``data.preprocess.verify``) and renames it into place at the end, so a failed
run never leaves a half folder. (Its own module, above ``common`` and ``verify``: verify reads what
``common`` defines, and this module uses both.)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from data.preprocess.common import (CLASSMAP_RULE, MANIFEST_FORMAT, MANIFEST_NAME, PIXEL_COUNTS_NAME,
                                    DatasetSpec, PreprocessError, check_label_values, check_same_grid,
                                    classmap_from_counts, geometry_record, sha256_file,
                                    slice_pixel_counts)
from data.preprocess.verify import format_report, verify_folder
from utils.io import write_image, write_json


# ----------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One raw scan to process: the output id plus whatever the recipe needs to read it."""

    scan_id: int
    sources: dict[str, Any]      # JSON-ready description of the raw files (paths relative to raw)
    payload: Any = None          # recipe-specific (e.g. resolved paths)


@dataclasses.dataclass
class Processed:
    """A processed scan: float32 image and integer label on the same grid, plus notes."""

    image: sitk.Image
    label: sitk.Image
    info: dict[str, Any]


def output_folder(out: str | os.PathLike, folder: str) -> Path:
    return Path(out) / folder


def check_output_free(final: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``."""
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {final} already exists: pass --overwrite to replace it, or choose "
            f"another --out")


def write_dataset(cases: Sequence[Case], process: Callable[[Case], Processed], *, out: Path,
                  spec: DatasetSpec, recipe: str, parameters: Mapping[str, Any],
                  raw: Path, min_tps: Sequence[int], overwrite: bool,
                  extra_manifest: Mapping[str, Any] | None = None,
                  extra_json: Mapping[str, Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Process every case and publish the output folder ``out`` in one rename.

    Files are written into ``.<name>.partial-<pid>`` beside ``out`` (each one atomically), the
    folder is verified, and only then renamed to ``out`` (an existing ``out`` is replaced only when
    ``overwrite``). On any error the partial folder is removed and ``out`` is left as it was.
    ``extra_json`` maps file names to objects written beside the scans (e.g. ``dataset.json``).

    Returns:
        The manifest written to ``out/manifest.json``, plus ``_elapsed_s`` and ``_folder``.
    """
    check_output_free(out, overwrite)
    if not cases:
        raise PreprocessError(f"{raw}: no scans found to process")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    started = time.perf_counter()
    try:
        scans, counts = [], {}
        for case in tqdm(cases, desc=f"{spec.name} scans", unit="scan", disable=not progress):
            record, counts[str(case.scan_id)] = _write_scan(partial, case, process(case), spec)
            scans.append(record)
        _write_class_maps(partial, counts, spec, min_tps)
        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset": spec.name,
            "recipe": recipe,
            "raw": str(raw),
            "parameters": dict(parameters),
            "class_names": {str(k): v for k, v in spec.class_names.items()},
            "classmap_rule": CLASSMAP_RULE,
            "classmap_min_tps": list(min_tps),
            "expected": {"inplane_size": spec.inplane_size, "spacing_xyz": list(spec.spacing),
                         "orientation": spec.orientation},
            "n_scans": len(scans),
            **(dict(extra_manifest) if extra_manifest else {}),
            "scans": scans,
        }
        for name, content in (extra_json or {}).items():
            write_json(partial / name, content)
        write_json(partial / MANIFEST_NAME, manifest)
        report = verify_folder(partial, spec)
        if not report.ok:
            raise PreprocessError("the output failed verification:\n" + format_report(report))
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # Run facts for the caller's summary; not part of the written manifest.
    manifest["_elapsed_s"] = time.perf_counter() - started
    manifest["_folder"] = str(out)
    return manifest


def _write_scan(partial: Path, case: Case, result: Processed,
                spec: DatasetSpec) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """Check and write one processed scan; returns its manifest record and its per-slice pixel counts."""
    check_same_grid(result.image, result.label, f"scan {case.scan_id} image",
                    f"scan {case.scan_id} label")
    label_array = sitk.GetArrayFromImage(result.label)
    values = sorted(int(v) for v in np.unique(label_array))
    check_label_values(values, spec.class_names, f"scan {case.scan_id} (after processing)",
                       "This is a bug in the recipe's label mapping.")
    image_path = partial / f"image_{case.scan_id}.nii.gz"
    label_path = partial / f"label_{case.scan_id}.nii.gz"
    write_image(result.image, image_path)
    write_image(result.label, label_path)
    counts = slice_pixel_counts(label_array, spec.class_names)
    image_array = sitk.GetArrayViewFromImage(result.image)
    record = {
        "id": case.scan_id,
        "source": case.sources,
        "image": {"file": image_path.name, "sha256": sha256_file(image_path),
                  **geometry_record(result.image),
                  "intensity_range": [float(image_array.min()), float(image_array.max())]},
        "label": {"file": label_path.name, "sha256": sha256_file(label_path),
                  "dtype": result.label.GetPixelIDTypeAsString(), "values": values,
                  "voxels_per_class": {str(v): int((label_array == v).sum())
                                       for v in values}},
        "notes": result.info,
    }
    return record, counts


def _write_class_maps(partial: Path, counts: Mapping[str, Mapping[int, list[int]]], spec: DatasetSpec,
                      min_tps: Sequence[int]) -> None:
    """``classmap_<min_tp>.json`` for every ``min_tp`` and ``pixel_counts.json``."""
    for min_tp in min_tps:
        write_json(partial / f"classmap_{min_tp}.json",
                   classmap_from_counts(counts, spec.class_names, min_tp))
    write_json(partial / PIXEL_COUNTS_NAME,
               {name: {sid: per_class[value] for sid, per_class in counts.items()}
                for value, name in spec.class_names.items()})


def _publish(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``, moving an existing ``out`` aside first and deleting it after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old)


def summary_lines(manifest: Mapping[str, Any]) -> list[str]:
    """Human summary of a finished run (printed by the CLI)."""
    out = manifest.get("_folder", "?")
    scans = manifest["scans"]
    shapes = sorted({tuple(s["image"]["shape_zyx"]) for s in scans})
    z = [s[0] for s in shapes]
    spacings = sorted({tuple(s["image"]["spacing_xyz"]) for s in scans})
    values = sorted({v for s in scans for v in s["label"]["values"]})
    lines = [
        f"wrote {len(scans)} scans of {manifest['dataset']} to {out}",
        f"  shape (Z, Y, X): Z {min(z)}..{max(z)}, in-plane "
        f"{sorted({s[1:] for s in shapes})}",
        f"  spacing (x, y, z) mm: {spacings[0]}" + (f" .. {spacings[-1]}" if len(spacings) > 1 else ""),
        f"  label values: {values}",
        f"  classmaps: " + ", ".join(f"classmap_{t}.json" for t in manifest["classmap_min_tps"]),
        f"  elapsed: {manifest.get('_elapsed_s', float('nan')):.1f} s",
    ]
    return lines
