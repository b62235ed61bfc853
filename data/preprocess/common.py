"""Building blocks shared by every pre-processing recipe.

Geometry conventions: SimpleITK images, index order ``(x, y, z)``; numpy arrays from
``sitk.GetArrayFromImage`` are ``(Z, Y, X)``. Every step keeps spacing, origin and direction
physically correct (a crop moves the origin to the first kept voxel, a pad to the first padded one).

The steps are the SSL-ALPNet recipe (see ``data/README.md`` for the deviations and why):

* :func:`clip_percentile` -- cut the bright end of the MR histogram (off-resonance spikes);
* :func:`grid_for_spacing` + :func:`resample_image` / :func:`resample_label` -- linear resampling of
  the image; per-class linear resampling of the label (``rint``, the higher label value wins);
* :func:`center_crop_pad_xy` -- centre crop / pad in-plane (image padded with its minimum, label 0);
* :func:`slice_pixel_counts`, :func:`classmap_from_counts`, :func:`geometry_record` -- what the
  output folder records (written by :func:`data.preprocess.output.write_dataset`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from data.registry import DATASETS, DatasetSpec  # noqa: F401 (the one registry; re-exported for the recipes)
from utils.io import grid_differences, orientation_code  # noqa: F401 (orientation_code re-exported for the recipes)

MANIFEST_NAME = "manifest.json"
PIXEL_COUNTS_NAME = "pixel_counts.json"
MANIFEST_FORMAT = 1
# Classmap rule written by this package: slice z of scan s is listed under class c when at least
# ``min_tp`` pixels of slice z have label c. (The published SSL-ALPNet files instead require the
# class to be present and the *sum of the label values* of the slice to reach ``min_tp``; verify.py
# recognises both.)
CLASSMAP_RULE = "pixel_count"
_BOX_MARGIN = 2  # voxels of zeros kept around a class's bounding box when resampling it


class PreprocessError(ValueError):
    """A raw input that does not match what a recipe expects; the message says what and how to fix."""


# ----------------------------------------------------------------------------------------------
# Intensity and geometry steps
# ----------------------------------------------------------------------------------------------
def to_float32(image: sitk.Image) -> sitk.Image:
    """Cast to float32, keeping the geometry."""
    return sitk.Cast(image, sitk.sitkFloat32)


def clip_percentile(image: sitk.Image, percentile: float) -> tuple[sitk.Image, float]:
    """Clip intensities above the ``percentile``-th percentile of the whole volume.

    Args:
        image: 3D image, any scalar type (returned as float32).
        percentile: in (0, 100]; 100 leaves the image unchanged.

    Returns:
        ``(clipped image, threshold)``.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"clip percentile: expected a value in (0, 100], got {percentile}")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    threshold = float(np.percentile(array, percentile))
    out = sitk.GetImageFromArray(np.minimum(array, np.float32(threshold)))
    out.CopyInformation(image)
    return out, threshold


def window_to_uint8_range(image: sitk.Image, low: float, high: float,
                          out_max: float = 255.0) -> sitk.Image:
    """Clip to ``[low, high]`` and scale linearly to ``[0, out_max]`` (float32)."""
    if not high > low:
        raise ValueError(f"intensity window: expected high > low, got [{low}, {high}]")
    return sitk.IntensityWindowing(sitk.Cast(image, sitk.sitkFloat32), float(low), float(high),
                                   0.0, float(out_max))


def reorient(image: sitk.Image, code: str | None) -> sitk.Image:
    """Permute / flip the voxel array so that ``orientation_code(out) == code`` (geometry kept)."""
    if code is None or orientation_code(image.GetDirection()) == code:
        return image
    return sitk.DICOMOrient(image, code)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A sampling grid: ``size`` / ``spacing`` in (x, y, z) order, ``origin`` = centre of voxel 0."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @staticmethod
    def of(image: sitk.Image) -> "Grid":
        return Grid(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                    tuple(image.GetDirection()))

    def matches(self, image: sitk.Image) -> bool:
        """``image`` lies on this grid (``utils.io.grid_differences``'s rule)."""
        return not grid_differences(dataclasses.astuple(self), image)


