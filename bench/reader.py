"""Reader cost: the checked image reader (``utils.io.read_volume``) against a plain ITK read.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reader.py [--data-dir DIR (default $QAMP_DATA_ROOT)] [--runs 5]

Reads the 20 CHAOST2 scans (image and label, 40 ``.nii.gz`` files) once per pass with
- ``plain``: what the project read before the integrity checks (``sitk.ReadImage`` +
  ``GetArrayFromImage`` + dimension check: no truncation, corruption or NaN detection);
- ``checked``: :func:`utils.io.read_volume` (same, plus the CRC-32 / length proof against the gzip
  trailer and the finite-voxel check).
Passes alternate (plain, checked, plain, ...) after one warm-up pass of each, so page cache and
machine load hit both alike. Reports per reader the median, min and max wall seconds per pass over
``--runs`` passes, CPU seconds, the ratio of medians (target <= 1.10) and ``/proc/loadavg`` before
and after. Prints one JSON line and writes ``bench/results/reader.json`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import SimpleITK as sitk  # noqa: E402

from bench.report import add_data_dir  # noqa: E402
from utils.io import read_volume, write_json  # noqa: E402


def plain_read(path: Path):
    """The reader before the integrity checks (utils/io.py at commit 7f65f75)."""
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: not 3D")
    return sitk.GetArrayFromImage(image), image


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text(encoding="utf-8").strip()
    except OSError:
        return "unavailable"


def one_pass(reader, files: list[Path]) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    for path in files:
        reader(path)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir(parser)
    parser.add_argument("--runs", type=int, default=5, help="timed passes per reader (>= 3)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reader.json"))
    args = parser.parse_args()
    if args.runs < 3:
        parser.error(f"--runs: expected >= 3, got {args.runs}")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    folder = Path(args.data_dir) / "CHAOST2" / "chaos_MR_T2_normalized"
    files = sorted(folder.glob("image_*.nii.gz")) + sorted(folder.glob("label_*.nii.gz"))
    if len(files) != 40:
        raise SystemExit(f"expected 40 CHAOST2 files in {folder}, got {len(files)}")
    readers = {"plain": plain_read, "checked": read_volume}
    loadavg_before = load_average()
    for reader in readers.values():  # warm-up: page cache, imports
        one_pass(reader, files)
    wall: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.runs):
        for name, reader in readers.items():
            w, c = one_pass(reader, files)
            wall[name].append(w)
            cpu[name].append(c)
    stats = {name: {"median_s": round(statistics.median(wall[name]), 4),
                    "min_s": round(min(wall[name]), 4), "max_s": round(max(wall[name]), 4),
                    "cpu_median_s": round(statistics.median(cpu[name]), 4),
                    "runs_s": [round(w, 4) for w in wall[name]]} for name in readers}
    result = {
        "bench": "reader",
        "dataset": "CHAOST2",
        "files": len(files),
        "mb_compressed": round(sum(p.stat().st_size for p in files) / 1e6, 1),
        "runs": args.runs,
        **stats,
        "ratio_median": round(stats["checked"]["median_s"] / stats["plain"]["median_s"], 4),
        "ratio_cpu_median": round(stats["checked"]["cpu_median_s"] / stats["plain"]["cpu_median_s"], 4),
        "ratio_target": 1.10,
        "loadavg_before": loadavg_before,
        "loadavg_after": load_average(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "simpleitk": sitk.Version_VersionString(),
        "cpu": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
