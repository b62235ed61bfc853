"""Experiment configuration: one Sacred ``Experiment`` shared by ``train.py`` and ``test.py``.

Every key below is read by the pipeline (``train.py`` / ``test.py``), the data loaders or the model
(``models.build_model`` receives the whole flat config). Variants are named configs, not copies::

    python train.py with abd_mri setting2 eval_fold=1
    python test.py  with abd_mri setting2 eval_fold=1 reload_model_path=runs/train_CHAOST2_setting2_fold1

Named configs: datasets ``abd_mri`` (CHAOST2), ``abd_ct`` (SABS, CT thresholds 0.7 / 0.6),
``prostate_mri`` (Prostate_MRI), ``cmr`` (CMR); settings ``setting1`` (test classes may appear in
training slices) and ``setting2`` (training slices holding a test class are removed).

The data: ``data_dir=...`` on the command line, else the environment variable ``QAMP_DATA_ROOT``;
with neither, ``train.py`` and ``test.py`` refuse to start (``print_config`` works without data).
``test.py`` refuses the keys only training reads (``engine.snapshot_config.TRAINING_ONLY_KEYS``) when
they are given on its command line; named configs (e.g. ``cpu_budget``) may set them.

Each run gets its own folder ``<path.log_dir>/<command>_<dataset>_setting<k>_fold<f>`` (test runs
add ``_supp<i>``); an existing folder is never reused: the next free name ``..._2``, ``..._3`` is
taken. The folder holds Sacred's ``config.json``, ``run.json``, ``cout.txt``, ``metrics.json``, the
run's ``logger.log`` and, for training, ``snapshots/`` (see ``train.py``; ``test.py`` for its outputs).
"""
from __future__ import annotations

import logging
from dataclasses import fields
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from sacred import SETTINGS, Experiment
from sacred.config.config_scope import ConfigScope
from sacred.observers import FileStorageObserver
from sacred.utils import apply_backspaces_and_linefeeds, convert_to_nested_dict, iterate_flattened

from data.registry import CUSTOM, DATASETS, dataset_modality
from dataloaders.eval_dataset import EVAL_MODES
from dataloaders.resolved import EXCLUDE_MODES, SUPERVOXEL_SOURCES
from models import BACKBONES, MODEL_KEYS, ModelConfig, check_episode_config
from models import MODEL_READS, MODELS, QNET_KEYS
from models import PRETRAINED_KINDS as PRETRAINED
from models.qamp import prior_thresholds, switched_off_keys
from models.qnet import default_alpha as qnet_default_alpha
from engine.amp import AMP_MODES
from engine.distributed import rank_argv
from engine.observers import install_sql_result_fix
from engine.snapshot_config import TRAINING_ONLY_KEYS

# Capture stdout/stderr through Python (not file descriptors) so that runs started in-process
# (tests, notebooks) are captured too; tqdm's carriage returns are collapsed in cout.txt.
SETTINGS.CAPTURE_MODE = "sys"
install_sql_result_fix()  # Sacred's -s SQL observer: store train/test's dict results (engine/observers.py)

# Choice lists live with the code that implements them; the config adds the test-only baseline.
MODEL_CHOICES = (*MODELS, "copy_support")  # the networks plus the test-only baseline
SETTINGS_ALLOWED = (1, 2)
MODEL_DEFAULTS = ModelConfig()  # the model keys' defaults (models/qamp.py), shown by print_config
DATA_ROOT_ENV = "QAMP_DATA_ROOT"  # data_dir when the command line gives none