def grid_for_spacing(image: sitk.Image, spacing: Sequence[float | None],
                     tolerance: float = 1e-3) -> Grid:
    """The grid of ``image`` resampled to ``spacing``, same origin (first voxel centre) and direction.

    An axis whose target is None, or already within ``tolerance`` mm of it, keeps its spacing and
    size (so a scan already on the target grid is not interpolated at all). Other axes get
    ``round(n * old / new)`` voxels, which keeps the field of view; the reference's
    ``int(n * old / new + 1)`` adds one extrapolated (all-zero) voxel per axis.
    """
    if len(spacing) != 3:
        raise ValueError(f"spacing: expected 3 values (x, y, z), got {list(spacing)}")
    size, old = image.GetSize(), image.GetSpacing()
    new_size, new_spacing = [], []
    for n, s, t in zip(size, old, spacing):
        if t is None or abs(t - s) <= tolerance:
            new_size.append(int(n))
            new_spacing.append(float(s))
        else:
            if t <= 0:
                raise ValueError(f"spacing: expected positive values or None, got {list(spacing)}")
            new_size.append(max(1, int(round(n * s / t))))
            new_spacing.append(float(t))
    return Grid(tuple(new_size), tuple(new_spacing), tuple(image.GetOrigin()),
                tuple(image.GetDirection()))


def resample_image(image: sitk.Image, grid: Grid, default_value: float = 0.0) -> sitk.Image:
    """Linear resampling of ``image`` onto ``grid`` (no-op copy when it is already that grid).

    Output voxels just outside the input's extent (the last one can be, by up to half an input
    voxel, when ``round`` sizes an upsampled axis up) copy the nearest input voxel instead of
    becoming ``default_value``: no artificial all-zero slice at the end of a volume.
    """
    if grid.matches(image):
        return sitk.Image(image)
    return sitk.Resample(image, list(grid.size), sitk.Transform(), sitk.sitkLinear,
                         list(grid.origin), list(grid.spacing), list(grid.direction),
                         float(default_value), image.GetPixelID(), True)


def resample_label(label: sitk.Image, grid: Grid) -> sitk.Image:
    """Per-class linear resampling of an integer label map onto ``grid``.

    Each foreground value ``v`` is resampled as a float indicator, rounded with ``rint``
    (0.5 rounds to 0), and written in ascending order of ``v``: where two classes both round to 1
    the higher value wins (the reference rule). Values are kept, not renumbered.

    Returns:
        label image on ``grid`` with the pixel type of ``label``.
    """
    if grid.matches(label):
        return sitk.Image(label)
    src = sitk.GetArrayFromImage(label)
    out = np.zeros(tuple(reversed(grid.size)), dtype=src.dtype)  # (Z, Y, X)
    if src.min() < 0:
        raise ValueError(f"resample_label: expected non-negative label values, got {src.min()}")
    boxes = ndimage.find_objects(src)  # the box of value v is boxes[v - 1] (None if absent)
    for value, found in enumerate(boxes, start=1):
        if found is None:
            continue
        # Only the class's bounding box (plus a zero margin, so the interpolation fades to 0 as it
        # would on the full volume) is resampled, onto the part of the grid that box covers: the
        # same result as full-volume resampling, far less work for small organs.
        lo = np.maximum([sl.start - _BOX_MARGIN for sl in found], 0)
        hi = np.minimum([sl.stop + _BOX_MARGIN for sl in found], src.shape)
        box = src[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == value
        indicator = sitk.GetImageFromArray(box.astype(np.float32))
        indicator.SetSpacing(label.GetSpacing())
        indicator.SetDirection(label.GetDirection())
        indicator.SetOrigin(label.TransformIndexToPhysicalPoint(
            (int(lo[2]), int(lo[1]), int(lo[0]))))
        sub, start = _sub_grid(grid, indicator)
        if sub is None:
            continue
        res = np.rint(sitk.GetArrayFromImage(resample_image(indicator, sub))) == 1
        z0, y0, x0 = start[2], start[1], start[0]
        target = out[z0:z0 + res.shape[0], y0:y0 + res.shape[1], x0:x0 + res.shape[2]]
        target[res] = value
    image = sitk.GetImageFromArray(out)
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    return image


def _sub_grid(grid: Grid, image: sitk.Image) -> tuple[Grid | None, tuple[int, int, int]]:
    """The part of ``grid`` (plus one voxel) covering ``image``'s extent, and its start index.

    Returns ``(None, ...)`` when the image lies outside the grid.
    """
    direction = np.array(grid.direction).reshape(3, 3)
    spacing, origin = np.array(grid.spacing), np.array(grid.origin)
    size = np.array(image.GetSize())
    corners = np.array([[cx, cy, cz] for cx in (-0.5, size[0] - 0.5) for cy in (-0.5, size[1] - 0.5)
                        for cz in (-0.5, size[2] - 0.5)])
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    index = np.linalg.solve(direction, (points - origin).T).T / spacing  # continuous grid indices
    start = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, np.array(grid.size))
    if np.any(stop <= start):
        return None, (0, 0, 0)
    sub_origin = origin + direction @ (start * spacing)
    return (Grid(tuple(int(n) for n in stop - start), grid.spacing, tuple(sub_origin.tolist()),
                 grid.direction), tuple(int(i) for i in start))


