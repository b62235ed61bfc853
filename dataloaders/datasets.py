"""Dataset definitions, scan discovery, folds and volume loading.

Every dataset this project knows is one :class:`DatasetSpec` in :data:`DATASETS`, defined in
``data/registry.py`` (data, not code branches; re-exported here). A researcher's own data is a
folder of ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` files plus a ``dataset.json`` (see
:func:`load_custom_spec`), used with ``dataset='custom'``.

Folds follow the protocol of the field (docs/METHOD.md §6): scans are sorted by their
numeric id and fold ``k`` holds the positions ``k*s .. (k+1)*s`` (``s = n_scans // 5``, so adjacent
folds share one scan); the last fold holds ``4*s .. n_scans-1`` plus position 0.

Print the folds of a dataset::

    python -m dataloaders.datasets --dataset CHAOST2 --data-dir $QAMP_DATA_ROOT --folds
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from data.registry import (CUSTOM, CUSTOM_SPEC_FILE, DATASETS, N_FOLDS, DatasetSpec,  # noqa: F401 (re-exported)
                           make_folds, read_custom_json)
from utils.io import read_image_header, read_volume

SUPERVOXEL_COMMAND = "python data/supervoxels/generate_supervoxels.py --data-dir {image_dir}"
_IMAGE_RE = re.compile(r"^image_(?P<id>[^.]+)\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^label_(?P<id>[^.]+)\.nii(\.gz)?$")
_SUPERVOXEL_RE = re.compile(r"^superpix-MIDDLE_(?P<id>[^.]+)\.nii(\.gz)?$")


# --------------------------------------------------------------------------------------------
# Dataset definitions (data/registry.py; re-exported here for the loaders' callers)
# --------------------------------------------------------------------------------------------
def _unknown_dataset(name: str) -> ValueError:
    known = ", ".join([*DATASETS, CUSTOM])
    return ValueError(
        f"dataset: unknown dataset {name!r}; known datasets: {known} ('custom' reads "
        f"{CUSTOM_SPEC_FILE} from data_dir)"
    )


def get_dataset(name: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` for ``name``.

    Args:
        name: a key of :data:`DATASETS` or ``'custom'``.
        data_dir: needed for ``'custom'`` only: the folder with the scans and ``dataset.json``.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a bad ``dataset.json``.
    """
    if name in DATASETS:
        return DATASETS[name]
    if name == CUSTOM:
        if data_dir is None:
            raise ValueError(
                "data_dir: dataset='custom' needs data_dir, the folder holding image_<id>.nii.gz, "
                f"label_<id>.nii.gz and {CUSTOM_SPEC_FILE}"
            )
        return load_custom_spec(data_dir)
    raise _unknown_dataset(name)


