"""Generate 3D supervoxels (ADNet's Felzenszwalb recipe) for every scan of a folder.

    python data/supervoxels/generate_supervoxels.py --data-dir DIR [--pattern 'image_*.nii.gz']
        [--n-sv 5000] [--out-dir DIR/supervoxels_<n_sv>] [--workers N] [--overwrite]
        [--edge-order {reference,stable}]

(``python -m data.supervoxels.generate_supervoxels ...`` works too.) For each ``image_<id>.nii.gz``
it writes ``superpix-MIDDLE_<id>.nii.gz`` (int32, the image's spacing/origin/direction; 0 is
background, supervoxel ids are positive and need not be consecutive) and, beside the outputs,
``summary.json`` with per-scan id count, segment-size percentiles and foreground coverage.
Existing outputs are kept (and reported) unless ``--overwrite``; every file is written atomically.

Per scan (docs/METHOD.md §8):
1. intensities rescaled to 0..255: ``255 * (x - min) / (max - min)``;
2. 3D Felzenszwalb segmentation with ``scale = 1``, ``sigma = 0``, ``min_size = n_sv`` and
   anisotropic edge weights from the image spacing (``felzenszwalb_3d_cy``), edges of equal cost
   in the reference order (see ``felzenszwalb_3d.py``);
3. a per-slice foreground mask (rescaled intensity > 10, largest 8-connected component, holes
   filled) zeroes the background; the segment labelled 0 becomes ``max + 1``.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import multiprocessing
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nibabel
import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from tqdm import tqdm

from data.supervoxels.felzenszwalb_3d import EDGE_ORDERS
from utils.io import read_image, write_image, write_json

DEFAULT_PATTERN = "image_*.nii.gz"
DEFAULT_N_SV = 5000  # ADNet / Q-Net / QAMP abdominal setting (1000 for cardiac MRI)
DEFAULT_SCALE = 1.0  # Felzenszwalb k, used as k / 255
DEFAULT_FG_THRESHOLD = 10.0  # foreground: rescaled intensity above this (0..255 scale)
OUTPUT_TEMPLATE = "superpix-MIDDLE_{}.nii.gz"
SUMMARY_NAME = "summary.json"
KERNEL_MODULE = "data.supervoxels.felzenszwalb_3d_cy"
KERNEL_VERSION = 2  # must equal felzenszwalb_3d_cy.KERNEL_VERSION
DEFAULT_EDGE_ORDER = "reference"  # reproduces the published CHAOST2 supervoxels bit for bit
SPACING_DIGITS = 6  # significant digits of the spacing as the reference read it (header text)
BUILD_HINT = (
    "build it from the repository root with `bash scripts/setup.sh` "
    "or `python data/supervoxels/setup.py build_ext --inplace`"
)
SIZE_PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


class SupervoxelError(Exception):
    """A problem with the user's input or set-up; the message names the path and the fix."""


# ----------------------------------------------------------------------------- algorithm


def load_kernel() -> Callable[..., np.ndarray]:
    """Return the compiled ``felzenszwalb_3d``, or raise SupervoxelError saying how to build it."""
    import importlib

    try:
        module = importlib.import_module(KERNEL_MODULE)
    except ImportError as err:
        raise SupervoxelError(
            f"the Cython supervoxel kernel {KERNEL_MODULE} is not built ({err}): {BUILD_HINT}"
        ) from None
    found = getattr(module, "KERNEL_VERSION", None)
    if found != KERNEL_VERSION:
        raise SupervoxelError(
            f"the built kernel {module.__file__} is stale (version {found}, expected "
            f"{KERNEL_VERSION}): re{BUILD_HINT}"
        )
    return module.felzenszwalb_3d


