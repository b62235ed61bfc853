"""SABS: Synapse multi-organ abdominal CT (MICCAI 2015 "Beyond the Cranial Vault"), 30 scans.

Raw layout (the ``RawData/Training`` folder of the Synapse download; ``--raw`` may point at it or
at a folder above it on that path)::

    <raw>/img/img00NN.nii.gz       CT in HU, 512 x 512 x Z
    <raw>/label/label00NN.nii.gz   labels 0..13, same grid

Use ``RawData``, not ``RegData`` (the registered pairs ``imgAAAA-BBBB``): the benchmark is on the
original scans. Recipe (SSL-ALPNet): clip HU to [-125, 275] and scale to 0..255; drop 32 voxels at
each in-plane border (512 -> 448); resample in-plane so that the 448 kept voxels span 256 voxel
steps (spacing x 448/256), z untouched. The reference's size rule ``int(448 * 256 / 448 + 1)``
gives 257 x 257, which is what every SABS loader expects; here the 257th row / column is sampled
from the image (the reference extrapolated zeros there). Scans are renumbered 0..29 in sorted
order of their Synapse number; the mapping is in ``manifest.json`` (``id_map``).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from data.preprocess.common import (DATASETS, Grid, PreprocessError, check_label_values, check_same_grid,
                                    label_dtype, label_image, resample_image, resample_label,
                                    window_to_uint8_range)
from data.preprocess.output import Case, Processed, check_output_free, write_dataset
from utils.io import read_volume

SPEC = DATASETS["SABS"]
LAYOUT = "<raw>/img/img<NNNN>.nii.gz with <raw>/label/label<NNNN>.nii.gz (Synapse RawData/Training)"
LAYOUT_PREFIXES = ("", "Training", "RawData/Training", "Abdomen/RawData/Training")
_IMG_RE = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^label(\d+)\.nii(\.gz)?$")
_REGDATA_RE = re.compile(r"^img\d+-\d+\.nii(\.gz)?$")
DEFAULTS: dict[str, Any] = {
    "hu_window": (-125.0, 275.0),
    "border": 32,            # voxels dropped at each in-plane border (512 -> 448)
    "inplane_steps": 256,    # the kept width spans this many output voxel steps
    "inplane_size": 257,     # output H = W: the reference's int(448 / (448 / 256) + 1)
}


def _listing(folder: Path, limit: int = 12) -> str:
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return f"{folder} holds {names[:limit]}" + (f" ... ({len(names)} entries)" if len(names) > limit else "")


def find_root(raw: Path) -> Path:
    """The folder holding ``img/`` and ``label/`` (``raw`` or a known sub-path of it)."""
    if not raw.is_dir():
        raise PreprocessError(f"--raw: folder not found: {raw}. Expected {LAYOUT}")
    for prefix in LAYOUT_PREFIXES:
        root = raw / prefix
        if (root / "img").is_dir() and (root / "label").is_dir():
            return root
    raise PreprocessError(f"{raw}: not the Synapse RawData layout: expected {LAYOUT} (optionally "
                          f"under {[p for p in LAYOUT_PREFIXES if p]}); found: {_listing(raw)}")


def discover(raw: Path) -> list[Case]:
    """Image/label pairs sorted by Synapse number, renumbered 0..N-1."""
    root = find_root(raw)
    img_names = sorted(p.name for p in (root / "img").iterdir())
    if any(_REGDATA_RE.match(n) for n in img_names):
        raise PreprocessError(f"{root / 'img'}: holds registered pairs (imgAAAA-BBBB): that is "
                              f"Synapse RegData; expected RawData ({LAYOUT})")
    images = {int(m.group(1)): root / "img" / n for n in img_names if (m := _IMG_RE.match(n))}
    labels = {int(m.group(1)): root / "label" / p.name
              for p in (root / "label").iterdir() if (m := _LABEL_RE.match(p.name))}
    if not images:
        raise PreprocessError(f"{root / 'img'}: no img<NNNN>.nii.gz files; expected {LAYOUT}; "
                              f"found: {_listing(root / 'img')}")
    if set(images) != set(labels):
        raise PreprocessError(
            f"{root}: images and labels do not pair up: images without a label "
            f"{sorted(set(images) - set(labels))}, labels without an image "
            f"{sorted(set(labels) - set(images))}; expected {LAYOUT}")
    return [Case(new_id, {"image": str(images[num].relative_to(raw)),
                          "label": str(labels[num].relative_to(raw)), "synapse_number": num},
                 (images[num], labels[num]))
            for new_id, num in enumerate(sorted(images))]


def inplane_grid(image: sitk.Image, params: dict[str, Any]) -> Grid:
    """Output grid: starts at voxel (border, border, 0), in-plane spacing x kept / steps, z kept."""
    size_x, size_y, size_z = image.GetSize()
    border, steps, out_size = params["border"], params["inplane_steps"], params["inplane_size"]
    if min(size_x, size_y) <= 2 * border:
        raise PreprocessError(f"in-plane size {size_x} x {size_y} is too small for a border crop of "
                              f"{border} voxels; expected 512 x 512 Synapse CT")
    sx, sy, sz = image.GetSpacing()
    spacing = (sx * (size_x - 2 * border) / steps, sy * (size_y - 2 * border) / steps, sz)
    origin = image.TransformIndexToPhysicalPoint((border, border, 0))
    return Grid((out_size, out_size, size_z), spacing, tuple(origin), tuple(image.GetDirection()))


def process(case: Case, params: dict[str, Any]) -> Processed:
    image_path, label_path = case.payload
    _, image = read_volume(image_path)
    label_array, label = read_volume(label_path)
    check_same_grid(image, label, str(image_path), str(label_path))
    values = np.unique(label_array)
    if not np.all(values == np.round(values)):
        raise PreprocessError(f"{label_path}: label values must be integers, got {values[:10]}")
    check_label_values(values.astype(int), SPEC.class_names, str(label_path),
                       "Is this a Synapse 13-organ label file?")
    label = label_image(label_array.astype(label_dtype(values.astype(int).tolist())), label)
    low, high = params["hu_window"]
    windowed = window_to_uint8_range(image, low, high)
    grid = inplane_grid(image, params)
    out_image = resample_image(windowed, grid, default_value=0.0)
    out_label = resample_label(label, grid)
    return Processed(out_image, out_label, {
        "raw_size_xyz": list(image.GetSize()),
        "raw_spacing_xyz": [round(s, 6) for s in image.GetSpacing()],
        "raw_hu_range": [float(sitk.GetArrayViewFromImage(image).min()),
                         float(sitk.GetArrayViewFromImage(image).max())]})


def run(raw: Path, out: Path, *, overwrite: bool = False, min_tps: Sequence[int] | None = None,
        progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Pre-process Synapse RawData/Training into ``out/sabs_CT_normalized``.

    Returns:
        The manifest (``id_map``: new id -> Synapse file).
    """
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"sabs: unknown parameters {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **overrides}
    final = out / SPEC.folder
    check_output_free(final, overwrite)
    cases = discover(raw)
    id_map = {str(c.scan_id): c.sources["image"] for c in cases}
    spec = dataclasses.replace(SPEC, image_size=int(params["inplane_size"]))
    return write_dataset(cases, lambda case: process(case, params), out=final, spec=spec,
                         recipe="sabs_ct", parameters=params, raw=raw,
                         min_tps=tuple(min_tps or SPEC.min_tps), overwrite=overwrite,
                         extra_manifest={"id_map": id_map}, progress=progress)