def load_custom_spec(image_dir: str | Path) -> DatasetSpec:
    """Read ``<image_dir>/dataset.json`` into a :class:`DatasetSpec`.

    The file is hand-written, so it is read as JSON5: plain JSON, plus ``//`` comments, trailing
    commas and unquoted keys. Format (only ``labels`` is required)::

        {
          "name": "my_data",                       // informational
          "modality": "MR",                        // "MR" (default) or "CT"
          "labels": {"1": "liver", "2": "spleen"}, // label id -> name, background 0 implicit
          "test_labels": [1, 2],                   // default: every label
          "n_sv": 5000,                            // supervoxel folder supervoxels_<n_sv>
          "image_size": 256,                       // default: read from the first image
          "label_remap": {"255": 1},               // stored value -> label id (optional)
          "folds": [[1, 2, 3], [3, 4, 5], ...],    // 5 lists of scan ids (default: the fold rule)
        }
    """
    image_dir = Path(image_dir)
    path = image_dir / CUSTOM_SPEC_FILE
    raw = read_custom_json(image_dir)
    label_names = raw["labels"]

    scans = discover_scans(image_dir)
    ids = [s.scan_id for s in scans]
    if "folds" in raw:
        folds_ids = raw["folds"]
        if not isinstance(folds_ids, list) or len(folds_ids) != N_FOLDS:
            raise ValueError(f"{path}: 'folds' must be a list of {N_FOLDS} lists of scan ids")
        missing = sorted({int(i) for f in folds_ids for i in f} - set(ids))
        if missing:
            raise ValueError(f"{path}: 'folds' names scan ids {missing} with no image_<id> file in {image_dir}")
        position = {scan_id: pos for pos, scan_id in enumerate(ids)}
        folds = tuple(tuple(sorted(position[int(i)] for i in f)) for f in folds_ids)
    else:
        folds = make_folds(len(ids))
    image_size = raw.get("image_size")
    if image_size is None:
        image_size = int(read_image_header(scans[0].image).GetSize()[0])
    spec = DatasetSpec(
        name=CUSTOM,
        folder="",
        label_names=label_names,
        test_labels=tuple(int(x) for x in raw.get("test_labels", sorted(label_names))),
        n_sv=int(raw.get("n_sv", 5000)),
        image_size=int(image_size),
        modality=raw["modality"],
        folds=folds,
        n_scans=len(ids),
        label_remap=raw["label_remap"],
    )
    spec.check_labels(f"{path}: test_labels", spec.test_labels)
    return spec


# --------------------------------------------------------------------------------------------
# Files on disk
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanFiles:
    """The files of one scan, paired by id."""

    scan_id: int
    image: Path
    label: Path
    supervoxel: Path | None = None


def resolve_image_dir(dataset: str | DatasetSpec, data_dir: str | Path) -> Path:
    """The folder holding ``image_<id>`` files.

    ``data_dir`` may be that folder itself, a dataset folder holding ``<folder>`` (the reference
    layout, e.g. ``data/CHAOST2``), or a root holding ``<name>/<folder>`` (e.g. ``$QAMP_DATA_ROOT``).

    Raises:
        FileNotFoundError: none of these exist (the message lists what was tried).
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else (
        DATASETS.get(dataset) if dataset != CUSTOM else None
    )
    if spec is None and dataset != CUSTOM:
        raise _unknown_dataset(str(dataset))
    data_dir = Path(data_dir)
    candidates = [data_dir]
    if spec is not None and spec.folder:
        candidates += [data_dir / spec.folder, data_dir / spec.name / spec.folder]
    for cand in candidates:
        if cand.is_dir() and any(_IMAGE_RE.match(p.name) for p in cand.iterdir()):
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"data_dir: no image_<id>.nii.gz files found for dataset "
        f"{spec.name if spec else CUSTOM} (tried {tried}); set data_dir to the image folder or "
        "to the root holding <DATASET>/<folder> (see data/README.md)"
    )


def _numeric_id(path: Path, match: re.Match) -> int:
    text = match.group("id")
    if not text.isdigit():
        raise ValueError(
            f"{path}: scan ids must be integers (image_<int>.nii.gz), got {text!r}; rename the "
            "image, label and supervoxel files of this scan"
        )
    return int(text)


def _index(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match:
            scan_id = _numeric_id(path, match)
            if scan_id in found:
                raise ValueError(f"{folder}: two files for scan id {scan_id}: {found[scan_id].name}, {path.name}; keep one")
            found[scan_id] = path
    return found


def discover_scans(image_dir: str | Path, supervoxel_dir: str | Path | None = None) -> list[ScanFiles]:
    """All scans in ``image_dir``, sorted by numeric id, image/label/supervoxel paired by id.

    Args:
        image_dir: folder of ``image_<id>.nii.gz`` and ``label_<id>.nii.gz``.
        supervoxel_dir: folder of ``superpix-MIDDLE_<id>.nii.gz``; when given every scan must have one.

    Raises:
        FileNotFoundError: no images.
        ValueError: ids with an image but no label (or supervoxel), labels with no image,
            non-numeric ids.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}; check data_dir")
    images = _index(image_dir, _IMAGE_RE)
    labels = _index(image_dir, _LABEL_RE)
    if not images:
        raise FileNotFoundError(f"{image_dir}: no image_<id>.nii.gz files; check data_dir")
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise ValueError(
            f"{image_dir}: scan ids {no_label} have an image_<id> file but no label_<id> file; "
            "add the labels or move those images out of the folder"
        )
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise ValueError(
            f"{image_dir}: scan ids {no_image} have a label_<id> file but no image_<id> file; "
            "add the images or move those labels out of the folder"
        )
    files = [ScanFiles(scan_id, images[scan_id], labels[scan_id]) for scan_id in sorted(images)]
    return files if supervoxel_dir is None else pair_supervoxels(files, supervoxel_dir)


