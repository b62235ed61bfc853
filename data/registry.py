"""The datasets this project knows: one :class:`DatasetSpec` per dataset, the facts in one place,
and the one reader of a custom dataset's ``dataset.json`` (:func:`read_custom_json`).

Pre-processing (``data.preprocess``: what to write, the classmap names), ``verify`` (what a folder
must look like) and the loaders (``dataloaders.datasets``: labels, test classes, folds, supervoxel
size, image size) all read these entries. A researcher's own data is a folder with a
``dataset.json`` read by ``dataloaders.datasets.load_custom_spec`` into the same class
(``dataset='custom'``); pre-processing builds specs for folders it writes the same way.

Folds follow the protocol of the field (docs/METHOD.md §6): scans are sorted by their numeric id
and fold ``k`` holds the positions ``k*s .. (k+1)*s`` (``s = n_scans // 5``, so adjacent folds
share one scan); the last fold holds ``4*s .. n_scans-1`` plus position 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import json5
import numpy as np

N_FOLDS = 5
CUSTOM = "custom"
CUSTOM_SPEC_FILE = "dataset.json"


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline needs to know about one dataset.

    Attributes:
        name: dataset key (``'CHAOST2'``, ``'SABS'``, ``'Prostate_MRI'``, ``'CMR'`` or ``'custom'``).
        folder: name of the image folder (``<root>/<name>/<folder>``); ``''`` for custom data.
        label_names: foreground label id -> name (background 0 is implicit and not listed).
        test_labels: default classes evaluated (``test_label`` config key).
        n_sv: default supervoxel ``min_size`` (picks the folder ``supervoxels_<n_sv>``).
        image_size: in-plane size H = W of every scan on disk (the model's MLP width depends on the
            size the model sees, see the ``image_size`` config key); None when free (only folders
            written by the generic recipe without a crop).
        modality: ``'MR'`` or ``'CT'``.
        folds: ``N_FOLDS`` tuples of positions in the numerically sorted scan list.
        n_scans: the number of scans of the complete dataset (the fold table is made for it).
        label_remap: stored label value -> label id (e.g. CMR 200/500/600 -> 1/2/3); empty when
            the stored values already are the label ids.
        classmap_names: stored value -> class name used as key in ``classmap_<min_tp>.json``,
            background included; None: ``'BG'`` plus ``label_names`` (through ``label_remap``).
            Given where the published files use other names (SABS: ``BGD``, ``KID_R``, ``KID_l``).
        spacing: expected ``(x, y, z)`` spacing in mm after pre-processing; None entries are free.
        orientation: ITK orientation code of every pre-processed scan (``utils.io.orientation_code``,
            e.g. ``LAS``): what ``verify`` expects and what ``predict.py`` re-orients inputs to when a
            snapshot does not state it; None where the recipe keeps each scan's stored orientation.
            The one place of these facts (``tools.convert``, ``engine.snapshot`` read it here).
        min_tps: the ``min_tp`` values of the classmap files pre-processing writes by default.
    """

    name: str
    folder: str
    label_names: Mapping[int, str] = field(default_factory=dict)
    test_labels: tuple[int, ...] = ()
    n_sv: int = 5000
    image_size: int | None = None
    modality: str = "MR"
    folds: tuple[tuple[int, ...], ...] = ()
    n_scans: int | None = None
    label_remap: Mapping[int, int] = field(default_factory=dict)
    classmap_names: Mapping[int, str] | None = None
    spacing: tuple[float | None, float | None, float | None] = (None, None, None)
    orientation: str | None = None
    min_tps: tuple[int, ...] = (1,)

    @property
    def class_names(self) -> dict[int, str]:
        """Stored label value -> classmap class name, background included (pre-processing, verify)."""
        if self.classmap_names is not None:
            return dict(self.classmap_names)
        stored = {v: k for k, v in self.label_remap.items() if v != 0} if self.label_remap else {}
        return {0: "BG", **{stored.get(k, k): v for k, v in sorted(self.label_names.items())}}

    @property
    def inplane_size(self) -> int | None:
        """The in-plane size ``verify`` expects (pre-processing's name for :attr:`image_size`)."""
        return self.image_size

    @property
    def stored_label_values(self) -> list[int]:
        """Values a label file of this dataset may hold (0 is background)."""
        return sorted({0, *(self.label_remap or self.label_names)})

    def check_labels(self, key: str, labels: Sequence[int] | None) -> list[int]:
        """Validate a list of label ids given under config key ``key``; returns it as ``list[int]``."""
        if labels is None:
            return []
        if isinstance(labels, (int, np.integer)):
            labels = [int(labels)]
        unknown = [int(lab) for lab in labels if int(lab) not in self.label_names]
        if unknown:
            known = ", ".join(f"{k} {v}" for k, v in sorted(self.label_names.items()))
            raise ValueError(
                f"{key}: label ids {unknown} are not in dataset {self.name} (labels: {known}); "
                f"set {key} to a subset of {sorted(self.label_names)}"
            )
        return [int(lab) for lab in labels]

    def check_fold(self, eval_fold: int) -> int:
        """Validate the ``eval_fold`` config key."""
        if not isinstance(eval_fold, (int, np.integer)) or not 0 <= eval_fold < len(self.folds):
            raise ValueError(
                f"eval_fold: expected an integer in 0..{len(self.folds) - 1}, got {eval_fold!r}; "
                f"set eval_fold=<0..{len(self.folds) - 1}>"
            )
        return int(eval_fold)


