"""The README's first command as a new user meets it: ``bash scripts/demo.sh`` (embedded phantoms) in
a fresh clone of this repository's HEAD, ``--runs`` times, each in its own new clone.

    python bench/demo.py                          # 2 fresh clones under ../runs/demo_bench
    python bench/demo.py --runs 3 --dir /tmp/demo_bench

Each run's numbers come from the ``demo.json`` the script writes (Dice table, seconds of the whole
job, of training and of the QAMP test, load average before and after); the set-up (a new ``.venv``,
the pinned requirements, the Cython kernel) is part of a fresh clone's time and of ``total``.
Reported: every run, the median of each time and of each mean Dice, and the spread. The demo uses
every core: run this with the machine to itself. Prints one JSON line and writes
``bench/results/demo.json`` (``--out``); clones are never re-used or overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit, machine  # noqa: E402


def fresh_clone(root: Path, index: int) -> Path:
    """A new clone of REPO's HEAD in ``root``; refuses to re-use a folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    clone = root / f"clone_{stamp}_{index}"
    if clone.exists():
        raise SystemExit(f"{clone} exists: give another --dir")
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    return clone


def run_demo(clone: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "DATA_DIR", "VIRTUAL_ENV"))}
    log = clone / "demo.log"
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"bash scripts/demo.sh failed in {clone} with exit code {done.returncode}; see {log}")
    (record,) = sorted(clone.glob("runs/demo/*/demo.json"))
    result = json.loads(record.read_text(encoding="utf-8"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            encoding="utf-8", check=True).stdout.strip()
    return {"clone": str(clone), "commit": commit, **result}


def median_and_spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "spread": [min(values), max(values)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="fresh clones to run (median reported)")
    parser.add_argument("--dir", default=str(REPO.parent / "runs" / "demo_bench"), help="where the clones go")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "demo.json"))
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    runs = [run_demo(fresh_clone(root, i)) for i in range(args.runs)]
    times = {key: median_and_spread([r["times_s"][key] for r in runs]) for key in runs[0]["times_s"]}
    dice = {method: median_and_spread([r["dice_percent"][method]["mean"] for r in runs])
            for method in runs[0]["dice_percent"]}
    result = {"bench": "demo", "command": "bash scripts/demo.sh (fresh clone)", "runs": runs,
              "times_s": times, "mean_dice_percent": dice}
    return emit({**result, **machine()}, args.out)


if __name__ == "__main__":
    main()
