"""Generate 3D supervoxels (ADNet's Felzenszwalb recipe) for every scan of a folder.

    python data/supervoxels/generate_supervoxels.py --data-dir DIR [--pattern 'image_*.nii.gz']
        [--n-sv 5000] [--out-dir DIR/supervoxels_<n_sv>] [--workers N] [--overwrite]
        [--edge-order {reference,stable}]

(``python -m data.supervoxels.generate_supervoxels ...`` works too.) For each ``image_<id>.nii.gz``
it writes ``superpix-MIDDLE_<id>.nii.gz`` (int32, the image's spacing/origin/direction; 0 is
background, supervoxel ids are positive and need not be consecutive) and, beside the outputs,
``summary.json`` with per-scan id count, segment-size percentiles, foreground coverage and
provenance (edge order, n_sv, kernel version, time written, seconds), merged per file: outputs kept
from an earlier run keep their recorded provenance. Existing outputs are kept (and reported) unless
``--overwrite``; every file is written atomically. The output folder must be writable (checked
before any work). A worker process that dies or cannot start stops the run within seconds with an
error naming the scan; finished outputs stay and ``summary.json`` lists them (``incomplete`` says
what is missing).

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
import concurrent.futures
import datetime
import fnmatch
import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from tqdm import tqdm

from data.supervoxels.felzenszwalb_3d import EDGE_ORDERS
from utils.io import read_image_header, read_volume, write_image, write_json

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
    try:
        reader = read_image_header(path)
    except (FileNotFoundError, ValueError) as err:
        raise SupervoxelError(str(err)) from None
    check_dimension(path, reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize())


def check_dimension(path: Path, ndim: int, components: int, size: Sequence[int]) -> None:
    if ndim != 3 or components != 1:
        raise SupervoxelError(
            f"{path}: expected a 3D single-channel volume, got {ndim}D with {components} "
            f"component(s) of size {tuple(size)}. Supervoxels need one Z x Y x X scan per file: "
            "convert it (e.g. stack 2D slices, split 4D series) or move it out of the folder."
        )


def read_scan(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """The voxel array ``Z x Y x X`` and its SimpleITK image, read by the project's checked reader
    (``utils.io.read_volume``: truncated / corrupt gzip data and NaN / inf voxels are refused),
    with SupervoxelError on bad files."""
    try:
        header = read_image_header(path)
    except (FileNotFoundError, ValueError) as err:
        raise SupervoxelError(str(err)) from None
    check_dimension(path, header.GetDimension(), header.GetNumberOfComponents(), header.GetSize())
    try:
        return read_volume(path)
    except (FileNotFoundError, ValueError) as err:
        raise SupervoxelError(str(err)) from None


def write_supervoxels(sv: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """Write int32 supervoxels atomically with the reference image's geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(sv, dtype=np.int32))
    out.CopyInformation(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(out, path)


def provenance(task: ScanTask) -> dict[str, Any]:
    """How an output was made: recorded per file in ``summary.json`` and kept across runs."""
    return {"edge_order": task.edge_order, "n_sv": task.n_sv, "scale": task.scale,
            "fg_threshold": task.fg_threshold, "kernel_version": KERNEL_VERSION,
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def process_scan(task: ScanTask) -> dict[str, Any]:
    """Compute and write one scan's supervoxels; returns its summary row (with provenance)."""
    array, image = read_scan(task.image)
    start, start_cpu = time.perf_counter(), time.process_time()
    sv = compute_supervoxels(array, reference_spacing(image), task.n_sv, task.scale,
                             task.fg_threshold, task.edge_order)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    write_supervoxels(sv, image, task.out)
    return {"id": task.scan_id, "image": task.image.name, "output": task.out.name,
            "status": "written", "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3), **provenance(task), **supervoxel_stats(sv)}


UNKNOWN_PROVENANCE = {"edge_order": None, "n_sv": None, "scale": None, "fg_threshold": None,
                      "kernel_version": None, "written_at": None}


def existing_row(task: ScanTask, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summary row of an output that is already there (kept, not recomputed).

    Its provenance (edge order, timings, kernel version, ...) comes from ``previous``, the file's
    row in the existing ``summary.json``; None values when no summary recorded it.
    """
    try:
        array, _ = read_scan(task.out)
    except SupervoxelError as err:
        raise SupervoxelError(f"{err} It is an existing output: pass --overwrite to recompute it.")
    made = {"seconds": None, "cpu_seconds": None, **UNKNOWN_PROVENANCE}
    if previous:
        made.update({k: previous[k] for k in made if k in previous})
    return {"id": task.scan_id, "image": task.image.name, "output": task.out.name,
            "status": "kept", **made, **supervoxel_stats(array)}


def read_previous_summary(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows of an existing ``summary.json`` by output file name ({} when there is none)."""
    path = out_dir / SUMMARY_NAME
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("scans", [])
        return {row["output"]: row for row in rows if isinstance(row, dict) and "output" in row}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # unreadable: it will be replaced by the rows of this run


def check_out_dir(out_dir: Path) -> bool:
    """Create ``out_dir`` if needed and prove a file can be written there, before any work.

    Returns:
        True when this call created the folder.

    Raises:
        SupervoxelError: naming the folder, the reason and the fix.
    """
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        if created and out_dir.is_dir():
            out_dir.rmdir()
        raise SupervoxelError(
            f"output folder {out_dir} is not writable ({err.__class__.__name__}: "
            f"{err.strerror or err}): pass --out-dir with a writable folder, or fix its permissions"
        ) from None
    return created


_STARTED: Any = None  # worker side: queue of (pid, scan id) announcing each scan a worker starts


def _init_worker(started: Any = None) -> None:
    """Pool initialiser: every worker runs on one thread and announces the scans it starts."""
    global _STARTED
    _STARTED = started
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_in_worker(process: Callable[[ScanTask], dict[str, Any]], task: ScanTask) -> dict[str, Any]:
    if _STARTED is not None:
        _STARTED.put((os.getpid(), task.scan_id))
    return process(task)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _could_not_start(cause: str, waiting: Sequence[str]) -> SupervoxelError:
    return SupervoxelError(
        f"the worker processes could not start ({cause}) while scan(s) {', '.join(waiting)} waited: run with "
        f"--workers 1, or check that `{sys.executable} -c 'import data.supervoxels.generate_supervoxels'` works")


def _children(exclude: set[int]) -> dict[int, multiprocessing.process.BaseProcess]:
    """This process's live child processes (``multiprocessing.active_children``) not in ``exclude``, by pid."""
    return {p.pid: p for p in multiprocessing.active_children() if p.pid not in exclude}


def _pool_failure(todo: list[ScanTask], started: Any, seen: Mapping[int, multiprocessing.process.BaseProcess],
                  done_ids: set[str], queue: list[ScanTask]) -> SupervoxelError:
    """The error of a broken pool: the scan(s) whose worker died and how (``started`` tells which
    worker pid started which scan; ``seen`` holds every worker process), or workers that never started."""
    by_pid: dict[int, str] = {}
    while not started.empty():
        pid, scan_id = started.get()
        by_pid[pid] = scan_id
    for process_ in seen.values():  # a dead worker's exit code is set once it is joined
        process_.join(timeout=2)
    # SIGTERM: stopped by the pool itself once it broke, not a cause
    dead = {pid: p.exitcode for pid, p in seen.items() if p.exitcode not in (None, 0, -signal.SIGTERM)}
    in_flight = [t.scan_id for t in todo if t.scan_id not in done_ids and t not in queue]
    if not by_pid:
        return _could_not_start(", ".join(_describe_exit(c) for c in dead.values()) or "no exit code", in_flight)
    names = {t.scan_id: t.image.name for t in todo}
    culprits = [by_pid[pid] for pid in dead if pid in by_pid and by_pid[pid] in in_flight] or in_flight
    causes = {by_pid[pid]: _describe_exit(code) for pid, code in dead.items() if pid in by_pid}
    lost = [sid for sid in in_flight if sid not in culprits]
    return SupervoxelError(
        "a worker process died while processing "
        + ", ".join(f"scan {sid} ({names[sid]}, {causes.get(sid, 'no exit code')})" for sid in culprits)
        + (f"; scan(s) {', '.join(lost)} in progress beside it were stopped" if lost else "")
        + ": it was killed or crashed (out of memory? see `dmesg`); finished outputs are kept, "
        "rerun the same command to compute the missing scans (or use fewer --workers)")


def _run_pool(todo: list[ScanTask], workers: int, process: Callable[[ScanTask], dict[str, Any]],
              on_row: Callable[[dict[str, Any]], None]) -> None:
    """Run ``process`` over ``todo`` in ``workers`` spawned processes, at most one scan per worker
    in flight. A worker that dies or cannot start breaks the pool at once (no hang): the error
    names the scan(s) it was processing. Results of finished scans reach ``on_row`` as they come.
    Only public API: the workers are known as this process's children (``multiprocessing.active_children``).

    Raises:
        SupervoxelError: a worker died / could not start; or the error a scan raised.
    """
    ctx = multiprocessing.get_context("spawn")
    others = set(_children(set()))  # children that are not the pool's
    queue, running = list(todo), {}
    done_ids: set[str] = set()
    seen: dict[int, Any] = {}  # worker pid -> Process, kept: a dead worker leaves active_children()
    try:  # the queue and the pool's semaphore may start multiprocessing's resource tracker process
        started = ctx.SimpleQueue()  # (worker pid, scan id) of every scan a worker starts
        pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx,
                                                      initializer=_init_worker, initargs=(started,))
    except OSError as err:
        raise _could_not_start(f"{err.__class__.__name__}: {err}", [t.scan_id for t in todo]) from None
    finished = False
    try:
        while queue or running:
            while queue and len(running) < workers:
                task = queue.pop(0)
                try:
                    running[pool.submit(_run_in_worker, process, task)] = task
                except OSError as err:  # the pool could not create its processes
                    waiting = [t.scan_id for t in todo if t.scan_id not in done_ids]
                    raise _could_not_start(f"{err.__class__.__name__}: {err}", waiting) from None
            seen.update(_children(others))
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                on_row(future.result())
                done_ids.add(task.scan_id)
        finished = True
    except BrokenProcessPool:
        seen.update(_children(others))
        raise _pool_failure(todo, started, seen, done_ids, queue) from None
    finally:
        if not finished:  # do not wait for scans still running after an error
            for proc in {**seen, **_children(others)}.values():
                if proc.is_alive():
                    proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


# Straight through: checks, the plan (which scans to compute or keep), the run, the summary; half of it is
# the signature and the docstring.
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
    process: Callable[[ScanTask], dict[str, Any]] = process_scan,
) -> dict[str, Any]:
    """Write supervoxels for every scan of ``data_dir`` and a ``summary.json``; return the summary.

    ``summary.json`` is merged per output file: a file kept from an earlier run keeps its row's
    provenance (edge order, n_sv, kernel version, time written, seconds); rows of this run's files
    are replaced. The top-level parameters are those of the latest run.

    Args:
        data_dir: folder of images (``pattern``) on any grid; spacing comes from each image.
        pattern: file-name pattern with one ``*`` standing for the scan id.
        n_sv: minimum supervoxel size in voxels (5000 abdominal, 1000 cardiac in the references).
        out_dir: output folder (default ``<data_dir>/supervoxels_<n_sv>``); must be writable.
        workers: parallel processes (each single-threaded); 1 runs in this process.
        overwrite: recompute scans whose output exists (otherwise they are kept and reported).
        scale, fg_threshold, edge_order: see :func:`compute_supervoxels`.
        log: where the per-scan lines go.
        progress: show a tqdm bar over scans.
        process: the per-scan function (module-level, so that spawned workers can import it).

    Raises:
        SupervoxelError: bad folder, pattern, image, ``n_sv`` or ``workers``, unwritable output
            folder, kernel not built, or a worker that died / could not start (within seconds,
            naming the scan). Outputs finished before the error stay (complete, nothing is ever
            half-written) and ``summary.json`` then lists them, with ``incomplete`` saying what
            is missing.
    """
    if n_sv <= 0:
        raise SupervoxelError(f"expected --n-sv > 0, got {n_sv}: pass a positive minimum size")
    if workers < 1:
        raise SupervoxelError(f"expected --workers >= 1, got {workers}")
    if edge_order not in EDGE_ORDERS:
        raise SupervoxelError(f"expected --edge-order in {EDGE_ORDERS}, got {edge_order!r}")
    data_dir = Path(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else data_dir / f"supervoxels_{n_sv}"
    tasks = [ScanTask(sid, path, out_dir / OUTPUT_TEMPLATE.format(sid), n_sv, scale, fg_threshold,
                      edge_order) for sid, path in find_scans(data_dir, pattern)]
    todo = [t for t in tasks if overwrite or not t.out.exists()]
    kept = [t for t in tasks if t not in todo]
    for task in todo:  # fail on unreadable headers / wrong dimensions before writing anything
        check_header(task.image)
    created = False
    if todo:
        load_kernel()  # fail before any work if the extension is missing
        created = check_out_dir(out_dir)

    previous = read_previous_summary(out_dir)
    rows: dict[str, dict[str, Any]] = {}
    for task in kept:
        log(f"scan {task.scan_id}: {task.out} exists, kept (pass --overwrite to recompute)")
        rows[task.scan_id] = existing_row(task, previous.get(task.out.name))
    parameters = {"data_dir": str(data_dir), "pattern": pattern, "n_sv": n_sv, "scale": scale,
                  "fg_threshold": fg_threshold, "edge_order": edge_order}

    def on_row(row: dict[str, Any]) -> None:
        rows[row["id"]] = row
        log(f"scan {row['id']}: {row['n_ids']} ids, {row['seconds']:.2f} s -> {row['output']}")
        bar.update()

    bar = tqdm(total=len(todo), desc="supervoxels", unit="scan", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                on_row(process(task))
        else:
            _run_pool(todo, workers, process, on_row)
    except BaseException as err:
        if len(rows) > len(kept) or kept:  # something is there: record it, and what is missing
            write_json(out_dir / SUMMARY_NAME, _summary(parameters, tasks, rows, previous, out_dir,
                                                        str(err) or err.__class__.__name__))
        elif created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing was written: leave no empty folder behind
        raise
    finally:
        bar.close()

    result = _summary(parameters, tasks, rows, previous, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SUMMARY_NAME, result)
    return result


def _summary(parameters: Mapping[str, Any], tasks: Sequence[ScanTask], rows: Mapping[str, dict[str, Any]],
             previous: Mapping[str, dict[str, Any]], out_dir: Path, error: str | None = None) -> dict[str, Any]:
    """The content of ``summary.json``: the run's ``parameters``, this run's rows in scan order, then
    the earlier rows of files this run did not touch; with ``error``, what is ``incomplete``."""
    ours = {t.out.name for t in tasks}
    others = [row for name, row in previous.items() if name not in ours and (out_dir / name).is_file()]
    out = {**parameters, "scans": [rows[t.scan_id] for t in tasks if t.scan_id in rows] + others}
    if error is not None:
        out["incomplete"] = {"error": error, "missing": [t.scan_id for t in tasks if t.scan_id not in rows]}
    return out


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="3D Felzenszwalb supervoxels (ADNet recipe) for every scan of a folder.",
    )
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="folder holding the images, e.g. $QAMP_DATA_ROOT/CHAOST2/chaos_MR_T2_normalized")
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
