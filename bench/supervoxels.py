"""Benchmark of the supervoxel generator on the real data.

    .venv/bin/python bench/supervoxels.py [--chaos-ids 1 2 ...] [--sabs-ids 0 1 ...]
        [--skip-workers] [--skip-sabs] [--workers 2] [--edge-order reference]

Parts (outputs go to a temporary folder, never next to the data):
1. every CHAOS scan, one after the other in this process (single-threaded): per-scan seconds
   (read + compute + write; wall and CPU), peak RSS, adjusted Rand index against the published
   ``supervoxels_5000`` files and how many are bit for bit identical;
2. all CHAOS scans again with ``--workers N`` (wall time of the whole command);
3. all SABS CT scans with ``--workers N`` and n_sv 5000 (wall time, per-scan compute seconds,
   peak RSS of the largest worker).

Prints one JSON line and writes ``bench/results/supervoxels.json``. On a shared machine the times
are pessimistic; the load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from bench.report import add_data_dir  # noqa: E402
from data.supervoxels import generate_supervoxels as gen  # noqa: E402
from utils.io import read_volume, write_json  # noqa: E402

N_SV = 5000
TARGETS = {
    "chaos_per_scan_seconds_one_core": 4.5,
    "chaos_all_seconds_workers_2": 60,
    "sabs_all_seconds_workers_2": 300,
    "peak_rss_mb_per_worker": 4096,
    "ari_vs_published_min": 0.95,
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def link_subset(src: Path, ids: list[str] | None, folder: Path) -> Path:
    """A folder of links to the chosen ``image_<id>.nii.gz`` of ``src`` (all when ids is None)."""
    folder.mkdir(parents=True)
    for sid, path in gen.find_scans(src):
        if ids is None or sid in ids:
            (folder / path.name).symlink_to(path)
    return folder


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def bench_chaos_one_core(chaos_dir: Path, published_dir: Path, ids, order, tmp: Path) -> dict:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    rows = []
    for sid, path in gen.find_scans(chaos_dir):
        if ids is not None and sid not in ids:
            continue
        task = gen.ScanTask(sid, path, tmp / gen.OUTPUT_TEMPLATE.format(sid), N_SV,
                            gen.DEFAULT_SCALE, gen.DEFAULT_FG_THRESHOLD, order)
        wall, cpu = time.perf_counter(), time.process_time()
        row = gen.process_scan(task)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ours, _ = read_volume(task.out)
        published, _ = read_volume(published_dir / gen.OUTPUT_TEMPLATE.format(sid))
        rows.append({"id": sid, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                     "compute_seconds": row["seconds"], "n_ids": row["n_ids"],
                     "ari": round(gen.adjusted_rand_index(ours, published), 6),
                     "identical": bool(np.array_equal(ours, published))})
        print(f"chaos {sid}: {wall:.2f} s wall, {cpu:.2f} s cpu, ARI {rows[-1]['ari']:.4f}",
              file=sys.stderr, flush=True)
    aris = [r["ari"] for r in rows]
    return {
        "n_scans": len(rows),
        "per_scan_seconds_median": round(statistics.median(r["seconds"] for r in rows), 3),
        "per_scan_seconds_max": max(r["seconds"] for r in rows),
        "per_scan_cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in rows), 3),
        "compute_seconds_median": round(statistics.median(r["compute_seconds"] for r in rows), 3),
        "peak_rss_mb": round(peak_rss_mb(resource.RUSAGE_SELF), 1),  # whole bench process
        "ari_min": min(aris),
        "ari_median": statistics.median(aris),
        "identical_to_published": f"{sum(r['identical'] for r in rows)}/{len(rows)}",
        "per_scan": rows,
    }


def bench_workers(data_dir: Path, workers: int, order: str, out: Path) -> dict:
    start = time.perf_counter()
    summary = gen.generate_supervoxels(data_dir, n_sv=N_SV, out_dir=out, workers=workers,
                                       edge_order=order, log=lambda line: None, progress=False)
    wall = time.perf_counter() - start
    compute = [row["seconds"] for row in summary["scans"]]
    cpu = [row["cpu_seconds"] for row in summary["scans"]]
    n_ids = [row["n_ids"] for row in summary["scans"]]
    return {
        "workers": workers,
        "n_scans": len(compute),
        "wall_seconds": round(wall, 2),
        "compute_seconds_median": round(statistics.median(compute), 3),
        "compute_seconds_max": max(compute),
        "compute_cpu_seconds_median": round(statistics.median(cpu), 3),
        "compute_cpu_seconds_total": round(sum(cpu), 2),
        # largest reaped child so far; Linux carries the parent's peak into a spawned child, so
        # this is an upper bound when it equals the parent's peak
        "peak_rss_mb_largest_worker": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
        "n_ids_min": min(n_ids),
        "n_ids_max": max(n_ids),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chaos-ids", nargs="*", default=None, help="subset of CHAOS ids")
    parser.add_argument("--sabs-ids", nargs="*", default=None, help="subset of SABS ids")
    parser.add_argument("--skip-workers", action="store_true", help="skip part 2")
    parser.add_argument("--skip-sabs", action="store_true", help="skip part 3")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--edge-order", choices=gen.EDGE_ORDERS, default=gen.DEFAULT_EDGE_ORDER)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "supervoxels.json")
    add_data_dir(parser)
    args = parser.parse_args(argv)

    root = Path(args.data_dir).resolve()
    chaos_dir = root / "CHAOST2" / "chaos_MR_T2_normalized"
    published = root / "CHAOST2" / "supervoxels_5000"
    sabs_dir = root / "SABS" / "sabs_CT_normalized"
    results = {
        "command": "python bench/supervoxels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "load_average_start": [round(x, 2) for x in os.getloadavg()]},
        "n_sv": N_SV,
        "edge_order": args.edge_order,
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="bench_supervoxels_") as tmp:
        tmp = Path(tmp)
        results["chaos_one_core"] = bench_chaos_one_core(
            chaos_dir, published, args.chaos_ids, args.edge_order, tmp / "chaos_one_core")
        if not args.skip_workers:
            subset = link_subset(chaos_dir, args.chaos_ids, tmp / "chaos_subset")
            results["chaos_workers"] = bench_workers(subset, args.workers, args.edge_order,
                                                     tmp / "chaos_workers")
            print(f"chaos, {args.workers} workers: {results['chaos_workers']['wall_seconds']} s",
                  file=sys.stderr, flush=True)
        if not args.skip_sabs:
            subset = link_subset(sabs_dir, args.sabs_ids, tmp / "sabs_subset")
            results["sabs_workers"] = bench_workers(subset, args.workers, args.edge_order,
                                                    tmp / "sabs_workers")
            print(f"sabs, {args.workers} workers: {results['sabs_workers']['wall_seconds']} s",
                  file=sys.stderr, flush=True)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)

    line = {k: v for k, v in results.items() if k not in ("targets", "command")}
    line["chaos_one_core"] = {k: v for k, v in results["chaos_one_core"].items() if k != "per_scan"}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
