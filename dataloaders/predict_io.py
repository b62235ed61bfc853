"""Reading a user's scans for ``predict.py`` and mapping them to and from what the model sees.

Inputs are NIfTI (or any file SimpleITK reads) or DICOM series folders, with any size, spacing and
orientation. The way to the model and back, both exact inverses on the grid:

1. **orientation**: the volume is re-oriented (``sitk.DICOMOrient``: axes permuted and flipped, no
   interpolation) to the orientation of the training scans (the snapshot's ``meta['orientation']``,
   e.g. ``LAS`` for CHAOST2: the third axis is the axial slice axis and the in-plane axes run as in
   training), so the model sees axial slices the way it learned them; a prediction is re-oriented
   back to the input's own orientation and takes the input's exact geometry (``CopyInformation``).
2. **intensity**: per-volume z-score over all voxels (``dataloaders.datasets.zscore``), as training.
3. **in-plane grid** (:class:`PlaneGrid`): slices get square pixels (bilinear, only when the
   in-plane spacings differ), are padded to a square field of view (centred; image: the volume's
   minimum, masks: 0) and resized to ``image_size`` (bilinear, antialiased; masks nearest), as the
   test pipeline resizes native slices. Class probabilities go back the same way in reverse
   (bilinear; crop), then argmax on the re-oriented native grid.
For a square scan with square pixels (every pre-processed dataset) steps 3's first two parts do
nothing, so the model input is exactly what ``test.py`` gives it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dataloaders.eval_dataset import to_model_input
from utils.io import grid_differences, orientation_code, read_dicom_series, read_image
from utils.resample import resize_image, resize_labels, resize_probabilities


class InputError(ValueError):
    """Bad user input (file, geometry, classes): reported as one ``error:`` line, nothing written."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_input(path: str | os.PathLike, what: str) -> sitk.Image:
    """Read a 3D single-channel image from a file or a DICOM series folder, through the project's one
    checked reader (``utils.io.read_image`` / ``utils.io.read_dicom_series``: truncated or corrupt
    files, slice files outside the series and NaN / inf voxels are refused, never read as zeros).

    Args:
        what: what the image is (``'support image'``, ``'query'``, ...) for the messages.

    Raises:
        InputError: missing path, unreadable or damaged file, a folder without exactly one DICOM
            series, non-finite voxels, or an image that is not a 3D single-channel volume of at least
            two slices in every direction.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist: pass a NIfTI file or a DICOM series folder")
    try:
        image = read_dicom_series(path)[0] if path.is_dir() else read_image(path)
    except (FileNotFoundError, ValueError) as err:  # ImageIntegrityError is a ValueError
        raise InputError(f"{what}: {err}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} {path} is not a 3D single-channel volume: it has {image.GetDimension()} "
                         f"dimensions (size {image.GetSize()}) and {image.GetNumberOfComponentsPerPixel()} "
                         "component(s) per voxel; pass the 3D scan")
    if min(image.GetSize()) < 2:
        raise InputError(f"{what} {path} is a single slice (size {image.GetSize()}), not a 3D volume: pass the "
                         "whole scan (for DICOM, the folder holding the series, not one of its files)")
    return image


def check_same_grid(image: sitk.Image, label: sitk.Image, image_name: str, label_name: str) -> None:
    """Raise :class:`InputError` unless ``label`` lies on ``image``'s grid (``utils.io.grid_differences``),
    naming every property that differs with both values."""
    differ = grid_differences(image, label)
    if differ:
        raise InputError(f"the support label {label_name} is not on the grid of its image {image_name}: "
                         + "; ".join(differ) + " (image vs label). Pass the label drawn on this image")


def label_values(label: np.ndarray, name: str) -> np.ndarray:
    """The label array as int64; raises :class:`InputError` for fractional or negative values."""
    if label.dtype.kind == "f":
        as_int = np.rint(label)
        fractional = as_int != label
        if fractional.any():
            raise InputError(f"the support label {name} holds {int(fractional.sum())} non-integer value(s) (e.g. "
                             f"{float(label[fractional][0]):g}): a label map holds integer class ids (0 = background); "
                             "re-save it with integer values (resample labels with nearest-neighbour interpolation)")
        label = as_int
    label = label.astype(np.int64)
    if label.size and label.min() < 0:
        raise InputError(f"the support label {name} holds negative values: pass a label map with 0 = background")
    return label


# ----------------------------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------------------------
@dataclass
class Oriented:
    """A volume in the model's orientation: ``array`` (Z, H, W) of ``image`` = ``DICOMOrient(source)``."""

    source: sitk.Image
    image: sitk.Image
    array: np.ndarray
    source_code: str
    code: str

    @property
    def spacing_hw(self) -> tuple[float, float]:
        """In-plane spacing (rows, columns) of ``array`` in mm."""
        sx, sy, _ = self.image.GetSpacing()
        return float(sy), float(sx)