class QampExperiment(Experiment):
    """Sacred's ``Experiment`` plus checks of the final config: functions registered with
    :meth:`final_config_check` see the config after the config hooks and the explicit updates, and
    run before the run starts, so a refused run creates no run folder."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.final_config_checks: list = []

    def final_config_check(self, func):
        """Decorator: ``func(config, command_name, explicit)`` raises to refuse the run; ``explicit``:
        the updates given explicitly (``with KEY=VALUE``, ``ex.run(config_updates=...)``) as dotted
        key -> value, not the keys named configs set."""
        self.final_config_checks.append(func)
        return func

    def _create_run(self, command_name=None, config_updates=None, *args, **kwargs):
        run = super()._create_run(command_name, config_updates, *args, **kwargs)
        explicit = dict(iterate_flattened(convert_to_nested_dict(config_updates or {})))
        for check in self.final_config_checks:
            check(run.config, run.meta_info["command"], explicit)
        return run


ex = QampExperiment("QAMP", save_git_info=False)
ex.captured_out_filter = apply_backspaces_and_linefeeds


class _DocumentedConfigScope(ConfigScope):
    """A named config whose docstring documents it without becoming a config entry.

    Sacred runs a config function's body as module code, so a docstring there becomes a
    ``__doc__`` variable: the entry Sacred warns about ("Added new config entry"). The docstring
    stays the scope's ``__doc__`` (``print_named_configs`` shows it); the entry is dropped.
    """

    def __call__(self, fixed=None, preset=None, fallback=None):
        summary = super().__call__(fixed, preset, fallback)
        summary.pop("__doc__", None)
        summary.added.discard("__doc__")
        summary.docs.pop("__doc__", None)
        return summary


def named_config(func) -> ConfigScope:
    """``@ex.named_config`` without the stray ``__doc__`` entry (see :class:`_DocumentedConfigScope`)."""
    ex.named_config(func)
    scope = ex.named_configs[func.__name__] = _DocumentedConfigScope(func)
    return scope


def _make_logger() -> logging.Logger:
    """The experiment's logger: INFO to stderr (Sacred's `_log` is its child; `logger.log` is added
    per run). Own handler and no propagation, so it works the same under pytest or any host app."""
    logger = logging.getLogger("qamp")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s - %(name)s - %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger


ex.logger = _make_logger()


# Straight through: the list of every config key with its default and meaning (Sacred's config scope).
@ex.config
def cfg():
    # ---------------- run ----------------
    seed = 2025  # seeds everything: episodes, prototype sampling, dropout, test generators
    device = "auto"  # 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:<i>'
    deterministic = True  # torch.use_deterministic_algorithms (warn-only): exact resume / repeat
    keep_freed_memory = True  # glibc: reuse freed memory instead of mmap/munmap per step (engine/malloc.py; faster on CPU)
    num_workers = 1  # DataLoader worker processes for training episodes (0 = main process)
    path = {"log_dir": "./runs"}  # run folders are created under log_dir (see module docstring)
    amp = "off"  # mixed precision: 'off' (float32), 'bf16' or 'fp16' (+ GradScaler) on CUDA; encoder only, prior/sampling/losses stay float32 (engine/amp.py)

    # ---------------- data ----------------
    dataset = "CHAOST2"  # 'CHAOST2' (abdominal MRI), 'SABS' (abdominal CT), 'Prostate_MRI', 'CMR', 'custom'
    data_dir = os.environ.get(DATA_ROOT_ENV) or None  # the image folder itself, or a root holding <dataset>/<folder>; None (no QAMP_DATA_ROOT): train / test refuse to start
    supervoxel_dir = None  # folder of superpix-MIDDLE_<id>.nii.gz; None = looked up next to the images (refused with use_gt=True)
    n_sv = None  # supervoxel folder supervoxels_<n_sv>; None = the dataset's (5000; CMR 1000; custom: dataset.json); refused with use_gt=True
    use_gt = False  # train on ground-truth classes (minus test_label) instead of supervoxels
    setting = 1  # 1: test classes may appear in training slices; 2: slices holding them are removed
    test_label = None  # classes to evaluate (and to exclude in setting 2); None = the dataset's standard set
    exclude_label = None  # classes whose slices are removed from training; None = follow `setting`
    exclude_mode = "any"  # remove a slice holding 'any' excluded class (SSL-ALPNet) or 'all' (ADNet)
    eval_fold = 0  # test fold of the 5-fold split (0-4); training uses every scan outside it
    min_size = 200  # minimum class area (pixels) of a training slice pair
    augment = True  # gamma / affine / elastic augmentation of training episodes
    gin_prob = 0.0  # probability per episode slice of a GIN random-network intensity remapping (Ouyang et al. 2022; dataloaders/transforms.py), after the other augmentations; 0 = off (the reference); `pretrain_sabs` sets 1, needs augment=True
    image_size = None  # in-plane size S the model sees; None = the dataset's native size (reference). Otherwise every slice is resampled on load (image bilinear, labels/supervoxels nearest); test Dice stays on the native grid
    supervoxel_source = "folder"  # 'folder': supervoxel_dir's ids (nearest-resampled to image_size); 'generate': 3D Felzenszwalb on the loaded slices at image_size, min size n_sv x pixel ratio (no folder needed; refused with use_gt=True)

    # ---------------- episodes ----------------
    n_shot = 1  # support slices per episode (prototypes are averaged over shots)
    n_way = 1  # classes per episode; only 1 is supported (classes are tested one at a time)
    n_query = 1  # query slices per training episode; only 1 is supported

    # ---------------- model (read by models.build_model) ----------------
    model = "qamp"  # 'qamp', 'adnet' / 'alpnet' / 'qnet' (the authors' ADNet / SSL-ALPNet / Q-Net heads on this encoder, docs/METHOD.md §11-12), 'panet' (PANet, their common ancestor, §13; the pre-training objective of `pretrain_sabs`), 'gmrd' (the authors' GMRD, QAMP's ancestor, §14) or 'copy_support' (test-only baseline)
    backbone = MODEL_DEFAULTS.backbone  # dilated torchvision ResNet: 'resnet101' (reference) or 'resnet50' (cheaper)
    pretrained_weights = "deeplabv3"  # encoder init: 'deeplabv3' (COCO), 'imagenet', 'snapshot' (the whole encoder of a run of this project, any model, same backbone and feature_dim) or 'none'
    pretrained_path = None  # weights file for pretrained_weights (env QAMP_PRETRAINED_PATH overrides, except for 'snapshot'); 'snapshot': a training run folder (its final snapshot) or a snapshot file
    feature_dim = MODEL_DEFAULTS.feature_dim  # channels of the reduced layer3 features
    n_mlp_fg = MODEL_DEFAULTS.n_mlp_fg  # foreground prototypes produced by the MGSP MLP
    n_mlp_bg = MODEL_DEFAULTS.n_mlp_bg  # background prototypes produced by the MGSP MLP
    n_keep_fg = MODEL_DEFAULTS.n_keep_fg  # MLP foreground prototypes kept at random
    n_keep_bg = MODEL_DEFAULTS.n_keep_bg  # MLP background prototypes kept at random
    n_query_fg = MODEL_DEFAULTS.n_query_fg  # PGQP foreground vectors drawn where the prior > tau_fg
    n_query_bg = MODEL_DEFAULTS.n_query_bg  # PGQP background vectors drawn where 1 - prior > tau_bg
    n_edge = MODEL_DEFAULTS.n_edge  # vectors drawn in the inner (fg) / outer (bg) edge band of the support mask
    edge_kernel = MODEL_DEFAULTS.edge_kernel  # side of the square kernel of the edge-band erosion / dilation
    edge_iters = MODEL_DEFAULTS.edge_iters  # erosion / dilation iterations of the edge bands; None = the authors' band width (2 px at 256 px) scaled to image_size: 2 at 256, 1 at 128 and 64 (models/mgsp.py band_iterations)
    tau_fg = prior_thresholds(dataset_modality(dataset, data_dir))[0]  # prior threshold for query foreground samples (CT 0.7, MR 0.5; custom: dataset.json's modality)
    tau_bg = prior_thresholds(dataset_modality(dataset, data_dir))[1]  # threshold on 1 - prior for query background samples (CT 0.6, MR 0.5)
    cos_scaler = MODEL_DEFAULTS.cos_scaler  # scale of the cosine similarity in the QPG prior
    prior_temperature = MODEL_DEFAULTS.prior_temperature  # factor inside the sigmoid of the QPG prior
    dropout = MODEL_DEFAULTS.dropout  # dropout of the MLPs and decoders
    query_loss_weights = list(MODEL_DEFAULTS.query_loss_weights)  # NLL class weights [background, foreground]
    align_weight = MODEL_DEFAULTS.align_weight  # weight of the reverse alignment loss
    proto_weight = MODEL_DEFAULTS.proto_weight  # weight of the prototype consistency loss
    boundary_weight = MODEL_DEFAULTS.boundary_weight  # weight of the boundary F1 loss
    boundary_theta0 = MODEL_DEFAULTS.boundary_theta0  # boundary extraction max-pool size of the boundary loss
    boundary_theta = MODEL_DEFAULTS.boundary_theta  # boundary extension max-pool size of the boundary loss
    fast_mlp = MODEL_DEFAULTS.fast_mlp  # apply the MLP to the 64 x 64 features (equal up to rounding to the reference)
    decoder_winograd = MODEL_DEFAULTS.decoder_winograd  # decoder 3x3 convs by Winograd F(2x2,3x3) on CPU (equal up to rounding; CUDA: cuDNN)
    proto_loss_shots = MODEL_DEFAULTS.proto_loss_shots  # n_shot > 1: prototype-consistency loss 'mean' over shots (ours) or 'sum' (reference)
    empty_support_rule = MODEL_DEFAULTS.empty_support_rule  # n_shot > 1: ADNet fallback when 'any' shot mask is empty (ours) or 'first' (reference)
    use_query_prototypes = MODEL_DEFAULTS.use_query_prototypes  # ablation: False = no PGQP query samples (no n_query_* draws; decoders n_query_* narrower)
    use_edge_samples = MODEL_DEFAULTS.use_edge_samples  # ablation: False = no MGSP edge-band samples (n_edge); the mask and band averages stay
    use_mlp_prototypes = MODEL_DEFAULTS.use_mlp_prototypes  # ablation: False = no MGSP MLPs or learned prototypes (n_mlp_*, n_keep_*)
    use_alignment = MODEL_DEFAULTS.use_alignment  # ablation: False = no reverse pass, no alignment loss (needs use_proto_loss=False)
    use_proto_loss = MODEL_DEFAULTS.use_proto_loss  # ablation: False = no prototype-consistency loss term
    use_boundary_loss = MODEL_DEFAULTS.use_boundary_loss  # ablation: False = no boundary-F1 loss term
    qnet_alpha = qnet_default_alpha(setting)  # model='qnet' only: weight of the layer3 path, layer4 gets 1 - alpha (the authors': 0.9, Setting 2: 0.6)
    qnet_refine_iters = MODEL_DEFAULTS.qnet_refine_iters  # model='qnet' only: test-time prototype refinement, Adam steps per path and slice (0 = off); a test run may change it

    # ---------------- training (train.py; test.py refuses them: TRAINING_ONLY_KEYS) ----------------
    n_steps = 40000  # training episodes (batch 1)
    optim = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}  # SGD
    lr_step_gamma = 0.98  # learning-rate factor applied every max_iters_per_load steps
    max_iters_per_load = 5000  # "epoch" length: step size of the learning-rate schedule
    print_interval = 100  # steps between log lines (mean loss terms over the interval)
    save_snapshot_every = 5000  # steps between full-state snapshots (a final one is always written)
    keep_snapshots = 2  # intermediate snapshots kept on disk (older ones deleted; final kept)
    resume = None  # run folder or snapshot file to continue from (same loss sequence as no break)
    val_interval = 0  # steps between validation scores (per-class Dice on val_scans, the protocol); 0 = off
    collapse_patience = 2  # stop training (error) after this many validations in a row that predict background on every validation query, counted after the first validation that predicted foreground (a slow start is not a collapse); 0 = never (acts with val_interval > 0)
    val_scans = None  # validation scan ids (>= 2, outside the test fold); None = the last 2 training scans. Their labels only score; with use_gt=True they are removed from training. Needs val_interval > 0

    # ---------------- evaluation (test.py) ----------------
    reload_model_path = None  # snapshot file, or a training run folder (its final snapshot)
    supp_idx = 2  # position of the support scan within the test fold
    n_part = 3  # chunks per query volume, each segmented with its own support slice
    eval_mode = "protocol"  # 'protocol' (query slices holding the class) or 'all_slices'
    test_batch_size = 16  # query slices segmented in one batch (same support state)
    n_overlay_slices = 3  # overlay PNGs written per query scan and class (0 = none)


@named_config
def abd_mri():
    """Abdominal MRI: CHAOS T2-SPIR, classes liver / right kidney / left kidney / spleen."""
    dataset = "CHAOST2"


@named_config
def abd_ct():
    """Abdominal CT: Synapse multi-atlas (SABS); the CT prior thresholds 0.7 / 0.6 follow from it."""
    dataset = "SABS"


@named_config
def prostate_mri():
    """Prostate MRI."""
    dataset = "Prostate_MRI"


@named_config
def cmr():
    """Cardiac MRI (MS-CMRSeg bSSFP); supervoxels_1000 by the dataset's default."""
    dataset = "CMR"


