"""Wall time of the test suite as a user runs it (``bash scripts/test.sh``), with and without the
real data (``QAMP_DATA_ROOT`` pointed at a missing folder), each ``--runs`` times.

    python bench/test_suite.py                 # 2 runs each: with the data, then without
    python bench/test_suite.py --runs 3 --modes nodata

Issue 13's limits on the 2-core development machine: < 3 min without the data, < 5 min with it.
Reported per mode: every run's seconds, the median and the spread, pytest's last line, and the load
average before and after each run (the suite uses every core: run it with the machine to itself).
Prints one JSON line and writes ``bench/results/test_suite.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit, machine  # noqa: E402

LIMITS_S = {"data": 300, "nodata": 180}


def run_suite(mode: str) -> dict:
    env = dict(os.environ)
    if mode == "nodata":
        env["QAMP_DATA_ROOT"] = str(REPO / "no_such_data_folder")
    else:
        env.pop("QAMP_DATA_ROOT", None)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(["bash", "scripts/test.sh"], cwd=REPO, env=env, capture_output=True, encoding="utf-8")
    seconds = time.perf_counter() - start
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        raise SystemExit(f"bash scripts/test.sh ({mode}) failed with exit code {done.returncode}: {last}")
    return {"seconds": round(seconds, 1), "pytest": last.strip("= "), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs per mode (median reported)")
    parser.add_argument("--modes", default="data,nodata", help="data, nodata or both (comma separated)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "test_suite.json"))
    args = parser.parse_args(argv)
    result = {"bench": "test_suite", "command": "bash scripts/test.sh", "runs": args.runs}
    for mode in args.modes.split(","):
        if mode not in LIMITS_S:
            parser.error(f"--modes: {mode!r} is not one of {sorted(LIMITS_S)}")
        runs = [run_suite(mode) for _ in range(args.runs)]
        seconds = [r["seconds"] for r in runs]
        result[mode] = {"runs": runs, "median_s": round(statistics.median(seconds), 1),
                        "spread_s": [min(seconds), max(seconds)], "limit_s": LIMITS_S[mode]}
    return emit({**result, **machine()}, args.out)


if __name__ == "__main__":
    main()