def reference_spacing(image: sitk.Image) -> tuple[float, float, float]:
    """Voxel size ``(z, y, x)`` of a 3D image as the reference code saw it.

    The reference read ``pixdim`` from the header's text form, which ITK prints with 6 significant
    digits (``7.7`` for the float32 ``7.6999998``). The edge weights depend on the last bits of
    the spacing, and with them the order of near-equal costs, so the geometry's spacing is rounded
    the same way.
    """
    return tuple(float(f"{s:.{SPACING_DIGITS}g}") for s in reversed(image.GetSpacing()))


def rescale_to_255(image: np.ndarray) -> np.ndarray:
    """``255 * (x - min) / (max - min)`` in float64, evaluated as the reference does.

    Integer inputs are converted to float64 first (the reference formula overflows on uint8).
    A constant volume maps to all zeros.
    """
    image = np.asarray(image, dtype=np.float64)
    low = image.min()
    span = image.max() - low
    if span == 0:
        return np.zeros_like(image)
    return 255 * (image - low) / span


def foreground_mask(image255: np.ndarray, threshold: float = DEFAULT_FG_THRESHOLD) -> np.ndarray:
    """Per-slice body mask: ``> threshold``, largest 8-connected component, holes filled.

    Args:
        image255: ``Z x Y x X`` intensities on the 0..255 scale.
        threshold: intensity above which a voxel is foreground.

    Returns:
        bool ``Z x Y x X``; slices without any voxel above ``threshold`` are all False. Ties
        between equally large components go to the one met first in raster order.
    """
    mask = np.zeros(image255.shape, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    for z, plane in enumerate(image255):
        above = plane > threshold
        if not above.any():
            continue
        components, _ = ndi.label(above, structure=eight)
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        mask[z] = ndi.binary_fill_holes(components == largest)
    return mask


def mask_supervoxels(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Renumber segment 0 to ``max + 1`` and set voxels outside ``mask`` to 0 (int32 result)."""
    out = np.array(labels, dtype=np.int32)
    out[out == 0] = out.max() + 1
    out[~mask] = 0
    return out


def compute_supervoxels(
    image: np.ndarray,
    spacing: Sequence[float],
    n_sv: int = DEFAULT_N_SV,
    scale: float = DEFAULT_SCALE,
    fg_threshold: float = DEFAULT_FG_THRESHOLD,
    edge_order: str = DEFAULT_EDGE_ORDER,
    segment: Callable[..., np.ndarray] | None = None,
) -> np.ndarray:
    """Supervoxels of one volume.

    Args:
        image: ``Z x Y x X`` intensities, any range and dtype.
        spacing: voxel size ``(z, y, x)`` in array-axis order (SimpleITK's ``GetSpacing()`` reversed).
        n_sv: minimum supervoxel size in voxels (the reference's ``min_size = n_sv``).
        scale: Felzenszwalb's ``k`` (used as ``k / 255``).
        fg_threshold: foreground threshold on the 0..255 scale.
        edge_order: order of equal-cost edges: ``"reference"`` (as the published supervoxels) or
            ``"stable"`` (enumeration order).
        segment: the segmentation function (default: the compiled kernel; tests pass the NumPy one).

    Returns:
        int32 ``Z x Y x X``: 0 background, positive supervoxel ids.
    """
    if n_sv <= 0:
        raise SupervoxelError(f"expected n_sv > 0, got {n_sv}: pass a positive --n-sv (e.g. 5000)")
    if edge_order not in EDGE_ORDERS:
        raise SupervoxelError(f"expected edge order in {EDGE_ORDERS}, got {edge_order!r}")
    segment = segment or load_kernel()
    image255 = rescale_to_255(image)
    labels = segment(image255, spacing=spacing, scale=scale, min_size=n_sv, order=edge_order)
    return mask_supervoxels(labels, foreground_mask(image255, fg_threshold))


def supervoxel_stats(sv: np.ndarray) -> dict[str, Any]:
    """Id count, segment-size percentiles (voxels) and foreground coverage of a supervoxel map."""
    ids, sizes = np.unique(sv[sv > 0], return_counts=True)
    percentiles = (
        {f"p{p}": float(np.percentile(sizes, p)) for p in SIZE_PERCENTILES} if len(sizes) else {}
    )
    return {
        "n_ids": int(len(ids)),
        "segment_size_percentiles": percentiles,
        "foreground_coverage": float(np.count_nonzero(sv) / sv.size),
    }


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie) between two label maps of the same shape.

    Every label, 0 included, is a cluster. Returns 1.0 for identical partitions (and when both
    put everything in one cluster).
    """
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"expected label maps of equal size, got {a.size} and {b.size}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    _, joint = np.unique(ia.astype(np.int64) * (ib.max() + 1) + ib, return_counts=True)

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float(np.sum(counts * (counts - 1) / 2))

    n_pairs = a.size * (a.size - 1) / 2
    index = pairs(joint)
    row, col = pairs(np.bincount(ia)), pairs(np.bincount(ib))
    expected = row * col / n_pairs if n_pairs else 0.0
    maximum = (row + col) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ScanTask:
    """One scan to process; ``out`` is where its supervoxels go."""

    scan_id: str
    image: Path
    out: Path
    n_sv: int
    scale: float
    fg_threshold: float
    edge_order: str


def scan_id_from_name(name: str, pattern: str) -> str:
    """The part of ``name`` matched by the ``*`` of ``pattern`` (``image_12.nii.gz`` -> ``12``)."""
    prefix, _, suffix = pattern.partition("*")
    return name[len(prefix) : len(name) - len(suffix)]


def find_scans(data_dir: Path, pattern: str = DEFAULT_PATTERN) -> list[tuple[str, Path]]:
    """``(scan_id, path)`` of the images in ``data_dir`` matching ``pattern``, sorted by id
    (numerically when every id is an integer).

    Raises:
        SupervoxelError: missing or empty folder, bad pattern, or no match.
    """
    data_dir = Path(data_dir)
    if pattern.count("*") != 1 or "/" in pattern:
        raise SupervoxelError(
            f"expected a --pattern with exactly one '*' standing for the scan id and no folder "
            f"part, got {pattern!r} (e.g. 'image_*.nii.gz')"
        )
    if not data_dir.is_dir():
        raise SupervoxelError(
            f"data directory {data_dir} does not exist: pass --data-dir pointing at the folder "
            f"holding the {pattern} images (see data/README.md)"
        )
    names = sorted(p.name for p in data_dir.iterdir() if p.is_file())
    if not names:
        raise SupervoxelError(
            f"data directory {data_dir} is empty: put the pre-processed {pattern} images there "
            "(see data/README.md) or pass the right --data-dir"
        )
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise SupervoxelError(
            f"no file in {data_dir} matches --pattern {pattern!r} (found {len(names)} other "
            f"file(s): {shown}): pass the --pattern your images follow"
        )
    scans = [(scan_id_from_name(n, pattern), data_dir / n) for n in matched]
    numeric = all(re.fullmatch(r"\d+", sid) for sid, _ in scans)
    return sorted(scans, key=lambda s: (int(s[0]), s[0]) if numeric else (0, s[0]))


def check_header(path: Path) -> None:
    """Read only the header of ``path``; raise SupervoxelError unless it is a 3D scalar image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise SupervoxelError(
            f"cannot read {path}: the file is corrupt, truncated or not a medical image. "
            "Re-download or re-create it (see data/README.md), or move it out of the folder."
        ) from None
    check_dimension(path, reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize())


def check_dimension(path: Path, ndim: int, components: int, size: Sequence[int]) -> None:
    if ndim != 3 or components != 1:
        raise SupervoxelError(
            f"{path}: expected a 3D single-channel volume, got {ndim}D with {components} "
            f"component(s) of size {tuple(size)}. Supervoxels need one Z x Y x X scan per file: "
            "convert it (e.g. stack 2D slices, split 4D series) or move it out of the folder."
        )


def check_complete(path: Path) -> None:
    """Refuse truncated files: ITK reads a cut ``.nii.gz`` without error, the missing voxels 0.

    Streams the decompressed bytes of ``.gz`` files and, for NIfTI, compares their number with the
    size the header announces.
    """
    name = path.name.lower()
    expected = None
    if name.endswith((".nii", ".nii.gz")):
        try:
            header = nibabel.load(path)
            expected = int(header.dataobj.offset) + header.get_data_dtype().itemsize * int(
                np.prod(header.shape))
        except Exception:  # nibabel raises many types for broken headers
            expected = None  # SimpleITK's reader gives the error message
    try:
        if name.endswith(".gz"):
            actual = 0
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    actual += len(chunk)
        else:
            actual = path.stat().st_size
    except (EOFError, OSError, zlib.error) as err:
        raise SupervoxelError(
            f"cannot read {path}: the file is truncated or corrupt ({err}). "
            "Re-download or re-create it (see data/README.md), or move it out of the folder."
        ) from None
    if expected is not None and actual < expected:
        raise SupervoxelError(
            f"cannot read {path}: the file is truncated ({actual} of {expected} bytes). "
            "Re-download or re-create it (see data/README.md), or move it out of the folder."
        )


def read_scan(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """The voxel array ``Z x Y x X`` and its SimpleITK image, with SupervoxelError on bad files."""
    check_complete(path)
    try:
        image = read_image(path)
    except (FileNotFoundError, ValueError) as err:
        raise SupervoxelError(str(err)) from None
    check_dimension(
        path, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize()
    )
    return sitk.GetArrayFromImage(image), image


def write_supervoxels(sv: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """Write int32 supervoxels atomically with the reference image's geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(sv, dtype=np.int32))
    out.CopyInformation(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(out, path)


def process_scan(task: ScanTask) -> dict[str, Any]:
    """Compute and write one scan's supervoxels; returns its summary row."""
    array, image = read_scan(task.image)
    start, start_cpu = time.perf_counter(), time.process_time()
    sv = compute_supervoxels(array, reference_spacing(image), task.n_sv, task.scale,
                             task.fg_threshold, task.edge_order)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    write_supervoxels(sv, image, task.out)
    return {"id": task.scan_id, "image": task.image.name, "output": task.out.name,
            "status": "written", "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3), **supervoxel_stats(sv)}


def existing_row(task: ScanTask) -> dict[str, Any]:
    """Summary row of an output that is already there (kept, not recomputed)."""
    try:
        array, _ = read_scan(task.out)
    except SupervoxelError as err:
        raise SupervoxelError(f"{err} It is an existing output: pass --overwrite to recompute it.")
    return {"id": task.scan_id, "image": task.image.name, "output": task.out.name,
            "status": "kept", "seconds": None, "cpu_seconds": None, **supervoxel_stats(array)}


def _init_worker() -> None:
    """Pool initialiser: every worker runs on one thread."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def generate_supervoxels(
    data_dir: str | os.PathLike,
    pattern: str = DEFAULT_PATTERN,
    n_sv: int = DEFAULT_N_SV,
    out_dir: str | os.PathLike | None = None,
    workers: int = 1,
    overwrite: bool = False,
    scale: float = DEFAULT_SCALE,
    fg_threshold: float = DEFAULT_FG_THRESHOLD,
    edge_order: str = DEFAULT_EDGE_ORDER,
    log: Callable[[str], None] = tqdm.write,
    progress: bool = True,
) -> dict[str, Any]:
    """Write supervoxels for every scan of ``data_dir`` and a ``summary.json``; return the summary.

    Args:
        data_dir: folder of images (``pattern``) on any grid; spacing comes from each image.
        pattern: file-name pattern with one ``*`` standing for the scan id.
        n_sv: minimum supervoxel size in voxels (5000 abdominal, 1000 cardiac in the references).
        out_dir: output folder (default ``<data_dir>/supervoxels_<n_sv>``).
        workers: parallel processes (each single-threaded); 1 runs in this process.
        overwrite: recompute scans whose output exists (otherwise they are kept and reported).
        scale, fg_threshold, edge_order: see :func:`compute_supervoxels`.
        log: where the per-scan lines go.
        progress: show a tqdm bar over scans.

    Raises:
        SupervoxelError: bad folder, pattern, image, ``n_sv`` or ``workers``, or kernel not built.
            Outputs finished before the error stay (complete); nothing is ever half-written.
    """
    if n_sv <= 0:
        raise SupervoxelError(f"expected --n-sv > 0, got {n_sv}: pass a positive minimum size")
    if workers < 1:
        raise SupervoxelError(f"expected --workers >= 1, got {workers}")
    if edge_order not in EDGE_ORDERS:
        raise SupervoxelError(f"expected --edge-order in {EDGE_ORDERS}, got {edge_order!r}")
    data_dir = Path(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else data_dir / f"supervoxels_{n_sv}"
    scans = find_scans(data_dir, pattern)
    tasks = [ScanTask(sid, path, out_dir / OUTPUT_TEMPLATE.format(sid), n_sv, scale, fg_threshold,
                      edge_order) for sid, path in scans]
    todo = [t for t in tasks if overwrite or not t.out.exists()]
    kept = [t for t in tasks if t not in todo]
    for task in todo:  # fail on unreadable headers / wrong dimensions before writing anything
        check_header(task.image)
    if todo:
        load_kernel()  # fail before any work if the extension is missing

    rows: dict[str, dict[str, Any]] = {}
    for task in kept:
        log(f"scan {task.scan_id}: {task.out} exists, kept (pass --overwrite to recompute)")
        rows[task.scan_id] = existing_row(task)

    bar = tqdm(total=len(todo), desc="supervoxels", unit="scan", disable=not progress)
    pool = None
    try:
        if workers == 1 or len(todo) <= 1:
            results = map(process_scan, todo)
        else:
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(todo)), initializer=_init_worker
            )
            results = pool.imap_unordered(process_scan, todo)
        for row in results:
            rows[row["id"]] = row
            log(f"scan {row['id']}: {row['n_ids']} ids, {row['seconds']:.2f} s -> {row['output']}")
            bar.update()
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()

    summary = {
        "data_dir": str(data_dir),
        "pattern": pattern,
        "n_sv": n_sv,
        "scale": scale,
        "fg_threshold": fg_threshold,
        "edge_order": edge_order,
        "scans": [rows[t.scan_id] for t in tasks],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="3D Felzenszwalb supervoxels (ADNet recipe) for every scan of a folder.",
    )
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="folder holding the images, e.g. ../shared/data/CHAOST2/chaos_MR_T2_normalized")
    parser.add_argument("--pattern", default=DEFAULT_PATTERN,
                        help="image file pattern; its one '*' is the scan id (default %(default)s)")
    parser.add_argument("--n-sv", type=int, default=DEFAULT_N_SV,
                        help="minimum supervoxel size in voxels (default %(default)s; 1000 for cardiac MRI)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output folder (default DATA_DIR/supervoxels_<n_sv>)")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel processes, one thread each (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute scans whose output already exists")
    parser.add_argument("--edge-order", choices=EDGE_ORDERS, default=DEFAULT_EDGE_ORDER,
                        help="order of equal-cost edges: 'reference' reproduces the published "
                             "supervoxels, 'stable' keeps enumeration order (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        summary = generate_supervoxels(
            args.data_dir, args.pattern, args.n_sv, args.out_dir, args.workers, args.overwrite,
            edge_order=args.edge_order,
        )
    except SupervoxelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    written = sum(row["status"] == "written" for row in summary["scans"])
    out_dir = args.out_dir or args.data_dir / f"supervoxels_{args.n_sv}"
    print(f"{written} written, {len(summary['scans']) - written} kept; summary: "
          f"{out_dir / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