def pair_supervoxels(files: Sequence[ScanFiles], supervoxel_dir: str | Path) -> list[ScanFiles]:
    """``files`` with their ``superpix-MIDDLE_<id>.nii.gz`` of ``supervoxel_dir`` (every scan must have one).

    Raises:
        ValueError: scans without a supervoxel file (the message names them and the command that makes them).
    """
    supervoxels = _index(Path(supervoxel_dir), _SUPERVOXEL_RE)
    no_sv = [f.scan_id for f in files if f.scan_id not in supervoxels]
    if no_sv:
        image_dir = files[0].image.parent
        raise ValueError(
            f"{supervoxel_dir}: scan ids {no_sv} have no superpix-MIDDLE_<id>.nii.gz; run "
            f"`{SUPERVOXEL_COMMAND.format(image_dir=image_dir)}` to (re)make them"
        )
    return [dataclasses.replace(f, supervoxel=supervoxels[f.scan_id]) for f in files]


def find_supervoxel_dir(image_dir: str | Path, n_sv: int, supervoxel_dir: str | Path | None = None) -> Path:
    """Where the supervoxels live: ``supervoxel_dir`` if given, else ``<image_dir>/supervoxels_<n_sv>``,
    else ``<image_dir>/../supervoxels_<n_sv>`` (the published CHAOST2 layout).

    Raises:
        FileNotFoundError: none exists; the message names the command that makes them.
    """
    image_dir = Path(image_dir)
    make = SUPERVOXEL_COMMAND.format(image_dir=image_dir)
    if supervoxel_dir is not None:
        if not Path(supervoxel_dir).is_dir():
            raise FileNotFoundError(
                f"supervoxel_dir: folder {supervoxel_dir} not found; fix supervoxel_dir or make the "
                f"supervoxels with `{make}`"
            )
        return Path(supervoxel_dir)
    candidates = [image_dir / f"supervoxels_{n_sv}", image_dir.parent / f"supervoxels_{n_sv}"]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"no supervoxel folder supervoxels_{n_sv} for {image_dir} (tried "
        f"{', '.join(map(str, candidates))}); make them with `{make}` (or set supervoxel_dir, or "
        "use_gt=True to train on ground-truth labels)"
    )


def fold_positions(spec: DatasetSpec, n_scans: int, eval_fold: int) -> list[int]:
    """Sorted positions (in the numerically sorted scan list) of fold ``eval_fold``."""
    eval_fold = spec.check_fold(eval_fold)
    if n_scans != spec.n_scans:
        raise ValueError(
            f"dataset {spec.name}: its fold table is made for {spec.n_scans} scans, found {n_scans}; "
            "use the complete dataset, or dataset='custom' with a dataset.json for a subset"
        )
    return sorted(spec.folds[eval_fold])


def fold_scan_ids(spec: DatasetSpec, scan_ids: Sequence[int], eval_fold: int) -> list[int]:
    """Scan ids of fold ``eval_fold``, in numeric order (``supp_idx`` indexes this list).

    Args:
        spec: the dataset.
        scan_ids: every scan id of the dataset (any order; sorted numerically here).
        eval_fold: 0..4.
    """
    ids = sorted(int(i) for i in scan_ids)
    return [ids[pos] for pos in fold_positions(spec, len(ids), eval_fold)]


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------
def zscore(volume: np.ndarray, path: str | Path = "") -> np.ndarray:
    """Per-volume z-score ``(x - mean) / std`` over all voxels, returned as float32 (Z x H x W)."""
    mean = float(volume.mean(dtype=np.float64))
    std = float(volume.std(dtype=np.float64))
    if not std > 0:
        raise ValueError(f"{path}: the image is constant (std 0), cannot z-score it; check the file")
    out = volume.astype(np.float32)
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


