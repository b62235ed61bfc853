"""Command-line tools around runs: ``python -m tools.sweep`` (resumable grids of train + test
cells, locally or on SLURM) and ``python -m tools.summarize`` (per-organ Dice tables of test runs)."""