def center_crop_pad_xy(image: sitk.Image, size_xy: Sequence[int], pad_value: float) -> sitk.Image:
    """Centre crop or pad in-plane to ``size_xy = (W, H)`` voxels; z untouched.

    The window starts at index ``n // 2 - (m + 1) // 2`` along an axis of length ``n`` cut to ``m``
    (the reference's ``image_crop`` centring: ``n = 316`` keeps 30..285; ``n = 256`` is a no-op;
    ``n = 240`` pads 8 voxels before). The origin moves to the centre of output voxel 0.
    """
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
    n_z, n_y, n_x = array.shape
    m_x, m_y = int(size_xy[0]), int(size_xy[1])
    start_x, start_y = n_x // 2 - (m_x + 1) // 2, n_y // 2 - (m_y + 1) // 2
    out = np.full((n_z, m_y, m_x), pad_value, dtype=array.dtype)
    src_y0, src_x0 = max(start_y, 0), max(start_x, 0)
    src_y1, src_x1 = min(start_y + m_y, n_y), min(start_x + m_x, n_x)
    out[:, src_y0 - start_y:src_y1 - start_y, src_x0 - start_x:src_x1 - start_x] = \
        array[:, src_y0:src_y1, src_x0:src_x1]
    result = sitk.GetImageFromArray(out)
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    result.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(
        (float(start_x), float(start_y), 0.0)))
    return result


def label_dtype(values: Iterable[int]) -> type:
    """Smallest unsigned integer type for the label values (uint8, else uint16)."""
    high = max([0, *values])
    if high > np.iinfo(np.uint16).max:
        raise ValueError(f"label values: expected at most {np.iinfo(np.uint16).max}, got {high}")
    return np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16