@named_config
def cpu_budget():
    """Self-supervised training that learns on a 2-core CPU in about an hour (docs/CONFIG.md,
    "Named configurations").

    64 x 64 slices (native-grid Dice at test), dilated ResNet-50 from scratch, fewer prototypes,
    SGD lr 0.02 with one x0.25 step, validation every 500 steps. Chosen on the validation curve of
    CHAOST2 fold 0 (docs/CPU_BUDGET.md); the reference defaults are untouched without it.
    """
    image_size = 64
    backbone = "resnet50"
    pretrained_weights = "none"
    n_mlp_fg = 40
    n_keep_fg = 20
    n_query_fg = 10
    n_edge = 10
    n_mlp_bg = 120
    n_keep_bg = 100
    n_query_bg = 20
    optim = {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
    n_steps = 6000
    max_iters_per_load = 3000
    lr_step_gamma = 0.25
    val_interval = 500
    print_interval = 100
    save_snapshot_every = 1000


@named_config
def cpu_budget_adnet():
    """With `cpu_budget`: the authors' ADNet head (model='adnet') at its own learning rate, chosen
    like every method's on the validation curve of CHAOST2 fold 0 (bench/results/cpu_budget_lr.md;
    docs/CPU_BUDGET.md): python train.py with abd_mri cpu_budget cpu_budget_adnet

    0.005, the second-best rate at 1500 steps: at the best, 0.02, the 6000-step run fell apart
    (validation 63.1 at step 1500, 14.9 at 3000) as the threshold loss T / 20 drove T to -19.6,
    next to -20, the floor of the anomaly score -20 cos, where nothing is predicted foreground.
    """
    model = "adnet"
    optim = {"lr": 0.005, "momentum": 0.9, "weight_decay": 5e-4}


@named_config
def cpu_budget_alpnet():
    """With `cpu_budget`: SSL-ALPNet (model='alpnet') at its own learning rate, chosen like every
    method's on the validation curve of CHAOST2 fold 0 (bench/results/cpu_budget_lr.md;
    docs/CPU_BUDGET.md): python train.py with abd_mri cpu_budget cpu_budget_alpnet
    """
    model = "alpnet"
    optim = {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}


@named_config
def pretrain_sabs():
    """With `cpu_budget`: the shared encoder of the pre-trained regime (docs/CPU_BUDGET.md): PANet
    episodes (model='panet': masked-average prototypes and a cosine classifier, no head parameters)
    on SABS CT supervoxels generated on load, every slice through a fresh GIN random intensity network
    (gin_prob=1: features of shape rather than of CT contrast); labels never read, no validation. Then every method
    trains on CHAOST2 from its encoder (pretrained_weights='snapshot', pretrained_path=<this run>):
    python train.py with cpu_budget pretrain_sabs
    """
    dataset = "SABS"
    model = "panet"
    supervoxel_source = "generate"
    val_interval = 0
    gin_prob = 1.0


@named_config
def setting1():
    """Setting 1: test classes may appear in training slices (supervoxel pseudo-labels)."""
    setting = 1


@named_config
def setting2():
    """Setting 2: training slices that hold a test class are removed (exclude_label = test_label)."""
    setting = 2


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_writable_dir(path: str | os.PathLike, key: str = "path.log_dir") -> Path:
    """Create ``path`` if needed and prove that files can be written in it.

    Raises:
        ValueError: naming ``key`` when the folder cannot be created or written.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(
            f"{key}={str(path)!r} is not a writable folder ({err.__class__.__name__}: "
            f"{err.strerror or err}); choose another one, e.g. {key}=./runs (LOG_DIR=... in scripts)"
        ) from None
    return folder


def _check_train_combinations(config: Mapping[str, Any]) -> None:
    """Refuse a training key that another key's value makes train.py ignore (no key is accepted and
    then ignored): ``val_scans`` without validation; ``supervoxel_source='generate'``, ``supervoxel_dir``
    or ``n_sv`` with ``use_gt`` (ground-truth classes use no supervoxels; the defaults are allowed)."""
    _expect(config["val_scans"] is None or config["val_interval"] > 0,
            f"val_scans={config['val_scans']!r} is set but val_interval={config['val_interval']!r}: validation is "
            f"off, so no scan is scored; set val_interval>0 (e.g. val_interval=500) or drop val_scans")
    _expect(config["collapse_patience"] == 2 or config["val_interval"] > 0,
            f"collapse_patience={config['collapse_patience']!r} is set but val_interval={config['val_interval']!r}: "
            f"the collapse stop acts on validations; set val_interval>0 or drop collapse_patience")
    _expect(config["supervoxel_source"] == "folder" or not config["use_gt"],
            f"supervoxel_source={config['supervoxel_source']!r} is set but use_gt={config['use_gt']!r}: training on "
            f"ground-truth classes uses no supervoxels; drop supervoxel_source or set use_gt=False")
    _expect(config["gin_prob"] == 0 or config["augment"],
            f"gin_prob={config['gin_prob']!r} is set but augment={config['augment']!r}: GIN is an augmentation "
            f"of training episodes; drop gin_prob or set augment=True")
    for key in ("supervoxel_dir", "n_sv"):  # None: the dataset's, looked up only for supervoxel training
        _expect(config[key] is None or not config["use_gt"],
                f"{key}={config[key]!r} is set but use_gt={config['use_gt']!r}: training on ground-truth classes "
                f"uses no supervoxels; drop {key} or set use_gt=False")


# Straight through: a list of independent checks, one per key or pair of keys, each with its message.
def validate_config(config: Mapping[str, Any], command: str | None = None) -> None:
    """Fail early, with the key and the fix, on values the pipeline cannot run with.

    Args:
        config: the flat Sacred config.
        command: 'train', 'test' or None (command-specific checks are skipped).

    Raises:
        ValueError: an unsupported or unknown value, or an unwritable ``path.log_dir``.
        FileNotFoundError: ``reload_model_path`` / ``resume`` names a path that does not exist.
    """
    check_episode_config(config)
    choices = {"model": MODEL_CHOICES, "backbone": BACKBONES, "pretrained_weights": PRETRAINED,
               "eval_mode": EVAL_MODES, "exclude_mode": EXCLUDE_MODES, "setting": SETTINGS_ALLOWED}
    for key, allowed in choices.items():
        _expect(config[key] in allowed, f"{key}={config[key]!r} is unknown: expected one of {list(allowed)}")
    _expect(config["dataset"] in (*DATASETS, CUSTOM),
            f"dataset={config['dataset']!r} is unknown: expected one of {[*DATASETS, CUSTOM]} ('custom' reads "
            f"dataset.json from data_dir)")
    _expect(config["amp"] in AMP_MODES, f"amp={config['amp']!r} is unknown: expected one of {list(AMP_MODES)}")
    device = str(config["device"])
    _expect(device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None,
            f"device={device!r} is unknown: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    positive = ("n_steps", "n_shot", "n_part", "max_iters_per_load", "print_interval",
                "save_snapshot_every", "test_batch_size", "min_size")
    for key in positive:
        _expect(isinstance(config[key], int) and config[key] >= 1,
                f"{key}={config[key]!r}: expected an integer >= 1")
    _expect(config["n_sv"] is None or (isinstance(config["n_sv"], int) and config["n_sv"] >= 1),
            f"n_sv={config['n_sv']!r}: expected None (the dataset's) or an integer >= 1")
    _expect(config["image_size"] is None or (isinstance(config["image_size"], int) and config["image_size"] >= 16),
            f"image_size={config['image_size']!r}: expected None (the dataset's native size) or an integer >= 16")
    _expect(config["supervoxel_source"] in SUPERVOXEL_SOURCES,
            f"supervoxel_source={config['supervoxel_source']!r} is unknown: expected one of {list(SUPERVOXEL_SOURCES)}")
    val_scans = config["val_scans"]
    _expect(val_scans is None or (isinstance(val_scans, (list, tuple)) and len(set(val_scans)) >= 2
                                  and all(isinstance(v, int) for v in val_scans)),
            f"val_scans={val_scans!r}: expected None (the last 2 training scans) or a list of >= 2 scan ids")
    gin = config["gin_prob"]
    _expect(isinstance(gin, (int, float)) and not isinstance(gin, bool) and 0 <= gin <= 1,
            f"gin_prob={gin!r}: expected a probability in [0, 1] (0 = off)")
    for key in ("collapse_patience", "keep_snapshots", "n_overlay_slices", "num_workers", "eval_fold", "supp_idx", "val_interval"):
        _expect(isinstance(config[key], int) and config[key] >= 0,
                f"{key}={config[key]!r}: expected an integer >= 0")
    for key in ("test_label", "exclude_label"):
        value = config[key]
        _expect(value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)),
                f"{key}={value!r}: expected None or a list of integer class ids, e.g. {key}=[1,2,3,4]")
    if command == "train":
        _expect(config["model"] != "copy_support",
                "model='copy_support' is a test-time baseline without parameters: run test.py with it")
        if config["resume"] is None:  # a resumed run keeps its own values (val_interval alone may change)
            _check_train_combinations(config)
        if config["resume"] is not None and not Path(config["resume"]).exists():
            raise FileNotFoundError(f"resume={config['resume']!r} does not exist: pass a training run "
                                    f"folder or a snapshot file (<run>/snapshots/*.pth)")
        if config["pretrained_weights"] == "snapshot":  # here, before the data are read (models.encoder checks it too)
            _expect(config["pretrained_path"] is not None,
                    "pretrained_weights='snapshot' needs pretrained_path=<training run folder or snapshot file>")
            if config["pretrained_path"] is not None and not Path(config["pretrained_path"]).exists():
                raise FileNotFoundError(f"pretrained_path={config['pretrained_path']!r} does not exist: pass a "
                                        f"training run folder or a snapshot file (<run>/snapshots/*.pth)")
    if command == "test":
        _expect(config["n_shot"] == 1,
                f"n_shot={config['n_shot']!r} is not supported by test.py: the evaluation protocol "
                f"implemented here is 1-shot (one support slice per query chunk, from the support scan "
                f"supp_idx); set n_shot=1. To use more of the support scan, raise n_part (chunks per "
                f"query volume, each with its own support slice)")
    if command == "test" and config["model"] != "copy_support":
        if config["reload_model_path"] is None:
            raise ValueError("reload_model_path is not set: pass reload_model_path=<training run folder "
                             "or snapshot .pth> (or model=copy_support for the baseline)")
        if not Path(config["reload_model_path"]).exists():
            raise FileNotFoundError(f"reload_model_path={config['reload_model_path']!r} does not exist: "
                                    f"pass a training run folder or a snapshot file")
    check_writable_dir(config["path"]["log_dir"])


@ex.config_hook
def _validate(config: dict, command_name: str, logger) -> dict:
    """Sacred config hook: validate before any folder or model is created (a resumed run: once its
    own config is restored, in :func:`_check_final`)."""
    if command_name == "train" and config["resume"] is not None:
        if not Path(config["resume"]).exists():
            raise FileNotFoundError(f"resume={config['resume']!r} does not exist: pass a training run "
                                    f"folder or a snapshot file (<run>/snapshots/*.pth)")
        return {}
    validate_config(config, command_name if command_name in ("train", "test") else None)
    return {}


@ex.config_hook
def _from_snapshot(config: dict, command_name: str, logger) -> dict:
    """Sacred config hook: a test run takes its model keys from its snapshot, a resumed run its whole
    config (explicit updates still win; :func:`_check_final` refuses those that contradict it)."""
    from engine.snapshot_config import snapshot_updates

    return snapshot_updates(config, command_name, MODEL_KEYS, (*DATASETS, CUSTOM))


@ex.final_config_check
def _check_data_dir(config: Mapping[str, Any], command_name: str, explicit: Mapping[str, Any]) -> None:
    """Refuse a train / test run without data: no ``data_dir`` given, none from the snapshot, and no
    ``QAMP_DATA_ROOT`` (no development path is a default)."""
    if command_name in ("train", "test") and config["data_dir"] is None:
        raise ValueError(f"data_dir is not set: pass data_dir=<folder> (the image folder, or the root holding "
                         f"<dataset>/<folder>) on the command line, or set {DATA_ROOT_ENV}, e.g. "
                         f"export {DATA_ROOT_ENV}=/path/to/data")


@ex.final_config_check
def _refuse_training_keys(config: Mapping[str, Any], command_name: str, explicit: Mapping[str, Any]) -> None:
    """test.py refuses keys only training reads (``TRAINING_ONLY_KEYS``) given explicitly: they would be
    accepted and ignored. Named configs (e.g. ``cpu_budget``, which sets ``n_steps``) may set them."""
    if command_name != "test":
        return
    given = {key: value for key, value in explicit.items() if key.split(".")[0] in TRAINING_ONLY_KEYS}
    if given:
        shown = ", ".join(f"{key}={value!r}" for key, value in given.items())
        one = len(given) == 1
        raise ValueError(f"{shown}: {'this key only affects' if one else 'these keys only affect'} training "
                         f"(train.py reads {'it' if one else 'them'}, test.py does not): drop "
                         f"{'it' if one else 'them'} from the test.py command (keys only training reads: "
                         f"{', '.join(TRAINING_ONLY_KEYS)})")


@ex.final_config_check
def _refuse_qamp_keys_for_baselines(config: Mapping[str, Any], command_name: str, explicit: Mapping[str, Any]) -> None:
    """Each network reads only its ``models.MODEL_READS`` of the model keys: model='adnet' / 'alpnet'
    only ``BASELINE_KEYS``, 'qnet' those and ``QNET_KEYS``, 'qamp' all but ``QNET_KEYS``. The others
    given explicitly would be accepted and ignored, so they are refused (named configs such as
    ``cpu_budget`` that set them are fine)."""
    reads = MODEL_READS.get(config["model"])
    if reads is None:  # copy_support
        return
    given = sorted(key for key in explicit if key in {f.name for f in fields(ModelConfig)} - set(reads))
    if not given:
        return
    shown = ", ".join(f"{key}={explicit[key]!r}" for key in given)
    if config["model"] == "qamp":
        raise ValueError(f"{shown}: model='qamp' does not read these Q-Net keys (only model='qnet' reads "
                         f"{list(QNET_KEYS)}); drop them")
    kind = "Q-Net" if set(given) <= set(QNET_KEYS) else "QAMP"
    section = {"qnet": "§12", "panet": "§13", "gmrd": "§14"}.get(config["model"], "§11")
    raise ValueError(f"{shown}: model={config['model']!r} does not read these {kind} keys (its head reads only "
                     f"{list(reads)} of the model keys; its other numbers are the authors', docs/METHOD.md {section}); "
                     "drop them")


@ex.final_config_check
def _refuse_keys_switched_off(config: Mapping[str, Any], command_name: str, explicit: Mapping[str, Any]) -> None:
    """model='qamp' with an ablation switch off (``use_*=False``, docs/METHOD.md §3.7) does not read
    that part's keys (``models.qamp.SWITCHED_KEYS``): given explicitly they would be accepted and
    ignored, so they are refused. Invalid combinations of switches are ``ModelConfig.validate``'s."""
    if config["model"] != "qamp":
        return
    unread = switched_off_keys(config)
    given = sorted(key for key in explicit if key in unread)
    _expect(not given, "; ".join(f"{key}={explicit[key]!r} is set but {unread[key]}=False: that part is switched "
                                 f"off, so model='qamp' does not read {key}" for key in given)
            + "; drop " + ("it" if len(given) == 1 else "them") + " or switch the part on")


