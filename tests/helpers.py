"""What several test files share: tiny synthetic data and configs, the Sacred experiment with both
commands, and programs' ``--help`` text (no external data needed).

- 32 x 32 phantoms with folder supervoxels (``make_phantoms``; 5 scans, one per fold) and Sacred
  overrides ``TINY_ARGS`` for the command-line tests (sweep, torchrun, amp).
- 48 x 48 phantoms seen at ``image_size`` 32 (``make_phantoms48``; 5 scans, supervoxels generated
  on load) and ``tiny_train_config``: the one short training run that the predict, snapshot-config
  and image-size tests share (``tiny_run`` in conftest.py); ``for_test`` drops its training-only keys
  for a test.py run.
- ``write_dicom_series``: a volume as a DICOM series written with pydicom (pre-processing and
  bad-input tests); ``write_stored_label``: a label with a dataset's own values (predict tests).

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
    n_sv = json.loads((root / "dataset.json").read_text(encoding="utf-8"))["n_sv"]
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


def for_test(config: dict) -> dict:
    """A training config made a test.py config: without the keys only training reads, which test.py
    refuses (``engine.snapshot_config.TRAINING_ONLY_KEYS``)."""
    from engine.snapshot_config import TRAINING_ONLY_KEYS

    return {key: value for key, value in config.items() if key.split(".")[0] not in TRAINING_ONLY_KEYS}


def write_dicom_series(image, folder: Path, series_uid: str | None = None, stem: str = "IMG-0002-{:05d}",
                       first: int = 1, rescale_slope: float | None = None) -> list[Path]:
    """``image`` (a 3D SimpleITK image, stored as int16) as a DICOM series written with pydicom, one
    file per slice with the tags SimpleITK / GDCM use for geometry; ``rescale_slope``: a Rescale
    Slope tag (readers then return the stored values times the slope)."""
    import numpy as np
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    series_uid, study_uid = series_uid or generate_uid(), generate_uid()
    paths = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "MR", "anon", 2, k + 1
        ds.ImagePositionPatient = [f"{c:.6f}" for c in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{c:.6f}" for c in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if rescale_slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = f"{rescale_slope:g}", "0"
        ds.PixelData = array[k].tobytes()
        path = folder / (stem.format(first + k) + ".dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_stored_label(source: Path, target: Path, values: dict[int, int]) -> Path:
    """The label file ``source`` with class ``c`` stored as ``values[c]`` (others 0), as uint16 on the
    same grid (a dataset's own label values, e.g. MS-CMRSeg's 200 / 500 / 600)."""
    import numpy as np
    import SimpleITK as sitk

    label = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(label)
    stored = np.zeros(array.shape, np.uint16)
    for class_id, value in values.items():
        stored[array == class_id] = value
    image = sitk.GetImageFromArray(stored)
    image.CopyInformation(label)
    sitk.WriteImage(image, str(target), True)
    return target


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
