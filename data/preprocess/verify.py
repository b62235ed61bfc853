"""Check a pre-processed data folder (ours or a published one) before anything trains on it.

Checks, per scan: the image / label pair exists, both are 3D and on the same grid (size, spacing,
origin, direction), label values are integers from the data set's label set, the label is not
empty, the image is not constant, the in-plane size / spacing / orientation are what the data set
expects, and (when the folder has our ``manifest.json``) the files' sha256 and shapes match it.
Across scans: the scan count, the orientations (several in one folder is a warning, not a failure:
the loaders slice every scan along its stored last axis, see :func:`_orientation_check`), and every
``classmap_<min_tp>.json`` (class names, scan ids, slice indices) recomputed from the labels.

Classmap rule: folders we write use the pixel-count rule (slice listed when at least ``min_tp``
pixels have the class); the published SSL-ALPNet folders use the legacy rule (class present in the
slice and the *sum of label values* of the slice at least ``min_tp``), where the label values are
the ones the loaders use: after the dataset's ``label_remap`` (CMR stores 200 / 500 / 600, the
loaders and the published ``classmap_*.json`` use 1 / 2 / 3). A folder without our manifest passes
when one rule reproduces every list exactly; the table says which.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from data.preprocess.common import (CLASSMAP_RULE, DATASETS, MANIFEST_NAME, PIXEL_COUNTS_NAME, DatasetSpec,
                                    orientation_code, sha256_file)
from data.registry import CUSTOM_SPEC_FILE, read_custom_json
from utils.io import grid_differences, read_volume

SPACING_TOLERANCE = 1e-3  # mm, against the data set's expected spacing
_IMAGE_RE = re.compile(r"^image_(\d+)\.nii\.gz$")
_LABEL_RE = re.compile(r"^label_(\d+)\.nii\.gz$")
_CLASSMAP_RE = re.compile(r"^classmap_(\d+)\.json$")
LEGACY_CLASSMAP_RULE = "legacy_label_sum"


@dataclasses.dataclass
class ScanRow:
    scan_id: int
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    orientation: str = "?"
    label_values: list[int] = dataclasses.field(default_factory=list)
    foreground_voxels: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but worth reading (printed as "warn")


@dataclasses.dataclass
class VerifyReport:
    folder: Path
    dataset: str
    rows: list[ScanRow]
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and all(not r.problems for r in self.rows)

    @property
    def failures(self) -> list[str]:
        out = [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]
        out += [f"scan {r.scan_id}: {p}" for r in self.rows for p in r.problems]
        return out


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}. Re-create the folder with "
                         f"`python -m data.preprocess ...`") from None


def _resolve_spec(folder: Path, dataset: str | DatasetSpec | None,
                  manifest: Mapping | None) -> DatasetSpec | None:
    """The expectations: an explicit spec / data set name, else the manifest's, else by folder name."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    if dataset is not None:
        if dataset not in DATASETS:
            raise ValueError(f"--dataset: expected one of {sorted(DATASETS)}, got {dataset!r}")
        return DATASETS[dataset]
    if manifest is not None:
        names = {int(k): v for k, v in manifest.get("class_names", {}).items()}
        expected = manifest.get("expected", {})
        spacing = tuple(expected.get("spacing_xyz") or (None, None, None))
        return DatasetSpec(str(manifest.get("dataset")), folder.name, classmap_names=names,
                           image_size=expected.get("inplane_size"), spacing=spacing,
                           orientation=expected.get("orientation"), n_scans=None)
    for spec in DATASETS.values():
        if folder.name == spec.folder:
            return spec
    return None


def per_slice_counts(label: np.ndarray) -> np.ndarray:
    """``counts[z, v]`` = number of pixels of value ``v`` in slice ``z`` (non-negative int labels)."""
    n_z = label.shape[0]
    n_values = int(label.max()) + 1 if label.size else 1
    flat = (np.arange(n_z, dtype=np.int64)[:, None] * n_values + label.reshape(n_z, -1)).ravel()
    return np.bincount(flat, minlength=n_z * n_values).reshape(n_z, n_values)


def _column(counts: np.ndarray, value: int) -> np.ndarray:
    return counts[:, value] if 0 <= value < counts.shape[1] else np.zeros(counts.shape[0], np.int64)


