"""File I/O shared by every stage: atomic writes and NIfTI reading with clear errors.

Every file this project writes goes through :func:`atomic_write`: the content is written to a
temporary file in the destination folder and renamed into place, so a crash never leaves a
half-written file under the final name, and readers never see one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Args:
        path: final destination. Its folder must exist.
        suffix: suffix of the temporary file (defaults to the destination's full suffix, so that
            writers that pick a format from the name, e.g. ``.nii.gz``, still work).

    On an exception the temporary file is removed and the destination is left untouched.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; use normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write a SimpleITK image (NIfTI when the name ends in ``.nii.gz``) atomically."""
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a medical image, turning every failure into one error that names the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded (corrupt or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reader error"
        raise ValueError(
            f"cannot read {path}: the file is corrupt, truncated or not a medical image "
            f"({first}). Re-download or re-create it (see data/README.md)."
        ) from None


def read_volume(path: str | os.PathLike, ndim: int = 3) -> tuple[np.ndarray, sitk.Image]:
    """Read an image as a numpy array in SimpleITK order ``(Z, Y, X)`` plus its geometry.

    Returns:
        ``(array, image)``: the voxel array and the SimpleITK image it came from (use
        ``image.GetSpacing()``, ``GetOrigin()``, ``GetDirection()`` or ``CopyInformation``).

    Raises:
        ValueError: the image does not have ``ndim`` dimensions.
    """
    image = read_image(path)
    if image.GetDimension() != ndim or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a {ndim}D single-channel image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) of size {image.GetSize()}"
        )
    return sitk.GetArrayFromImage(image), image