def _compact_int(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Integer-valued array (float or int on disk) -> the smallest fitting unsigned/int dtype."""
    lo, hi = (values.min(), values.max()) if values.size else (0, 0)
    if lo < 0:
        raise ValueError(f"{path}: {what} must be >= 0, found {lo}; fix the file")
    dtype = next(d for d in (np.uint8, np.uint16, np.int32, np.int64) if hi <= np.iinfo(d).max)
    out = values.astype(dtype)
    if values.dtype.kind == "f" and not np.array_equal(out, values):
        raise ValueError(f"{path}: {what} must hold integer values, found fractional ones; fix the file")
    return out


def present_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a non-negative integer array (bincount, O(n))."""
    hi = int(values.max()) if values.size else 0
    if hi > 1_000_000:
        return np.unique(values)
    return np.flatnonzero(np.bincount(values.ravel(), minlength=hi + 1))


def read_label(spec: DatasetSpec, path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a label volume, check it and map stored values to label ids.

    Returns:
        ``uint8``/``uint16`` array (Z x H x W) of label ids (0 background).

    Raises:
        ValueError: shape differs from ``shape`` (the image's), or values outside the label map.
    """
    raw, _ = read_volume(path)
    if shape is not None and raw.shape != tuple(shape):
        raise ValueError(
            f"{path}: label shape {raw.shape} (Z, Y, X) does not match its image's {tuple(shape)}; "
            "re-export the label on the image's grid"
        )
    label = _compact_int(raw, path, "labels")
    found = present_values(label)
    allowed = spec.stored_label_values
    outside = sorted(set(found.tolist()) - set(allowed))
    if outside:
        fix = ("add them to 'labels' (or 'label_remap') in dataset.json" if spec.name == CUSTOM
               else "fix the file (pre-processing maps the stored values, see data/README.md)")
        raise ValueError(
            f"{path}: label values {outside} are outside the {spec.name} label map "
            f"(allowed stored values {allowed}); {fix}"
        )
    if spec.label_remap:
        lut = np.zeros(max(allowed) + 1, dtype=np.uint16)
        for stored, label_id in spec.label_remap.items():
            lut[stored] = label_id
        label = lut[label]
        label = label.astype(np.uint8) if max(spec.label_names) < 256 else label
    return label


def model_image_size(spec: DatasetSpec, image_size: int | None) -> int:
    """The in-plane size ``S`` the model sees: the ``image_size`` config key, or the dataset's native size."""
    if image_size is None:
        return spec.image_size
    if not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size: expected None (the dataset's {spec.image_size} px) or an integer >= 16, "
                         f"got {image_size!r}")
    return int(image_size)


def read_scan_image(spec: DatasetSpec, path: Path, check_size: bool = True) -> tuple[np.ndarray, sitk.Image]:
    """Read an image volume: z-scored float32 (Z x H x W) on its native grid, and its SimpleITK image.

    Args:
        check_size: require the dataset's in-plane size (``image_size=None``: the model sees the
            native grid); False when the slices are resampled to ``image_size`` afterwards.
    """
    raw, image = read_volume(path)
    if check_size and (raw.shape[1] != spec.image_size or raw.shape[2] != spec.image_size):
        raise ValueError(
            f"{path}: expected in-plane size {spec.image_size} x {spec.image_size} for dataset "
            f"{spec.name}, got {raw.shape[1]} x {raw.shape[2]}; set the config key image_size=<S> to "
            "resample every slice on load, or resample/crop the files (data/README.md)"
            + (" or set image_size in dataset.json" if spec.name == CUSTOM else "")
        )
    return zscore(raw, path), image


def read_supervoxels(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a supervoxel volume (ids, 0 = background) of the image's shape."""
    raw, _ = read_volume(path)
    if raw.shape != tuple(shape):
        raise ValueError(
            f"{path}: supervoxel shape {raw.shape} does not match its image's {tuple(shape)}; "
            "re-make the supervoxels from these images"
        )
    return _compact_int(raw, path, "supervoxel ids")


@dataclass
class Scan:
    """One loaded scan.

    Attributes:
        scan_id: numeric id from the file name.
        image: float32 (Z x H x W), per-volume z-scored.
        label: int64 (Z x H x W), dataset label ids (0 background).
        reference: the SimpleITK image it was read from: spacing, origin and direction of the grid
            of ``image``/``label`` (use ``CopyInformation`` to write predictions in place).
    """

    scan_id: int
    image: np.ndarray
    label: np.ndarray
    reference: sitk.Image


def load_scan(spec: DatasetSpec, files: ScanFiles, check_size: bool = True) -> Scan:
    """Read, check and normalise one scan on its native grid (image z-scored float32, label int64);
    ``check_size`` as in :func:`read_scan_image`."""
    image, reference = read_scan_image(spec, files.image, check_size)
    label = read_label(spec, files.label, image.shape).astype(np.int64)
    return Scan(files.scan_id, image, label, reference)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join([*DATASETS, CUSTOM])}")
    parser.add_argument("--data-dir", required=True, help="image folder, or a root holding <DATASET>/<folder>")
    parser.add_argument("--folds", action="store_true", help="print the scan ids of every fold")
    parser.add_argument("--check", action="store_true",
                        help="read every scan (and its supervoxels, if found) and report problems")
    parser.add_argument("--supervoxel-dir", default=None, help="supervoxel folder (default: looked up)")
    args = parser.parse_args(argv)

    spec = get_dataset(args.dataset, args.data_dir)
    image_dir = resolve_image_dir(spec, args.data_dir)
    scans = discover_scans(image_dir)
    ids = [s.scan_id for s in scans]
    print(f"dataset {spec.name} ({spec.modality}, {spec.image_size} px): {len(ids)} scans in {image_dir}")
    print(f"labels: {dict(spec.label_names)}; test labels: {list(spec.test_labels)}")
    if args.folds:
        for fold in range(len(spec.folds)):
            members = fold_scan_ids(spec, ids, fold)
            positions = fold_positions(spec, len(ids), fold)
            print(f"fold {fold}: positions {positions} -> scan ids {members} "
                  f"(support supp_idx=k is the k-th); train on the other {len(ids) - len(members)}")
    if args.check:
        check_scans(spec, image_dir, args.supervoxel_dir)


def check_scans(spec: DatasetSpec, image_dir: Path, supervoxel_dir: str | Path | None = None) -> None:
    """Read every scan of ``image_dir`` with the loaders' checks and print one line per scan.

    Raises the first loader error (file, problem and fix) if a scan does not load.
    """
    try:
        sv_dir = find_supervoxel_dir(image_dir, spec.n_sv, supervoxel_dir)
    except FileNotFoundError as err:
        sv_dir = None
        print(f"supervoxels: none ({err})")
    scans = discover_scans(image_dir, sv_dir)
    for files in scans:
        scan = load_scan(spec, files)
        classes = [int(c) for c in present_values(scan.label) if c]
        line = f"scan {scan.scan_id}: {scan.image.shape[0]} slices, classes {classes}"
        if files.supervoxel is not None:
            n_sv = int((present_values(read_supervoxels(files.supervoxel, scan.image.shape)) > 0).sum())
            line += f", {n_sv} supervoxels"
        print(line)
    print(f"ok: {len(scans)} scans load" + (f" with supervoxels from {sv_dir}" if sv_dir else ""))


if __name__ == "__main__":
    main()
