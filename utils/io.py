"""File I/O shared by every stage: atomic writes and NIfTI / DICOM reading with clear errors.

Every file this project writes goes through :func:`atomic_write`: the content is written to a
temporary file in the destination folder and renamed into place, so a crash never leaves a
half-written file under the final name, and readers never see one.

Every image this project reads goes through :func:`read_volume` / :func:`read_image` (headers only:
:func:`read_image_header`; DICOM series folders: :func:`read_dicom_series`). ITK alone reads a truncated ``.nii.gz`` without an error (the missing voxels
become 0) and its NIfTI reader turns NaN / inf voxels into 0; here both raise
:class:`ImageIntegrityError` naming the file, the problem and the fix. The proof is cheap: the
CRC-32 and length of the decoded header + voxels must equal the gzip trailer (one pass over memory,
libdeflate's CRC when the system has it); only a file that fails it is decompressed again to say
what is wrong (``bench/reader.py`` measures the cost).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import locale
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

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
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write a SimpleITK image (NIfTI when the name ends in ``.nii.gz``) atomically."""
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def orientation_code(direction) -> str:
    """ITK's three-letter orientation code of a 3D direction matrix (e.g. ``'LAS'`` for
    ``diag(1, -1, 1)``: axis i points towards the patient's left, j anterior, k superior;
    the closest code for an oblique matrix)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(d) for d in direction])


def _grid_fields(grid) -> tuple[tuple, tuple, tuple, tuple]:
    if isinstance(grid, sitk.Image):
        return grid.GetSize(), grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection()
    size, spacing, origin, direction = grid
    return tuple(size), tuple(spacing), tuple(origin), tuple(direction)


def grid_differences(a, b) -> list[str]:
    """What differs between two voxel grids, one ``'<property> <a> vs <b>'`` per property; ``[]``
    when they are the same grid. The one rule of this project (pre-processing, ``predict.py``):
    equal size; spacing within a relative 1e-4; origin within 1e-3 of ``a``'s smallest spacing (a
    thousandth of a voxel); direction cosines within 1e-4.

    Args:
        a, b: SimpleITK images, or ``(size, spacing, origin, direction)`` in ITK's (x, y, z) order.
    """
    (size_a, spacing_a, origin_a, dir_a), (size_b, spacing_b, origin_b, dir_b) = _grid_fields(a), _grid_fields(b)
    differ = [] if size_a == size_b else [f"size {size_a} vs {size_b}"]
    for name, x, y, rtol, atol in (("spacing", spacing_a, spacing_b, 1e-4, 0.0),
                                   ("origin", origin_a, origin_b, 0.0, 1e-3 * min(spacing_a)),
                                   ("direction", dir_a, dir_b, 0.0, 1e-4)):
        if len(x) != len(y) or not np.allclose(x, y, rtol=rtol, atol=atol):
            differ.append(f"{name} ({', '.join(f'{v:.6g}' for v in x)}) vs ({', '.join(f'{v:.6g}' for v in y)})")
    return differ


class ImageIntegrityError(ValueError):
    """A medical image that decodes but whose content cannot be trusted.

    Raised for a truncated or corrupt gzip stream (ITK would read the missing part as zeros) and
    for non-finite voxels (NaN / +-inf). The message names the file, the problem and the fix.
    """


_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _load_crc32() -> Callable[[int, np.ndarray], int]:
    """CRC-32 of an array's bytes: libdeflate's (about 4x zlib's speed) when the system has it."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("deflate") or "libdeflate.so.0")
        fast = lib.libdeflate_crc32
        fast.restype, fast.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return lambda crc, data: zlib.crc32(memoryview(data).cast("B"), crc)
    return lambda crc, data: fast(crc, data.ctypes.data, data.nbytes)


_crc32 = _load_crc32()
_GZIP_CHUNK = 1 << 18  # compressed bytes per step of the full check
_FIX = "Re-download or re-create it (see data/README.md), or move it out of the folder."


def _image_error(path: Path, err: RuntimeError) -> ValueError:
    first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reader error"
    return ValueError(
        f"cannot read {path}: the file is corrupt, truncated or not a medical image "
        f"({first}). {_FIX}"
    )


def read_image_header(path: str | os.PathLike) -> sitk.ImageFileReader:
    """Read only the header of an image (size, spacing, pixel type, ...); no voxel is decoded.

    Returns:
        a ``sitk.ImageFileReader`` after ``ReadImageInformation()`` (``GetSize()``,
        ``GetDimension()``, ``GetNumberOfComponents()``, ``GetSpacing()`` ...).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the header cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        check_complete(path)  # a cut / corrupt gzip stream: say so precisely
        raise _image_error(path, err) from None
    return reader


class _NiftiLayout(NamedTuple):
    vox_offset: int  # bytes before the voxel data
    n_bytes: int  # bytes of voxel data the header announces
    dtype: np.dtype | None  # float dtype of the voxels in file byte order; None for other types
    shape: tuple[int, ...]  # array shape in (..., Z, Y, X) order
    scaled: bool  # scl_slope / scl_inter change the values ITK returns


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _nifti_layout(head: bytes) -> _NiftiLayout | None:
    """Where the voxels are and what they are, from the first bytes of a NIfTI-1/2 file; None when
    ``head`` is not a NIfTI header."""
    for order in "<>":
        if len(head) >= 120 and struct.unpack(order + "i", head[:4])[0] == 348:
            dim = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            vox_offset = int(struct.unpack(order + "f", head[108:112])[0])
            slope, inter = struct.unpack(order + "2f", head[112:120])
            break
        if len(head) >= 192 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dim = struct.unpack(order + "8q", head[16:80])
            vox_offset = struct.unpack(order + "q", head[168:176])[0]
            slope, inter = struct.unpack(order + "2d", head[176:192])
            break
    else:
        return None
    n_dim = dim[0]
    if not 0 < n_dim <= 7 or bitpix <= 0 or bitpix % 8:
        return None
    shape = tuple(max(int(d), 1) for d in reversed(dim[1:n_dim + 1]))
    n_bytes = int(np.prod(shape, dtype=np.int64)) * bitpix // 8
    dtype = np.dtype(order + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    scaled = bool(np.isfinite(slope) and slope not in (0.0, 1.0)) or bool(
        slope != 0.0 and np.isfinite(inter) and inter != 0.0)
    return _NiftiLayout(max(int(vox_offset), 0), n_bytes, dtype, shape, scaled)


def _byte_order(head: bytes) -> str:
    return "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"


def _check_raw_finite(path: Path, raw: bytes | np.ndarray, layout: _NiftiLayout) -> None:
    """Non-finite check on the voxels as stored (ITK's NIfTI reader turns NaN / inf into 0)."""
    if layout.dtype is None:
        return
    count = layout.n_bytes // layout.dtype.itemsize
    voxels = np.frombuffer(raw, layout.dtype, count, layout.vox_offset)
    check_finite(path, voxels.reshape(layout.shape))


def _gzip_head(path: Path, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the decompressed stream of a ``.gz`` file (fewer if it is shorter)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b""
    with open(path, "rb") as handle:
        while len(out) < n_bytes and not inflater.eof:
            chunk = inflater.unconsumed_tail or handle.read(1 << 16)
            if not chunk:
                break
            out += inflater.decompress(chunk, n_bytes - len(out))
    return out


def _gzip_trailer(path: Path) -> tuple[int, int]:
    """``(crc32, size mod 2**32)`` stored in the last 8 bytes of a gzip file."""
    with open(path, "rb") as handle:
        handle.seek(-8, os.SEEK_END)
        return struct.unpack("<II", handle.read(8))


def _check_gzip_stream(path: Path, layout: _NiftiLayout | None) -> None:
    """Decompress the whole ``.gz`` file (every member), letting zlib check each CRC and length,
    then check the stored voxels for NaN / inf (ITK's NIfTI reader silently reads them as 0).

    Raises:
        ImageIntegrityError: the stream is cut short, fails its checksum, holds fewer bytes than
            the NIfTI header announces, or float voxels are not finite.
    """
    expected = layout.vox_offset + layout.n_bytes if layout is not None else None
    keep = layout is not None and layout.dtype is not None
    parts: list[bytes] = []
    total = 0
    try:
        with open(path, "rb") as handle:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            pending = b""
            while True:
                chunk, pending = pending or handle.read(_GZIP_CHUNK), b""
                if not chunk:
                    raise ImageIntegrityError(
                        f"cannot read {path}: the file is truncated: its gzip stream ends after "
                        f"{total} decompressed bytes"
                        + (f" of the {expected} the NIfTI header announces" if expected else "")
                        + f" (ITK would read the missing voxels as 0). {_FIX}")
                out = inflater.decompress(chunk)
                total += len(out)
                if keep:
                    parts.append(out)
                if inflater.eof:  # end of a gzip member: another member may follow
                    rest = inflater.unused_data + handle.read()
                    if not rest.strip(b"\0"):
                        break
                    inflater, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
    except zlib.error as err:
        raise ImageIntegrityError(
            f"cannot read {path}: the file is corrupt: its gzip data fails to decompress after "
            f"{total} bytes ({err}). {_FIX}") from None
    if expected is not None and total < expected:
        raise ImageIntegrityError(
            f"cannot read {path}: the file is truncated: it holds {total} of the {expected} bytes "
            f"the NIfTI header announces (ITK would read the missing voxels as 0). {_FIX}")
    if keep:
        _check_raw_finite(path, b"".join(parts), layout)


def check_complete(path: str | os.PathLike, voxels: np.ndarray | None = None) -> None:
    """Refuse a truncated or corrupt NIfTI file (ITK reads a cut ``.nii.gz`` without an error).

    With ``voxels`` (the array ITK decoded, any layout ITK returns), a ``.nii.gz`` file is checked
    in one pass over memory: the CRC-32 of header + voxels and the total length must equal the gzip
    trailer. When they do not (or ``voxels`` is None, the file is multi-member or scaled by
    ``scl_slope``), the whole stream is decompressed and checked by zlib, which names the problem.
    An uncompressed ``.nii`` must be at least as long as its header announces. Other formats are
    not checked.

    Raises:
        ImageIntegrityError: naming the file, the problem and the fix.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(_NIFTI_SUFFIXES):
        return
    if name.endswith(".nii"):
        with open(path, "rb") as handle:
            layout = _nifti_layout(handle.read(540))
        if layout is None:
            return
        size = path.stat().st_size
        if size < layout.vox_offset + layout.n_bytes:
            raise ImageIntegrityError(
                f"cannot read {path}: the file is truncated: {size} bytes, the NIfTI header "
                f"announces {layout.vox_offset + layout.n_bytes} (ITK would read the missing voxels "
                f"as 0). {_FIX}")
        if layout.dtype is not None:
            _check_raw_finite(path, np.memmap(path, np.uint8, "r"), layout)
        return
    try:
        head = _gzip_head(path, 540)
    except zlib.error as err:
        raise ImageIntegrityError(f"cannot read {path}: the file is corrupt: not gzip data ({err}). "
                                  f"{_FIX}") from None
    layout = _nifti_layout(head)
    if layout is not None and voxels is not None and not layout.scaled \
            and voxels.nbytes == layout.n_bytes and path.stat().st_size >= 18:
        header = head if len(head) >= layout.vox_offset else _gzip_head(path, layout.vox_offset)
        data = np.ascontiguousarray(voxels)
        if data.dtype.itemsize > 1 and _byte_order(head) != ("<" if sys.byteorder == "little" else ">"):
            data = data.byteswap()  # ITK returns native order; the CRC is over the file's bytes
        crc = _crc32(zlib.crc32(header[:layout.vox_offset]), data)
        expected = layout.vox_offset + layout.n_bytes
        if _gzip_trailer(path) == (crc, expected & 0xFFFFFFFF):
            return  # fast path: the decoded voxels are exactly the compressed stream's content
    _check_gzip_stream(path, layout)


def check_finite(path: str | os.PathLike, voxels: np.ndarray) -> None:
    """Refuse NaN / +-inf voxels of a float array (one vectorised pass when all are finite).

    Raises:
        ImageIntegrityError: naming the file, how many voxels, where the first one is and the fix.
    """
    if voxels.dtype.kind not in "fc" or voxels.size == 0:
        return
    if np.isfinite(voxels.sum()):  # NaN / inf propagate; one pass, no temporary array
        return
    bad = ~np.isfinite(voxels)
    if not bad.any():
        return  # the sum overflowed, every voxel is finite
    n_nan = int(np.isnan(voxels).sum())
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), voxels.shape))
    raise ImageIntegrityError(
        f"{path}: expected finite voxel values, got {n_nan} NaN and {int(bad.sum()) - n_nan} "
        f"infinite voxel(s) (first at array index {first}, (Z, Y, X) order); ITK's NIfTI reader would "
        "silently read them as 0. Replace them in the source (e.g. numpy.nan_to_num and re-save, or mask them "
        "out) or re-create the file (see data/README.md)."
    )


def _read_itk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        check_complete(path)  # a cut / corrupt gzip stream: say so precisely
        raise _image_error(path, err) from None


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a medical image, checked, turning every failure into one error that names the file.

    The project's one image reader (with :func:`read_volume`): the loaders, ``test.py``,
    ``--check``, ``data.preprocess`` (recipes and ``verify``) and the supervoxel generator all read
    through it. Besides decoding, it proves that a NIfTI file is complete and uncorrupted
    (:func:`check_complete`) and that no voxel is NaN or infinite (:func:`check_finite`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (corrupt, truncated or not an image).
        ImageIntegrityError (a ValueError): truncated / corrupt gzip data, non-finite voxels.
    """
    path = Path(path)
    image = _read_itk(path)
    voxels = sitk.GetArrayViewFromImage(image)
    check_complete(path, voxels)
    check_finite(path, voxels)
    return image


_DICOM_SUFFIXES = ("", ".dcm", ".ima", ".dicom")  # names DICOM slice files carry


def read_dicom_series(folder: str | os.PathLike) -> tuple[sitk.Image, list[Path]]:
    """Read the one DICOM series of ``folder`` (slices sorted by position along the normal), checked.

    The DICOM counterpart of :func:`read_image`: a slice file GDCM cannot parse (truncated, corrupt)
    is left out of the series by ITK without a word, so every file that looks like a slice (no
    suffix, ``.dcm``, ``.ima``, ``.dicom``; hidden files and ``DICOMDIR`` aside) must belong to the
    series; voxels must be finite. The process's C locale, which GDCM may switch, is restored.

    Returns:
        ``(image, files)``: the 3D image (pixel type as stored, e.g. int16; float when the series
        rescales with a fractional slope) and its slice files in z order.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: no readable series, several series, slice files outside the series, a series
            ITK cannot decode, or non-finite voxels; the message names the folder and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder not found: {folder}")
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM may set the C locale and leave it
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        slices = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.name != "DICOMDIR" and p.suffix.lower() in _DICOM_SUFFIXES)
        if not series:
            raise ValueError(f"{folder}: no readable DICOM series ({len(slices)} file(s) that could be slices); "
                             "pass a folder holding one DICOM series")
        if len(series) > 1:
            raise ValueError(f"{folder} holds {len(series)} DICOM series ({', '.join(series)}); expected exactly "
                             "one: move the other series' files out of the folder")
        files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])]
        unread = sorted(set(slices) - set(files))
        if unread:
            raise ValueError(f"{folder}: {len(unread)} file(s) are not readable as part of the series (truncated, "
                             f"corrupt or not DICOM; ITK would leave them out): {[p.name for p in unread[:10]]}. "
                             "Copy them again from the source, or move them out of the folder")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        try:
            image = reader.Execute()
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reader error"
            raise ValueError(f"{folder}: cannot read the DICOM series ({last}); copy it again from the source") \
                from None
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    check_finite(folder, sitk.GetArrayViewFromImage(image))
    return image, files


class _ImageBuffer:
    """Hands an image's voxel buffer to numpy without a copy and keeps the image alive as long as
    any array made from it (``GetArrayViewFromImage`` alone does not)."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def read_volume(path: str | os.PathLike, ndim: int = 3) -> tuple[np.ndarray, sitk.Image]:
    """Read an image as a numpy array in SimpleITK order ``(Z, Y, X)`` plus its geometry.

    Same checks as :func:`read_image` (complete, uncorrupted, finite voxels).

    Returns:
        ``(array, image)``: the voxel array and the SimpleITK image it came from (use
        ``image.GetSpacing()``, ``GetOrigin()``, ``GetDirection()`` or ``CopyInformation``).
        The array is a read-only view of the image's voxel buffer (no copy; it keeps the image
        alive): derive new arrays from it, or ``.copy()`` it to modify it in place.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the image cannot be decoded, or does not have ``ndim`` dimensions.
        ImageIntegrityError (a ValueError): truncated / corrupt gzip data, non-finite voxels.
    """
    path = Path(path)
    image = _read_itk(path)
    if image.GetDimension() != ndim or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a {ndim}D single-channel image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) of size {image.GetSize()}"
        )
    array = np.asarray(_ImageBuffer(image))
    check_complete(path, array)
    check_finite(path, array)
    return array, image


def _describe_content(path: Path) -> str:
    """A short description of what a file holds, from its first bytes (for error messages)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as err:
        return f"an unreadable file ({err.strerror or err})"
    if not head:
        return "an empty file"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data (an image or an archive?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that torch cannot read (truncated or not a torch.save file)"
    if head.startswith(b"\x80"):
        return "a pickle that torch cannot read (truncated, or saved by another program)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting with {head[:8]!r}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file starting with {first!r}"


def load_torch_file(path: str | os.PathLike, what: str, key: str,
                    map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for files that are not torch files.

    Every weights / snapshot reader (``load_snapshot``, ``models.encoder.load_pretrained``,
    ``tools.convert``) goes through here, so a text file, an image or a truncated download gets
    the same message everywhere instead of a raw ``KeyError`` / ``UnpicklingError``.

    Args:
        path: the file.
        what: what the file should be, e.g. ``"snapshot"``, ``"pretrained weights"``.
        key: the config key or option that named it (used in the fix).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``"{key}={path}: expected a PyTorch file (torch.save) holding {what}, got ..."``.
    """
    import torch  # here, not at the top: readers of images (e.g. supervoxel workers) need no torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: {what} file not found; pass an existing file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises KeyError, UnpicklingError, RuntimeError, EOFError ...
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise ValueError(
            f"{key}={str(path)!r}: expected a PyTorch file (written by torch.save) holding {what}, "
            f"got {_describe_content(path)} ({err.__class__.__name__}: {detail}); point {key} at "
            f"the right .pth file (re-download or re-create it if it is damaged)"
        ) from None
