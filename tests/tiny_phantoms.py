"""Tiny synthetic data and configs shared by test_sweep / test_distributed / test_amp.

32 x 32 phantoms (5 scans: one per fold), their supervoxels, and Sacred overrides for a ResNet-50
QAMP with few prototypes, so that a training step takes a fraction of a second on one CPU thread.
"""
from __future__ import annotations

import json
from pathlib import Path

SIZE = 32
N_SCANS = 5
# Sacred overrides of a CPU-sized run (KEY=VALUE strings, as on the command line).
TINY_ARGS = ["dataset=custom", "backbone=resnet50", "pretrained_weights=none", "device=cpu", "num_workers=0",
             "min_size=4", "n_mlp_fg=8", "n_keep_fg=4", "n_query_fg=4", "n_edge=4", "n_mlp_bg=16",
             "n_keep_bg=8", "n_query_bg=4", "feature_dim=64", "test_label=[1]", "n_overlay_slices=0",
             "test_batch_size=8", "print_interval=1", "keep_freed_memory=False"]


def tiny_config(data_dir: Path, log_dir: Path, **updates) -> dict:
    """The same overrides as a config dict for ``ex.run``."""
    config: dict = {}
    for arg in TINY_ARGS:
        key, value = arg.split("=", 1)
        config[key] = json.loads(value) if value[:1] in "[0123456789" else (
            False if value == "False" else value)
    config.update({"data_dir": str(data_dir), "path": {"log_dir": str(log_dir)}})
    config.update(updates)
    return config


def make_phantoms(root: Path) -> Path:
    """Phantoms + supervoxels in ``root`` (created; reused when complete). Returns the data folder."""
    from data import synthetic
    from data.supervoxels.generate_supervoxels import generate_supervoxels

    root = Path(root)
    if (root / "dataset.json").is_file() and any(root.glob("supervoxels_*/superpix-MIDDLE_*.nii.gz")):
        return root
    synthetic.generate(root, n_scans=N_SCANS, seed=3, size=SIZE, progress=False)
    n_sv = json.loads((root / "dataset.json").read_text())["n_sv"]
    generate_supervoxels(root, "image_*.nii.gz", n_sv, root / f"supervoxels_{n_sv}", 1, False)
    return root