@ex.final_config_check
def _check_final(config: Mapping[str, Any], command_name: str, explicit: Mapping[str, Any]) -> None:
    """Refuse a run whose final config contradicts its snapshot (engine/snapshot_config.py)."""
    from engine.snapshot_config import check_against_snapshot

    if command_name == "train" and config["resume"] is not None:
        validate_config(config, "train")
    check_against_snapshot(config, command_name, MODEL_KEYS, _native_size)


def _native_size(config: Mapping[str, Any]) -> int | None:
    """The dataset's native in-plane size (None when the dataset cannot be read)."""
    from dataloaders.datasets import get_dataset

    try:
        return get_dataset(config["dataset"], config["data_dir"]).image_size
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------
def run_name(config: Mapping[str, Any], command: str) -> str:
    """``<command>_<dataset>_setting<k>_fold<f>`` (+ ``_supp<i>`` for test runs)."""
    name = f"{command}_{config['dataset']}_setting{config['setting']}_fold{config['eval_fold']}"
    if command == "test":
        name += f"_supp{config['supp_idx']}"
    return name


class RunFolderObserver(FileStorageObserver):
    """Sacred file observer whose run folder is named from the config, never reusing a folder.

    The folder is ``<path.log_dir>/<run_name>``; when it exists, ``<run_name>_2``, ``_3`` ... is
    taken (created with ``mkdir``, so two runs started at once cannot share a folder).
    ``engine.runtime.run_folder`` finds it by ``is_run_folder``.
    """

    is_run_folder = True

    def __init__(self) -> None:
        # priority 10: after Sacred's own -F / -m / -s observers, which then number runs their own way
        super().__init__(basedir=".", priority=10)
        self.command: str | None = None

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        self.command = command
        base = Path(config["path"]["log_dir"])
        self.basedir = str(base)
        self.resource_dir = base / "_resources"
        self.source_dir = base / "_sources"
        name = run_name(config, command)
        for index in range(1, 10_000):
            candidate = name if index == 1 else f"{name}_{index}"
            if (base / candidate).exists():
                continue
            try:
                return super().started_event(ex_info, command, host_info, start_time, config,
                                             meta_info, candidate)
            except FileExistsError:  # taken by a concurrent run between the check and mkdir
                continue
        raise RuntimeError(f"no free run folder name for {name!r} under {base}")

    def failed_event(self, fail_time, fail_trace):
        """A failed test run that wrote no output leaves no folder (the error is on the console)."""
        super().failed_event(fail_time, fail_trace)
        if self.command == "test" and self.dir is not None and not holds_outputs(Path(self.dir)):
            shutil.rmtree(self.dir, ignore_errors=True)