def verify_folder(folder: str | Path, dataset: str | DatasetSpec | None = None) -> VerifyReport:
    """Run every check on ``folder``; never raises for a bad scan (it becomes a failed row).

    Args:
        folder: a ``<name>_normalized`` folder (``image_<id>.nii.gz``, ``label_<id>.nii.gz``, ...).
        dataset: a name from ``DATASETS`` (or a spec) to check against; default: the expectations
            recorded in the folder's manifest, else the data set whose default folder name
            matches, else generic checks only.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"verify: folder not found: {folder}")
    manifest_path = folder / MANIFEST_NAME
    manifest = _load_json(manifest_path) if manifest_path.is_file() else None
    spec = _resolve_spec(folder, dataset, manifest)
    checks, image_ids, label_ids = _check_files(folder, spec, manifest)
    records = {int(s["id"]): s for s in manifest["scans"]} if manifest is not None else {}

    rows: list[ScanRow] = []
    stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # scan -> (counts[z, value], slice sums)
    for scan_id in sorted(set(image_ids) & set(label_ids)):
        row, scan_stats = _check_scan(folder, scan_id, spec, records.get(scan_id))
        rows.append(row)
        if scan_stats is not None:
            stats[scan_id] = scan_stats

    checks.append(_orientation_check(rows))
    checks.extend(_check_classmaps(folder, spec, manifest, stats, loader_label_remap(folder, spec)))
    return VerifyReport(folder, spec.name if spec else "generic", rows, checks)


def _check_files(folder: Path, spec: DatasetSpec | None,
                 manifest: Mapping | None) -> tuple[list[Check], list[int], list[int]]:
    """Folder-level checks of the file names: image/label pairs, scan count, manifest ids.

    Returns:
        ``(checks, image ids, label ids)``.
    """
    checks: list[Check] = []
    names = [p.name for p in folder.iterdir()]
    image_ids = sorted(int(m.group(1)) for n in names if (m := _IMAGE_RE.match(n)))
    label_ids = sorted(int(m.group(1)) for n in names if (m := _LABEL_RE.match(n)))
    ok = image_ids == label_ids and bool(image_ids)
    checks.append(Check("image/label pairs", ok,
                        f"{len(image_ids)} images, {len(label_ids)} labels" + (
                            "" if ok else f"; unpaired ids {sorted(set(image_ids) ^ set(label_ids))}"
                            if image_ids or label_ids else "; no image_<id>.nii.gz files")))
    expected_n = (manifest.get("n_scans") if manifest is not None
                  else spec.n_scans if spec is not None else None)
    if expected_n is not None:
        checks.append(Check("scan count", len(image_ids) == expected_n,
                            f"expected {expected_n} ({'manifest' if manifest else spec.name}), "
                            f"got {len(image_ids)}"))
    if manifest is not None:
        records = {int(s["id"]): s for s in manifest["scans"]}
        checks.append(Check("manifest ids", sorted(records) == image_ids,
                            f"manifest lists {sorted(records)}, folder holds {image_ids}"))
    return checks, image_ids, label_ids


def _check_scan(folder: Path, scan_id: int, spec: DatasetSpec | None, rec: Mapping | None
                ) -> tuple[ScanRow, tuple[np.ndarray, np.ndarray] | None]:
    """Every per-scan check of one image / label pair (``rec``: its manifest record, if any).

    Returns:
        ``(row, (counts[z, value], slice sums))``; the statistics are None when the files cannot be read.
    """
    row = ScanRow(scan_id)
    allowed = set(spec.class_names) if spec is not None else None
    image_path, label_path = folder / f"image_{scan_id}.nii.gz", folder / f"label_{scan_id}.nii.gz"
    try:
        image_array, image = read_volume(image_path)
        label_array, label = read_volume(label_path)
    except (FileNotFoundError, ValueError) as err:
        row.problems.append(str(err))
        return row, None
    row.shape = tuple(image_array.shape)
    row.spacing = tuple(round(s, 4) for s in image.GetSpacing())
    row.orientation = orientation_code(image.GetDirection())
    differ = grid_differences(image, label)
    if differ:
        row.problems.append(f"image and label grids differ: {'; '.join(differ)} (image vs label)")
    label_int = np.rint(label_array).astype(np.int64)
    if not np.array_equal(label_int, label_array):
        odd = label_array[label_int != label_array]
        row.problems.append(f"label values must be integers, got e.g. {odd[:5].tolist()}")
    if label_int.min() < 0:
        row.problems.append(f"negative label values, e.g. {int(label_int.min())}")
        label_int = np.clip(label_int, 0, None)
    counts = per_slice_counts(label_int)
    scan_stats = (counts, label_int.reshape(label_int.shape[0], -1).sum(axis=1))
    row.label_values = [int(v) for v in np.flatnonzero(counts.sum(axis=0))]
    if allowed is not None and set(row.label_values) - allowed:
        row.problems.append(f"unexpected label values {sorted(set(row.label_values) - allowed)}; "
                            f"expected a subset of {sorted(allowed)}")
    row.foreground_voxels = int(counts[:, 1:].sum())
    if row.foreground_voxels == 0:
        row.problems.append("empty label (no foreground voxel)")
    if float(image_array.max()) == float(image_array.min()):
        row.problems.append(f"constant image (all voxels {float(image_array.min())})")
    if spec is not None and spec.inplane_size is not None and \
            row.shape[1:] != (spec.inplane_size, spec.inplane_size):
        row.problems.append(f"in-plane size: expected {spec.inplane_size} x {spec.inplane_size}, "
                            f"got {row.shape[1]} x {row.shape[2]}")
    if spec is not None:
        for axis, (want, got) in enumerate(zip(spec.spacing, image.GetSpacing())):
            if want is not None and abs(want - got) > SPACING_TOLERANCE:
                row.problems.append(f"spacing along {'xyz'[axis]}: expected {want}, got {got:.6g}")
        if spec.orientation is not None and row.orientation != spec.orientation:
            row.problems.append(f"orientation: expected {spec.orientation}, got {row.orientation}")
    if rec is not None:
        for kind, path in (("image", image_path), ("label", label_path)):
            if sha256_file(path) != rec[kind]["sha256"]:
                row.problems.append(f"{path.name}: sha256 differs from {MANIFEST_NAME} "
                                    f"(file changed after pre-processing)")
        if list(row.shape) != rec["image"]["shape_zyx"]:
            row.problems.append(f"shape {row.shape} differs from the manifest's "
                                f"{rec['image']['shape_zyx']}")
    return row, scan_stats


def _orientation_check(rows: list[ScanRow]) -> Check:
    """One orientation for all scans: ok; several: a warning saying what the loaders do with them."""
    by_code: dict[str, list[int]] = {}
    for row in rows:
        if row.orientation != "?":
            by_code.setdefault(row.orientation, []).append(row.scan_id)
    if len(by_code) <= 1:
        return Check("orientation", True, f"all scans {next(iter(by_code), '?')}")
    listing = "; ".join(f"{code}: scans {_ranges(ids)}" for code, ids in sorted(by_code.items()))
    return Check(
        "orientation", True,
        f"mixed orientations ({listing}). The loaders do not reorient: each scan is sliced along its "
        f"stored last array axis (Z of Z x Y x X), so these scans are cut along different anatomical "
        f"planes and their slice spacings differ. If that is not intended, pre-process the raw scans "
        f"with `python -m data.preprocess generic ... --orient <CODE>` (SimpleITK's orientation filter "
        f"on the whole image: direction, spacing and axis order follow)", warning=True)


def loader_label_remap(folder: Path, spec: DatasetSpec | None) -> dict[int, int]:
    """Stored label value -> the value the loaders use (``dataloaders.datasets``); {} = identity."""
    if spec is not None and spec.name in DATASETS:
        return dict(DATASETS[spec.name].label_remap)
    if (folder / CUSTOM_SPEC_FILE).is_file():
        try:
            return dict(read_custom_json(folder)["label_remap"])
        except ValueError:
            return {}  # the loaders report a bad dataset.json themselves, naming the fix
    return {}


def _check_classmaps(folder: Path, spec: DatasetSpec | None, manifest: Mapping | None,
                     stats: Mapping[int, tuple[np.ndarray, np.ndarray]],
                     remap: Mapping[int, int] | None = None) -> list[Check]:
    files = sorted((int(m.group(1)), folder / n) for n in (p.name for p in folder.iterdir())
                   if (m := _CLASSMAP_RE.match(n)))
    if not files:
        return [Check("classmaps", False, "no classmap_<min_tp>.json file")]
    class_names = dict(spec.class_names) if spec is not None else None
    checks = []
    ids = {str(i) for i in stats}
    remap = dict(remap or {})
    # per-slice sums of the label values the loaders use (after the remap), from the counts
    loader_sums = {sid: counts @ np.array([remap.get(v, v) for v in range(counts.shape[1])], np.int64)
                   for sid, (counts, _) in stats.items()}
    for min_tp, path in files:
        cmap = _load_json(path)
        problems: list[str] = []
        if class_names is not None and set(cmap) != set(class_names.values()):
            problems.append(f"class names {sorted(cmap)} differ from {sorted(class_names.values())}")
        rules_ok = {CLASSMAP_RULE: True, LEGACY_CLASSMAP_RULE: manifest is None}
        for value, name in (class_names or {}).items():
            per_scan = cmap.get(name, {})
            if set(per_scan) != ids:
                problems.append(f"{name}: scan ids {sorted(per_scan, key=int)} differ from the "
                                f"folder's {sorted(ids, key=int)}")
                continue
            for sid, slices in per_scan.items():
                counts, _ = stats[int(sid)]
                sums = loader_sums[int(sid)]
                column = _column(counts, value)
                if slices != np.flatnonzero(column >= min_tp).tolist():
                    rules_ok[CLASSMAP_RULE] = False
                if slices != np.flatnonzero((column > 0) & (sums >= min_tp)).tolist():
                    rules_ok[LEGACY_CLASSMAP_RULE] = False
        matched = [rule for rule, good in rules_ok.items() if good]
        if not matched and not problems:
            wanted = CLASSMAP_RULE if manifest is not None else f"{CLASSMAP_RULE} or {LEGACY_CLASSMAP_RULE}"
            problems.append(f"slice lists do not follow the {wanted} rule")
        rule = matched[0] if matched else ""
        if rule == LEGACY_CLASSMAP_RULE and remap:
            rule += f" on the loaders' label values (remap {dict(sorted(remap.items()))})"
        checks.append(Check(path.name, not problems, "; ".join(problems) if problems else f"rule {rule}"))
    if manifest is not None and (folder / PIXEL_COUNTS_NAME).is_file() and class_names:
        stored = _load_json(folder / PIXEL_COUNTS_NAME)
        good = all(stored.get(name, {}).get(str(sid)) == _column(counts, value).tolist()
                   for value, name in class_names.items() for sid, (counts, _) in stats.items())
        checks.append(Check(PIXEL_COUNTS_NAME, good,
                            "matches the labels" if good else "differs from the labels"))
    return checks


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> '0-3,5'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts) or "-"


def format_report(report: VerifyReport) -> str:
    """The report as a text table: one row per scan, then the folder-level checks."""
    head = f"{'id':>4}  {'Z x Y x X':<15} {'spacing (x,y,z) mm':<24} {'orient':<6} " \
           f"{'labels':<16} {'fg voxels':>10}  status"
    lines = [f"verify {report.folder}  (data set: {report.dataset})", head, "-" * len(head)]
    for row in report.rows:
        shape = " x ".join(str(s) for s in row.shape) if row.shape else "?"
        spacing = ", ".join(f"{s:g}" for s in row.spacing) if row.spacing else "?"
        status = "ok" if not row.problems else "FAIL: " + "; ".join(row.problems)
        lines.append(f"{row.scan_id:>4}  {shape:<15} {spacing:<24} {row.orientation:<6} "
                     f"{_ranges(row.label_values):<16} {row.foreground_voxels:>10}  {status}")
    lines.append("")
    for check in report.checks:
        status = "FAIL" if not check.ok else "warn" if check.warning else "ok  "
        lines.append(f"{status}  {check.name}: {check.detail}")
    warnings = sum(c.warning and c.ok for c in report.checks)
    lines.append(f"{'PASS' if report.ok else 'FAIL'}: {len(report.rows)} scans, "
                 f"{len(report.failures)} problem(s)" + (f", {warnings} warning(s)" if warnings else ""))
    return "\n".join(lines)