def make_folds(n_scans: int, n_folds: int = N_FOLDS) -> tuple[tuple[int, ...], ...]:
    """The field's fold rule: fold k = positions ``k*s .. (k+1)*s`` with ``s = n_scans // n_folds``,
    the last fold = positions ``(n_folds-1)*s .. n_scans-1`` plus position 0.

    Reproduces the published tables (CHAOST2 20 scans, SABS 30, Prostate 40, CMR 35).
    """
    if n_scans < n_folds:
        raise ValueError(
            f"expected at least {n_folds} scans to make {n_folds} folds, got {n_scans}; add scans "
            "or give explicit 'folds' in dataset.json"
        )
    step = n_scans // n_folds
    folds = [tuple(range(k * step, (k + 1) * step + 1)) for k in range(n_folds - 1)]
    folds.append(tuple(sorted({0, *range((n_folds - 1) * step, n_scans)})))
    return tuple(folds)


def _fold_table(*ranges: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    """Fold table from inclusive position ranges; the last fold also holds position 0."""
    folds = [tuple(range(lo, hi + 1)) for lo, hi in ranges]
    folds[-1] = tuple(sorted({0, *folds[-1]}))
    return tuple(folds)


DATASETS: dict[str, DatasetSpec] = {
    "CHAOST2": DatasetSpec(
        name="CHAOST2",
        folder="chaos_MR_T2_normalized",
        label_names={1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"},
        test_labels=(1, 2, 3, 4),
        n_sv=5000,
        image_size=256,
        modality="MR",
        folds=_fold_table((0, 4), (4, 8), (8, 12), (12, 16), (16, 19)),
        n_scans=20,
        spacing=(1.25, 1.25, 7.7),
        orientation="LAS",
        min_tps=(1, 100, 400),
    ),
    "SABS": DatasetSpec(
        name="SABS",
        folder="sabs_CT_normalized",
        label_names={
            1: "SPLEEN", 2: "RK", 3: "LK", 4: "GALLBLADDER", 5: "ESOPHAGUS", 6: "LIVER",
            7: "STOMACH", 8: "AORTA", 9: "IVC", 10: "PS_VEIN", 11: "PANCREAS", 12: "AG_R",
            13: "AG_L",
        },
        test_labels=(1, 2, 3, 6),
        n_sv=5000,
        image_size=257,
        modality="CT",
        folds=_fold_table((0, 6), (6, 12), (12, 18), (18, 24), (24, 29)),
        n_scans=30,
        orientation="LPS",  # the shipped scans (SSL-ALPNet's pre-processing keeps the Synapse direction)
        # Class names as in the published SABS classmap_1.json (including its "KID_l").
        classmap_names={
            0: "BGD", 1: "SPLEEN", 2: "KID_R", 3: "KID_l", 4: "GALLBLADDER", 5: "ESOPHAGUS",
            6: "LIVER", 7: "STOMACH", 8: "AORTA", 9: "IVC", 10: "PS_VEIN", 11: "PANCREAS",
            12: "AG_R", 13: "AG_L",
        },
    ),
    "Prostate_MRI": DatasetSpec(
        name="Prostate_MRI",
        folder="prostate_MR_normalized",
        label_names={
            1: "BLADDER", 2: "BONE", 3: "OBTURATOR_INTERNUS", 4: "TRANSITION_ZONE",
            5: "CENTRAL_GLAND", 6: "RECTUM", 7: "SEMINAL_VESICLE", 8: "NEUROVASCULAR_BUNDLE",
        },
        test_labels=(1, 2, 4, 7),
        n_sv=5000,
        image_size=256,
        modality="MR",
        folds=_fold_table((0, 8), (8, 16), (16, 24), (24, 32), (32, 39)),
        n_scans=40,
        orientation=None,  # the generic recipe keeps the stored orientation unless --orient is given
    ),
    # MS-CMRSeg bSSFP: values kept as stored by the challenge; loaders remap 200/500/600 -> 1/2/3.
    "CMR": DatasetSpec(
        name="CMR",
        folder="cmr_MR_normalized",
        label_names={1: "LV-MYO", 2: "LV-BP", 3: "RV"},
        test_labels=(1, 2, 3),
        n_sv=1000,
        image_size=256,
        modality="MR",
        folds=_fold_table((0, 7), (7, 14), (14, 21), (21, 28), (28, 34)),
        n_scans=35,
        label_remap={200: 1, 500: 2, 600: 3},
        spacing=(1.25, 1.25, 7.99),
        orientation=None,  # the cmr recipe keeps the stored orientation unless --orient is given
    ),
}


def read_custom_json(image_dir: str | Path) -> dict[str, Any]:
    """``<image_dir>/dataset.json``, read and checked: the one reader of the file (format:
    ``dataloaders.datasets.load_custom_spec``). Returns its keys, with ``labels`` as id -> name, ``label_remap`` as
    stored value -> id (``{}`` when not given) and ``modality`` filled in (``'MR'`` when not given).

    Raises:
        FileNotFoundError: no ``dataset.json`` in ``image_dir``.
        ValueError: a bad ``dataset.json`` (the message names the file, the key and the fix).
    """
    path = Path(image_dir) / CUSTOM_SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: a custom dataset needs {CUSTOM_SPEC_FILE} beside its image_/label_ files; "
            'create it, e.g. {"labels": {"1": "liver"}, "test_labels": [1]} (see data/README.md)'
        )
    try:
        raw = json5.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON / JSON5 ({err}); fix the file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object {{...}} at the top level, got {type(raw).__name__}")
    allowed = {"name", "modality", "labels", "test_labels", "n_sv", "image_size", "label_remap", "folds"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed keys are {sorted(allowed)}")
    if not isinstance(raw.get("labels"), dict) or not raw["labels"]:
        raise ValueError(
            f"{path}: expected key 'labels' mapping label id -> name, e.g. "
            f'{{"labels": {{"1": "liver"}}}}, got {raw.get("labels")!r}'
        )
    try:
        label_names = {int(k): str(v) for k, v in raw["labels"].items()}
        label_remap = {int(k): int(v) for k, v in raw.get("label_remap", {}).items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'labels' and 'label_remap' keys must be integers (as strings)") from None
    if 0 in label_names:
        raise ValueError(f"{path}: 'labels' must not list 0 (background is implicit); remove it")
    bad_targets = sorted(set(label_remap.values()) - set(label_names) - {0})
    if bad_targets:
        raise ValueError(f"{path}: 'label_remap' maps to ids {bad_targets} that 'labels' does not name")
    if label_remap and 0 not in label_remap:
        label_remap[0] = 0
    modality = raw.get("modality", "MR")
    if modality not in ("MR", "CT"):
        raise ValueError(f"{path}: 'modality' must be 'MR' or 'CT', got {modality!r}")
    return {**raw, "labels": label_names, "label_remap": label_remap, "modality": modality}


def dataset_modality(name: str, data_dir: str | Path | None = None) -> str | None:
    """``'MR'`` or ``'CT'``: the modality of a registered dataset, or for ``'custom'`` the
    ``modality`` of ``<data_dir>/dataset.json`` (:func:`read_custom_json`; ``'MR'`` when the file
    does not say). None when it cannot be known: an unknown name, or ``'custom'`` without a
    ``dataset.json`` (``config.py`` then keeps the MR prior thresholds, and its checks name the problem).

    Raises:
        ValueError: a bad ``dataset.json``.
    """
    if name in DATASETS:
        return DATASETS[name].modality
    if name != CUSTOM or data_dir is None or not (Path(data_dir) / CUSTOM_SPEC_FILE).is_file():
        return None
    return read_custom_json(data_dir)["modality"]