def orient(image: sitk.Image, code: str) -> Oriented:
    """Re-orient ``image`` to the ITK orientation ``code`` (permute / flip axes, no interpolation)."""
    source_code = orientation_code(image.GetDirection())
    oriented = sitk.DICOMOrient(image, code)
    return Oriented(image, oriented, sitk.GetArrayFromImage(oriented), source_code, code)


def back_to_source(array: np.ndarray, oriented: Oriented) -> sitk.Image:
    """A ``(Z, H, W)`` array on ``oriented``'s grid -> an image on the source grid (exact geometry)."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(oriented.image)
    back = sitk.DICOMOrient(image, oriented.source_code)
    if back.GetSize() != oriented.source.GetSize():  # cannot happen for a permutation / flip
        raise RuntimeError(f"re-orientation did not restore the grid: {back.GetSize()} vs {oriented.source.GetSize()}")
    back.CopyInformation(oriented.source)
    return back


def source_slice_index(oriented: Oriented) -> np.ndarray | None:
    """For each model slice (axis 0 of ``oriented.array``), the source image's third voxel index k;
    None when the source's k axis is not the model's slice axis (e.g. a sagittal acquisition)."""
    nz = oriented.source.GetSize()[2]
    # a 2 x 2 x nz image of k values with the source's direction: the axis permutation and flips of
    # DICOMOrient depend on the direction only
    index = sitk.GetImageFromArray(np.repeat(np.repeat(np.arange(nz, dtype=np.int32)[:, None, None], 2, 1), 2, 2))
    index.SetDirection(oriented.source.GetDirection())
    index.SetSpacing(oriented.source.GetSpacing())
    moved = sitk.GetArrayFromImage(sitk.DICOMOrient(index, oriented.code))
    per_slice = moved[:, 0, 0]
    if not (moved == per_slice[:, None, None]).all():
        return None
    return per_slice.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# In-plane grid
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlaneGrid:
    """Native oriented slices ``H x W`` <-> the model's ``S x S`` (see the module docstring, step 3).

    Attributes:
        native: ``(H, W)``; square: ``(H1, W1)`` after making the pixels square; side: ``P``, the
        padded square; pad: ``(top, left)``; size: ``S``.
    """

    native: tuple[int, int]
    square: tuple[int, int]
    side: int
    pad: tuple[int, int]
    size: int

    @classmethod
    def make(cls, native_hw: tuple[int, int], spacing_hw: tuple[float, float], size: int) -> "PlaneGrid":
        h, w = int(native_hw[0]), int(native_hw[1])
        sy, sx = spacing_hw
        if np.isclose(sy, sx, rtol=1e-3):
            h1, w1 = h, w
        else:
            pixel = min(sy, sx)
            h1, w1 = max(1, int(round(h * sy / pixel))), max(1, int(round(w * sx / pixel)))
        side = max(h1, w1)
        return cls((h, w), (h1, w1), side, ((side - h1) // 2, (side - w1) // 2), int(size))

    def _pad(self, slices: np.ndarray, value) -> np.ndarray:
        if self.square == (self.side, self.side):
            return slices
        top, left = self.pad
        out = np.full((slices.shape[0], self.side, self.side), value, dtype=slices.dtype)
        out[:, top:top + self.square[0], left:left + self.square[1]] = slices
        return out

    def images(self, slices: np.ndarray, pad_value: float) -> torch.Tensor:
        """z-scored native slices ``N x H x W`` -> model input float32 ``N x 3 x S x S``."""
        square = resize_image(slices, self.square)
        return to_model_input(resize_image(self._pad(square, np.float32(pad_value)), self.size))

    def masks(self, masks: np.ndarray) -> torch.Tensor:
        """Binary native masks ``N x H x W`` -> float32 ``N x S x S`` in {0, 1} (nearest)."""
        square = resize_labels(np.asarray(masks, dtype=np.uint8), self.square)
        return torch.from_numpy(resize_labels(self._pad(square, 0), self.size).astype(np.float32))

    def probabilities(self, prob: torch.Tensor) -> torch.Tensor:
        """Model-grid maps ``N x K x S x S`` -> native ``N x K x H x W`` (bilinear, crop, bilinear)."""
        if self.square == (self.side, self.side):
            return resize_probabilities(prob, self.native)
        top, left = self.pad
        padded = resize_probabilities(prob, (self.side, self.side))
        square = padded[..., top:top + self.square[0], left:left + self.square[1]]
        return resize_probabilities(square.contiguous(), self.native)
