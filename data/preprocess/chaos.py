"""CHAOS T2-SPIR (abdominal MRI, 20 labelled scans) from the official training archive.

Raw layout (``CHAOS_Train_Sets/Train_Sets/MR`` of the challenge archive; ``--raw`` may point at it
or at any folder above it on that path)::

    <raw>/<id>/T2SPIR/DICOM_anon/IMG-xxxx-yyyyy.dcm    one DICOM series per scan
    <raw>/<id>/T2SPIR/Ground/IMG-xxxx-yyyyy.png        one 8-bit mask per slice, same file stem

Recipe (SSL-ALPNet, see ``data/README.md``): the DICOM series is read with SimpleITK (slices
ordered by ImagePositionPatient); each mask is put on the slice whose DICOM file has the same stem;
mask values are mapped by the CHAOS value ranges (63 / 126 / 189 / 252 -> 1 liver, 2 right kidney,
3 left kidney, 4 spleen), so a scan without an organ keeps the other codes; the in-plane flip of
the masks is chosen by overlap (:func:`choose_flip`); image and label are then reoriented together
to LAS (the array layout of the published files, which went through ``dcm2nii``), clipped at the
99.5th percentile, resampled to 1.25 x 1.25 x 7.70 mm and centre cropped / padded to 256 x 256.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError

from data.preprocess.common import (DATASETS, PreprocessError, clip_percentile, label_image, reorient,
                                    standardize_mr, to_float32)
from data.preprocess.output import Case, Processed, check_output_free, write_dataset
from utils.io import read_dicom_series as read_series

SPEC = DATASETS["CHAOST2"]
LAYOUT = "<raw>/<id>/T2SPIR/DICOM_anon/*.dcm with <raw>/<id>/T2SPIR/Ground/*.png (one PNG per DICOM)"
# Sub-paths of the challenge archive under which the <id> folders may sit.
LAYOUT_PREFIXES = ("", "MR", "Train_Sets/MR", "CHAOS_Train_Sets/Train_Sets/MR")
# CHAOS ground-truth grey values, as ranges (the challenge's own specification).
VALUE_RANGES: dict[int, tuple[int, int]] = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}
# Candidate flips of the mask stack, as axes of the (Z, Y, X) array.
FLIPS: dict[str, tuple[int, ...]] = {"none": (), "rows": (1,), "cols": (2,), "both": (1, 2)}
DEFAULTS: dict[str, Any] = {
    "spacing": (1.25, 1.25, 7.70),
    "crop_xy": (256, 256),
    "clip_percentile": 99.5,
    "orientation": SPEC.orientation,  # LAS: the array layout of the published files
    "gt_flip": "auto",
    # auto flip: the best flip's explained variance must beat the runner-up by this factor.
    # On the 20 published CHAOST2 scans (as DICOM + PNG) the true flip wins by 1.14x (scans 2, 36)
    # to 2.8x (scan 13), median 1.6x.
    "min_flip_ratio": 1.05,
}


def _describe(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for layout errors: its entries and one sub-folder's entries."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    entries = sorted(folder.iterdir())
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    text = f"{folder} holds {len(entries)} entries: {names}" + (" ..." if len(entries) > limit else "")
    sub = next((p for p in entries if p.is_dir()), None)
    if sub is not None:
        inner = sorted(q.name + ("/" if q.is_dir() else "") for q in sub.iterdir())[:limit]
        text += f"; {sub.name}/ holds {inner}"
    return text


def _numeric_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def find_root(raw: Path) -> Path:
    """The folder holding the ``<id>/T2SPIR`` scan folders (``raw`` or a known sub-path of it)."""
    if not raw.is_dir():
        raise PreprocessError(f"--raw: folder not found: {raw}. Expected the CHAOS training "
                              f"archive, layout {LAYOUT}")
    for prefix in LAYOUT_PREFIXES:
        root = raw / prefix
        if root.is_dir() and any(p.name.isdigit() and (p / "T2SPIR").is_dir() for p in root.iterdir()):
            return root
    raise PreprocessError(f"{raw}: not the CHAOS MR layout: expected {LAYOUT} (optionally under "
                          f"{[p for p in LAYOUT_PREFIXES if p]}); found: {_describe(raw)}")


def discover(raw: Path) -> list[Case]:
    """One case per ``<id>`` folder, sorted numerically; every expected folder must exist."""
    root = find_root(raw)
    cases = []
    for scan_dir in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()),
                           key=lambda p: int(p.name)):
        dicom_dir, ground_dir = scan_dir / "T2SPIR" / "DICOM_anon", scan_dir / "T2SPIR" / "Ground"
        for folder in (dicom_dir, ground_dir):
            if not folder.is_dir():
                raise PreprocessError(f"missing folder {folder}: expected {LAYOUT}; found: "
                                      f"{_describe(folder.parent)}")
        cases.append(Case(int(scan_dir.name),
                          {"dicom_dir": str(dicom_dir.relative_to(raw)),
                           "ground_dir": str(ground_dir.relative_to(raw))},
                          (dicom_dir, ground_dir)))
    return cases


def read_dicom_series(folder: Path) -> tuple[sitk.Image, list[Path]]:
    """Read the single DICOM series of ``folder`` through the one checked reader
    (``utils.io.read_dicom_series``: slices sorted by position along the normal).

    Returns:
        ``(image, files)``: the 3D image (pixel type as stored, e.g. int16) and its files in z order.

    Raises:
        PreprocessError: no folder, no readable series, more than one series, or slice files
            that are not part of the series (unreadable / corrupt).
    """
    try:
        return read_series(folder)
    except (FileNotFoundError, ValueError) as err:
        raise PreprocessError(f"{err} (expected one T2-SPIR series: re-extract the CHAOS archive)") from None


def read_mask(path: Path) -> np.ndarray:
    """One CHAOS ground-truth PNG as a ``(rows, cols)`` uint8 array."""
    try:
        with Image.open(path) as handle:
            array = np.asarray(handle)
    except (OSError, UnidentifiedImageError) as err:
        raise PreprocessError(f"cannot read ground-truth mask {path}: {err}. Re-extract it from "
                              f"the archive.") from None
    if array.ndim != 2:
        raise PreprocessError(f"{path}: expected a single-channel (grey) mask, got an array of "
                              f"shape {array.shape}")
    return array


def map_values(stack: np.ndarray, source: str) -> np.ndarray:
    """Map CHAOS grey values to class ids by range (0 stays 0); any other value is an error."""
    out = np.zeros(stack.shape, dtype=np.uint8)
    known = stack == 0
    for class_id, (low, high) in VALUE_RANGES.items():
        hit = (stack >= low) & (stack <= high)
        out[hit] = class_id
        known |= hit
    if not known.all():
        bad = sorted(int(v) for v in np.unique(stack[~known]))
        raise PreprocessError(
            f"{source}: unexpected mask values {bad[:20]}; expected 0 or the CHAOS ranges "
            f"{ {k: v for k, v in VALUE_RANGES.items()} } (63 liver, 126 right kidney, 189 left "
            f"kidney, 252 spleen). Is this a CHAOS T2-SPIR ground-truth folder?")
    return out


def read_masks(ground_dir: Path, dicom_files: Sequence[Path]) -> tuple[np.ndarray, str]:
    """Stack the PNG masks in the z order of ``dicom_files``.

    A mask goes on the slice whose DICOM file has the same stem (``IMG-0002-00001``); when the
    stems do not correspond one to one, masks and DICOM files are paired in numeric name order (the
    reference's rule) and the pairing is recorded as such.

    Returns:
        ``(stack (Z, rows, cols) uint8 raw grey values, pairing rule)``.
    """
    pngs = sorted((p for p in ground_dir.iterdir() if p.suffix.lower() == ".png"),
                  key=lambda p: _numeric_key(p.stem))
    if len(pngs) != len(dicom_files):
        raise PreprocessError(f"{ground_dir}: {len(pngs)} PNG masks but the DICOM series has "
                              f"{len(dicom_files)} slices; expected one mask per slice")
    by_stem = {p.stem: p for p in pngs}
    if set(by_stem) == {f.stem for f in dicom_files}:
        ordered, pairing = [by_stem[f.stem] for f in dicom_files], "file_stem"
    else:
        rank = {f: i for i, f in enumerate(sorted(dicom_files, key=lambda f: _numeric_key(f.stem)))}
        ordered, pairing = [pngs[rank[f]] for f in dicom_files], "numeric_name_order"
    masks = [read_mask(p) for p in ordered]
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise PreprocessError(f"{ground_dir}: masks of different sizes {sorted(shapes)}")
    return np.stack(masks), pairing


def explained_variance(image: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the intensity variance explained by the label classes (R^2 of a class-mean fit).

    ``1 - sum_c sum_{x in c} (I(x) - mean_c)^2 / sum_x (I(x) - mean)^2``; higher when the masks sit
    on the tissue they outline.
    """
    flat = image.ravel().astype(np.float64)
    lab = labels.ravel().astype(np.int64)
    n = np.bincount(lab)
    s = np.bincount(lab, weights=flat)
    ss = np.bincount(lab, weights=flat * flat)
    used = n > 0
    within = float((ss[used] - s[used] ** 2 / n[used]).sum())
    total = float(((flat - flat.mean()) ** 2).sum())
    if total <= 0:
        return 0.0
    return 1.0 - within / total


def choose_flip(image: np.ndarray, labels: np.ndarray, mode: str = "auto",
                min_ratio: float = DEFAULTS["min_flip_ratio"], source: str = "") -> tuple[str, dict]:
    """Choose the in-plane flip of the mask stack that best fits the image.

    Rule: every flip in ``FLIPS`` is scored by :func:`explained_variance` of the (clipped) image by
    the flipped masks; ``auto`` takes the best one and requires it to beat the runner-up by
    ``min_ratio``, otherwise it refuses to guess. SimpleITK keeps the DICOM pixel order, which is
    the order the CHAOS masks were drawn in, so the expected answer is ``none``; the reference's row
    flip compensated for ``dcm2nii``'s row reversal (here done by reorienting image and label
    together to LAS afterwards).

    Args:
        image: ``(Z, Y, X)`` intensities; labels: ``(Z, Y, X)`` class ids, same shape.
        mode: ``auto`` or a key of ``FLIPS`` (then scores are still computed, for the manifest).

    Returns:
        ``(flip name, {flip name: score})``.
    """
    scores = {name: round(explained_variance(image, np.flip(labels, axes) if axes else labels), 5)
              for name, axes in FLIPS.items()}
    if mode != "auto":
        if mode not in FLIPS:
            raise ValueError(f"gt_flip: expected 'auto' or one of {list(FLIPS)}, got {mode!r}")
        return mode, scores
    ranked = sorted(scores, key=scores.get, reverse=True)
    best, second = scores[ranked[0]], scores[ranked[1]]
    if best <= 0 or best < min_ratio * second:
        raise PreprocessError(
            f"{source}: cannot tell how the ground-truth masks align with the image (explained "
            f"variance per flip {scores}; the best must exceed the runner-up by x{min_ratio}). "
            f"Check an overlay and pass --gt-flip none|rows|cols|both.")
    return ranked[0], scores


def process(case: Case, params: dict[str, Any]) -> Processed:
    """Read one CHAOS scan and run the recipe (see module docstring)."""
    dicom_dir, ground_dir = case.payload
    image, files = read_dicom_series(dicom_dir)
    raw_masks, pairing = read_masks(ground_dir, files)
    size_x, size_y, n_z = image.GetSize()
    if raw_masks.shape != (n_z, size_y, size_x):
        raise PreprocessError(f"{ground_dir}: masks are {raw_masks.shape[1]} x {raw_masks.shape[2]} "
                              f"(rows x cols) but the DICOM slices are {size_y} x {size_x}")
    labels = map_values(raw_masks, str(ground_dir))
    clipped, _ = clip_percentile(to_float32(image), params["clip_percentile"])
    flip, scores = choose_flip(sitk.GetArrayViewFromImage(clipped), labels, params["gt_flip"],
                               params["min_flip_ratio"], str(ground_dir))
    if FLIPS[flip]:
        labels = np.ascontiguousarray(np.flip(labels, FLIPS[flip]))
    label = label_image(labels, image)
    image = reorient(to_float32(image), params["orientation"])
    label = reorient(label, params["orientation"])
    out_image, out_label, info = standardize_mr(
        image, label, spacing=params["spacing"], crop_xy=params["crop_xy"],
        clip_percentile_value=params["clip_percentile"])
    info.update({"gt_flip": flip, "gt_flip_scores": scores, "mask_pairing": pairing,
                 "raw_size_xyz": list(image.GetSize()),
                 "raw_spacing_xyz": [round(s, 6) for s in image.GetSpacing()],
                 "n_dicom_files": len(files)})
    return Processed(out_image, out_label, info)


def run(raw: Path, out: Path, *, overwrite: bool = False, min_tps: Sequence[int] | None = None,
        progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Pre-process the CHAOS T2-SPIR training scans of ``raw`` into ``out/chaos_MR_T2_normalized``.

    Args:
        raw: the CHAOS archive (see ``LAYOUT``). out: parent folder of the output folder.
        overrides: any key of ``DEFAULTS``.

    Returns:
        The manifest written to the output folder.
    """
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"chaos: unknown parameters {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **overrides}
    final = out / SPEC.folder
    check_output_free(final, overwrite)
    cases = discover(raw)
    crop = params["crop_xy"]
    spec = dataclasses.replace(SPEC, spacing=tuple(params["spacing"]),
                               image_size=crop[0] if crop is not None and crop[0] == crop[1] else None,
                               orientation=params["orientation"])
    return write_dataset(cases, lambda case: process(case, params), out=final, spec=spec,
                         recipe="chaos_t2spir", parameters=params, raw=raw,
                         min_tps=tuple(min_tps or SPEC.min_tps), overwrite=overwrite,
                         progress=progress)
