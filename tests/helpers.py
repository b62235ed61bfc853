"""What several test files share: tiny synthetic data and configs, the Sacred experiment with both
commands, and programs' ``--help`` text (no external data needed).

- 32 x 32 phantoms with folder supervoxels (``make_phantoms``; 5 scans, one per fold) and Sacred
  overrides ``TINY_ARGS`` for the command-line tests (sweep, torchrun, amp).
- 48 x 48 phantoms seen at ``image_size`` 32 (``make_phantoms48``; 5 scans, supervoxels generated
  on load) and ``tiny_train_config``: the one short training run that the predict, snapshot-config
  and image-size tests share (``tiny_run`` in conftest.py).

A ResNet-50 QAMP with few prototypes (``TINY_HEAD``): a training step takes a fraction of a second
on one CPU thread.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import runpy
import sys
import warnings
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
N_SCANS = 5
NATIVE = 48  # in-plane size of make_phantoms48 on disk; the model sees SIZE
TINY_HEAD = {"n_mlp_fg": 8, "n_keep_fg": 4, "n_query_fg": 4, "n_edge": 4, "n_mlp_bg": 16, "n_keep_bg": 8,
             "n_query_bg": 4, "feature_dim": 64}
# Sacred overrides of a CPU-sized run (KEY=VALUE strings, as on the command line).
TINY_ARGS = ["dataset=custom", "backbone=resnet50", "pretrained_weights=none", "device=cpu", "num_workers=0",
             "min_size=4", *(f"{k}={v}" for k, v in TINY_HEAD.items()), "test_label=[1]", "n_overlay_slices=0",
             "test_batch_size=8", "print_interval=1", "keep_freed_memory=False"]


def tiny_config(data_dir: Path, log_dir: Path, **updates) -> dict:
    """``TINY_ARGS`` as a config dict for ``ex.run``."""
    config: dict = {}
    for arg in TINY_ARGS:
        key, value = arg.split("=", 1)
        config[key] = json.loads(value) if value[:1] in "[0123456789" else (
            False if value == "False" else value)
    config.update({"data_dir": str(data_dir), "path": {"log_dir": str(log_dir)}})
    config.update(updates)
    return config


def config_with(**keys) -> dict:
    """config.py's defaults (its config function, as Sacred runs it) with ``keys`` given."""
    from config import cfg

    return dict(cfg(fixed=keys))


def train_dataset(dataset: str, data_dir: Path, eval_fold: int | None, *, scan_ids=None, exclude_scan_ids=(),
                  **keys):
    """A ``TrainDataset`` as train.py builds it: config.py's defaults with ``keys``, resolved once."""
    from dataloaders.resolved import resolve_dataset
    from dataloaders.train_dataset import EpisodeKeys, TrainDataset

    config = config_with(dataset=dataset, data_dir=str(data_dir), eval_fold=eval_fold, **keys)
    return TrainDataset(resolve_dataset(config, training=True), EpisodeKeys.from_config(config), eval_fold,
                        scan_ids=scan_ids, exclude_scan_ids=exclude_scan_ids)


def eval_dataset(dataset: str, data_dir: Path, eval_fold: int, supp_idx: int, *, scan_ids=None, **keys):
    """An ``EvalDataset`` as test.py builds it: config.py's defaults with ``keys``, resolved once."""
    from dataloaders.eval_dataset import EvalDataset, ProtocolKeys
    from dataloaders.resolved import resolve_dataset

    config = config_with(dataset=dataset, data_dir=str(data_dir), eval_fold=eval_fold, supp_idx=supp_idx, **keys)
    return EvalDataset(resolve_dataset(config, training=False), ProtocolKeys.from_config(config), eval_fold,
                       supp_idx, scan_ids=scan_ids)


def make_phantoms(root: Path) -> Path:
    """32 x 32 phantoms + supervoxels in ``root`` (created; reused when complete). Returns the data folder."""
    from data import synthetic
    from data.supervoxels.generate_supervoxels import generate_supervoxels

    root = Path(root)
    if (root / "dataset.json").is_file() and any(root.glob("supervoxels_*/superpix-MIDDLE_*.nii.gz")):
        return root
    synthetic.generate(root, n_scans=N_SCANS, seed=3, size=SIZE, progress=False)
    n_sv = json.loads((root / "dataset.json").read_text())["n_sv"]
    generate_supervoxels(root, "image_*.nii.gz", n_sv, root / f"supervoxels_{n_sv}", 1, False)
    return root


def make_phantoms48(root: Path) -> Path:
    """48 x 48 phantoms (5 scans, seed 3; fold 0 = scan 1, training on 2-5) in ``root``."""
    from data import synthetic

    synthetic.generate(root, n_scans=N_SCANS, seed=3, size=NATIVE, progress=False)
    return Path(root)


def tiny_train_config(data_dir: Path, log_dir: Path, **updates) -> dict:
    """The shared training run on ``make_phantoms48``: 4 steps at image_size 32 with supervoxels
    generated on load, snapshots after steps 2 and 4, lr 0.02 halved every 2 steps, validation
    (classes 1 and 2, scans 4 and 5) after steps 2 and 4. ``updates`` also make test-run configs."""
    config = {"dataset": "custom", "data_dir": str(data_dir), "backbone": "resnet50", "pretrained_weights": "none",
              "device": "cpu", "num_workers": 0, "min_size": 20, "n_steps": 4, "save_snapshot_every": 2,
              "print_interval": 2, "max_iters_per_load": 2, "lr_step_gamma": 0.5, "image_size": SIZE,
              "supervoxel_source": "generate", "val_interval": 2, "test_label": [1, 2], "n_overlay_slices": 0,
              "test_batch_size": 8, "optim.lr": 0.02, "path": {"log_dir": str(log_dir)}, **TINY_HEAD}
    config.update(updates)
    return config


def load_test_script() -> ModuleType:
    """``test.py`` as module ``qamp_test_script`` (registering the 'test' command).

    Loaded by path: its name clashes with the standard library's ``test`` package."""
    if "qamp_test_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("qamp_test_script", REPO / "test.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["qamp_test_script"]


def experiment():
    """The Sacred experiment with both commands registered ('train' and 'test')."""
    from config import ex
    import train  # noqa: F401  (registers 'train')

    load_test_script()
    return ex


@functools.lru_cache(maxsize=None)
def cli_help(*program: str) -> str:
    """What ``python PROGRAM --help`` prints, run in this process (``runpy``, with ``sys.argv`` as
    the command line sets it), so the test pays no interpreter start-up. ``program`` is
    ``("-m", "pkg.module")``, ``("-m", "pkg", "subcommand")`` or ``("script.py",)``."""
    if program[0] == "-m":
        module, rest = program[1], list(program[2:])
        run = functools.partial(runpy.run_module, module, run_name="__main__", alter_sys=True)
    else:
        module, rest = None, list(program[1:])
        run = functools.partial(runpy.run_path, str(REPO / program[0]), run_name="__main__")
    argv, out = sys.argv, io.StringIO()
    sys.argv = [module or program[0], *rest, "--help"]
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            run()
    except SystemExit as stop:
        assert stop.code in (0, None), f"{' '.join(program)} --help exited with {stop.code}"
    finally:
        sys.argv = argv
    return out.getvalue()