RUN_BOOKKEEPING = frozenset({"config.json", "run.json", "cout.txt", "metrics.json", "logger.log"})


def holds_outputs(folder: Path) -> bool:
    """Whether a run folder holds any file besides Sacred's bookkeeping and ``logger.log``."""
    return any(p.is_file() and not (p.parent == folder and p.name in RUN_BOOKKEEPING) for p in folder.rglob("*"))


ex.observers.append(RunFolderObserver())


def run_commandline(argv: list[str], default_command: str) -> None:
    """``python <script>.py [COMMAND] [with KEY=VALUE ...]``: run ``default_command`` unless another
    is named (e.g. ``print_config``); everything else is Sacred's command line, whose ``--help``
    shows the script's own name and Sacred's commands."""
    ex.default_command = default_command
    ex.run_commandline(rank_argv(argv))  # torchrun ranks != 0: --unobserved (engine/distributed.py)


def resolve_config(named_configs: list[str], updates: Mapping[str, Any]) -> dict[str, Any]:
    """The final flat config of ``python train.py with <named_configs> <updates>``: the defaults, the
    named configs and the updates, with the config hooks applied (what ``print_config`` shows).

    Scripts read their values from here, never from a named config's own keys (a named config sets
    only what it changes)."""
    run = ex._create_run("print_config", config_updates=dict(updates), named_configs=list(named_configs))
    return dict(run.config)
