"""Loader speed: seconds to load a training set, and episodes per second with augmentation.

    .venv/bin/python bench/loader.py [--data-dir DIR (default $QAMP_DATA_ROOT)] [--episodes 500]

Measures, on CHAOST2 with the published supervoxels:
- ``load_s``: seconds for :class:`TrainDataset` to read, check, z-score and index all 20 scans with
  their supervoxels (``eval_fold=None``: no test fold), wall clock and CPU time (``load_cpu_s``,
  all threads, less sensitive to other jobs on the machine);
- ``episodes_per_s``: episodes per second in one process (the work of one DataLoader worker),
  augmentation on, per wall-clock second and per CPU second.
Prints one JSON line and writes ``bench/results/loader.json`` (atomically).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from config import cfg  # noqa: E402
from dataloaders.resolved import resolve_dataset  # noqa: E402
from dataloaders.train_dataset import EpisodeKeys, TrainDataset  # noqa: E402
from bench.report import add_data_dir, emit, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir(parser)
    parser.add_argument("--episodes", type=int, default=500, help="episodes timed")
    parser.add_argument("--num-threads", type=int, default=2, help="threads reading volumes")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loader.json"))
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    torch.set_num_threads(1)  # one worker's worth of compute

    start, start_cpu = time.perf_counter(), time.process_time()
    config = dict(cfg(fixed={"dataset": "CHAOST2", "data_dir": str(data_dir), "augment": True}))
    ds = TrainDataset(resolve_dataset(config, training=True), EpisodeKeys.from_config(config), None,
                      num_threads=args.num_threads)
    load_s, load_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    n_scans = len(ds.scans)
    ds.episode(0)  # warm-up
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(1, args.episodes + 1):
        ds.episode(step)
    episodes_per_s = args.episodes / (time.perf_counter() - start)
    episodes_per_cpu_s = args.episodes / (time.process_time() - start_cpu)

    result = {
        "bench": "loader",
        "dataset": "CHAOST2",
        "load_scans": n_scans,
        "load_s": round(load_s, 3),
        "load_cpu_s": round(load_cpu_s, 3),
        "load_target_s": 5.0,
        "episodes": args.episodes,
        "episodes_per_s": round(episodes_per_s, 1),
        "episodes_per_cpu_s": round(episodes_per_cpu_s, 1),
        "episodes_target_per_s": 20.0,
        "augment": True,
        "num_threads_load": args.num_threads,
        **machine(),
        "note": "wall-clock times are noisy when the CPU is shared (see load_average_1min)",
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