def label_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap an integer ``(Z, Y, X)`` label array with the geometry of ``reference``."""
    image = sitk.GetImageFromArray(array.astype(label_dtype(np.unique(array).tolist())))
    image.CopyInformation(reference)
    return image


def standardize_mr(image: sitk.Image, label: sitk.Image, *, spacing: Sequence[float | None],
                   crop_xy: Sequence[int] | None, clip_percentile_value: float,
                   spacing_tolerance: float = 1e-3) -> tuple[sitk.Image, sitk.Image, dict]:
    """The SSL-ALPNet MR recipe: clip -> resample -> centre crop/pad (CHAOS, CMR, generic MR).

    Args:
        image: 3D MR image (any scalar type; output float32).
        label: integer label map on the same grid as ``image``.
        spacing: target ``(x, y, z)`` spacing in mm (None = keep that axis).
        crop_xy: in-plane output size ``(W, H)``, or None for no crop.
        clip_percentile_value: percentile of the bright-end clip (100 = none).

    Returns:
        ``(image float32, label, info)`` where info records the clip threshold and the grids.
    """
    check_same_grid(image, label, "image", "label")
    clipped, threshold = clip_percentile(to_float32(image), clip_percentile_value)
    grid = grid_for_spacing(clipped, spacing, spacing_tolerance)
    resampled = resample_image(clipped, grid)
    label_res = resample_label(label, grid)
    if crop_xy is not None:
        pad = float(sitk.GetArrayViewFromImage(resampled).min())
        resampled = center_crop_pad_xy(resampled, crop_xy, pad)
        label_res = center_crop_pad_xy(label_res, crop_xy, 0)
    info = {"clip_threshold": threshold, "resampled_size_xyz": list(grid.size),
            "interpolated": not grid.matches(clipped)}
    return resampled, label_res, info


def check_same_grid(a: sitk.Image, b: sitk.Image, name_a: str, name_b: str) -> None:
    """Raise PreprocessError when two images are not on the same voxel grid (``utils.io.grid_differences``)."""
    differ = grid_differences(a, b)
    if differ:
        raise PreprocessError(
            f"{name_a} and {name_b} are not on the same grid: expected equal size / spacing / origin / "
            f"direction, got {'; '.join(differ)} ({name_a} vs {name_b}). Check that the label belongs to this image.")


def check_label_values(values: Iterable[int], allowed: Iterable[int], source: str,
                       fix: str) -> None:
    """Raise PreprocessError naming ``source`` when a label value is outside ``allowed``."""
    bad = sorted(set(int(v) for v in values) - set(int(v) for v in allowed))
    if bad:
        raise PreprocessError(
            f"{source}: unexpected label values {bad}; expected a subset of "
            f"{sorted(int(v) for v in allowed)}. {fix}")


# ----------------------------------------------------------------------------------------------
# Class maps and pixel counts
# ----------------------------------------------------------------------------------------------
def slice_pixel_counts(label: np.ndarray, values: Iterable[int]) -> dict[int, list[int]]:
    """Per class value, the number of its pixels in each slice of a ``(Z, Y, X)`` label array."""
    flat = label.reshape(label.shape[0], -1)
    return {int(v): (flat == v).sum(axis=1).astype(int).tolist() for v in values}


def classmap_from_counts(counts: Mapping[str, Mapping[int, Sequence[int]]],
                         class_names: Mapping[int, str], min_tp: int) -> dict[str, dict[str, list[int]]]:
    """``class name -> scan id -> sorted slice indices with at least min_tp pixels of the class``.

    Args:
        counts: scan id -> class value -> per-slice pixel counts (see :func:`slice_pixel_counts`).
    """
    out: dict[str, dict[str, list[int]]] = {name: {} for name in class_names.values()}
    for scan_id, per_class in counts.items():
        for value, name in class_names.items():
            per_slice = per_class.get(value) or per_class.get(str(value)) or []
            out[name][str(scan_id)] = [z for z, n in enumerate(per_slice) if n >= min_tp]
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def geometry_record(image: sitk.Image) -> dict[str, Any]:
    """JSON-ready geometry: shape (Z, Y, X), spacing / origin (x, y, z), direction, orientation."""
    return {"shape_zyx": list(reversed(image.GetSize())),
            "spacing_xyz": [round(v, 6) for v in image.GetSpacing()],
            "origin_xyz": [round(v, 4) for v in image.GetOrigin()],
            "direction": [round(v, 6) for v in image.GetDirection()],
            "orientation": orientation_code(image.GetDirection()),
            "dtype": image.GetPixelIDTypeAsString()}
