"""Self-supervised (supervoxel) or supervised (ground-truth) episodic training data.

An episode (docs/METHOD.md §5): a training scan; a class of its pseudo-label map (a
supervoxel, or a ground-truth organ not in ``test_label`` when ``use_gt``); ``n_shot + 1``
consecutive slices holding that class whose largest class area is at least ``min_size`` pixels
(the first ``n_shot`` are the support, the last the query; the order is reversed with p = 0.5);
gamma on the query or the support (p = 0.5) and affine + elastic on the query or the support
(p = 0.5); with ``gin_prob`` > 0 (pre-training, off by default) each slice then gets a GIN intensity
remapping with that probability (``dataloaders.transforms.gin_transform``).

Setting 2 (``exclude_label``) removes training slices that hold test classes before windows are
formed: ``exclude_mode='any'`` (default) removes every slice holding ANY excluded class;
``'all'`` removes only slices holding ALL of them (the ADNet/Q-Net/QAMP code).

Determinism: episode ``step`` is a pure function of ``(seed, step)``: its generator is
``np.random.default_rng(np.random.SeedSequence([seed, step]))`` and nothing else is random, so
0 or N DataLoader workers, and resuming at step k, give identical episodes. Index the dataset by
global step (see :class:`StepSampler`).
"""
from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from dataloaders.datasets import (
    DatasetSpec,
    ScanFiles,
    fold_positions,
    pair_supervoxels,
    read_scan_image,
    read_label,
    read_supervoxels,
)
from dataloaders.resolved import EXCLUDE_MODES, ResolvedDataset
from dataloaders.transforms import AffineElastic, gamma_transform, gin_transform
from utils.resample import pixel_ratio, resize_image, resize_labels

log = logging.getLogger(__name__)


@dataclass
class TrainScan:
    """A training scan after pre-computation.

    Attributes:
        scan_id: numeric id.
        image: float32 (Z x H x W), z-scored.
        pseudo: integer (Z x H x W) pseudo-label map (supervoxel ids or ground-truth ids).
        allowed: bool (Z,), False for slices removed by ``exclude_label``.
        starts: int (W,) first slice of every valid window (sorted by class, then slice).
        window_class: int (W,) class of every valid window.
        cdf: float64 (W,) cumulative sampling probabilities of the windows.
        geometric: the affine + elastic transform at this scan's grid (the run's, scaled by the
            side ratio model / native when the slices are resampled; see ``AffineElastic.scaled``).
    """

    scan_id: int
    image: np.ndarray  # on the model grid (image_size)
    pseudo: np.ndarray
    allowed: np.ndarray
    starts: np.ndarray
    window_class: np.ndarray
    cdf: np.ndarray
    geometric: AffineElastic


def class_slice_areas(pseudo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count of every class on every slice.

    Args:
        pseudo: non-negative integer (Z x H x W).
    Returns:
        ``(classes (K,) sorted non-zero ids present, areas int64 (Z x K))``.
    """
    z = pseudo.shape[0]
    if int(pseudo.max()) > 65535:  # sparse ids: compact them by sorting
        ids, inverse = np.unique(pseudo, return_inverse=True)
        inverse = inverse.reshape(pseudo.shape)
        k = ids.size
        offsets = (np.arange(z, dtype=np.int64) * k)[:, None, None]
        areas = np.bincount((inverse + offsets).ravel(), minlength=z * k).reshape(z, k)
    else:  # dense ids: one bincount per slice (O(n), no temporaries)
        width = int(pseudo.max()) + 1
        counts = np.stack([np.bincount(sl.ravel(), minlength=width) for sl in pseudo])  # (Z, width)
        ids = np.flatnonzero(counts.any(axis=0))
        areas = counts[:, ids]
    keep = ids != 0
    return ids[keep].astype(np.int64), areas[:, keep]


def excluded_slices(gt: np.ndarray, exclude_label: Sequence[int], mode: str = "any") -> np.ndarray:
    """Slices removed in Setting 2.

    Args:
        gt: ground-truth label ids (Z x H x W).
        exclude_label: classes to exclude (empty: nothing is removed).
        mode: ``'any'``: a slice holding any of them; ``'all'``: a slice holding all of them.
    Returns:
        bool (Z,), True = removed.
    """
    if mode not in EXCLUDE_MODES:
        raise ValueError(f"exclude_mode: expected one of {EXCLUDE_MODES}, got {mode!r}")
    if len(exclude_label) == 0:
        return np.zeros(gt.shape[0], dtype=bool)
    holds = np.stack([(gt == lab).any(axis=(1, 2)) for lab in exclude_label])  # (E, Z)
    return holds.any(axis=0) if mode == "any" else holds.all(axis=0)


def valid_windows(areas: np.ndarray, allowed: np.ndarray, length: int, min_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of ``length`` consecutive allowed slices holding a class, with sampling weights.

    A window is valid when all its slices hold the class and are allowed, and its largest class
    area is at least ``min_size`` (the reference tests the two slices of a 1-shot episode).
    Weights reproduce the reference's rejection sampler given the scan: a class uniformly among
    those with a run of ``length`` consecutive slices, a run uniformly among the class's runs, a
    start uniformly within the run, rejected and redrawn while the area is below ``min_size``.

    Args:
        areas: int (Z x K) class areas per slice.
        allowed: bool (Z,).
    Returns:
        ``(starts (W,), class column (W,), weights (W,) float64)``; empty arrays when none is valid.
    """
    n_slices, n_classes = areas.shape
    starts, columns, weights = [], [], []
    if n_slices < length:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    present = (areas > 0) & allowed[:, None]  # (Z, K)
    windows = np.lib.stride_tricks.sliding_window_view(present, length, axis=0).all(axis=-1)  # (Z-L+1, K)
    largest = np.lib.stride_tricks.sliding_window_view(areas, length, axis=0).max(axis=-1)
    big = largest >= min_size
    for col in np.flatnonzero(windows.any(axis=0)):
        win = windows[:, col]
        # runs of consecutive window starts = runs of consecutive slices of length >= L
        edges = np.flatnonzero(np.diff(np.concatenate([[0], win.astype(np.int8), [0]])))
        run_bounds = edges.reshape(-1, 2)  # [start, stop) of each run of starts
        n_runs = len(run_bounds)
        for lo, hi in run_bounds:
            ok = np.arange(lo, hi)[big[lo:hi, col]]
            if ok.size:
                starts.append(ok)
                columns.append(np.full(ok.size, col))
                weights.append(np.full(ok.size, 1.0 / (n_runs * (hi - lo))))
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(starts), np.concatenate(columns), np.concatenate(weights)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the worker's legacy global numpy and python RNGs from
    torch's per-worker seed (PyTorch's reproducibility recipe).

    Episodes do not use them (each draws from its own ``SeedSequence([seed, step])`` generator), but
    forked workers otherwise share one numpy global state, so any code added to a worker that calls
    ``np.random`` would repeat the same draws in every worker. torch's per-worker seed derives from
    the main process's torch seed, so this stays a function of the run seed. Fork-safe (no thread
    pools are touched).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class StepSampler(Sampler[int]):
    """Yields the global steps ``start, start + 1, ..., stop - 1`` (resume = start at the saved step)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass(frozen=True)
class Augmentation:
    """How episodes are drawn and augmented; the defaults are the reference's (docs/METHOD.md §5).

    Attributes:
        gamma_range: gamma exponent range (applied to the query or the support).
        geometric: the joint affine + elastic transform (rotation, shift, shear, scale, alpha, sigma);
            its pixel lengths are on the native grid and scale with resampled slices.
        reverse_prob: probability of reversing the slice order of an episode.
        query_aug_prob: probability that gamma (and, drawn separately, the geometric transform) is
            applied to the query rather than the support.
    """

    gamma_range: tuple[float, float] = (0.5, 1.5)
    geometric: AffineElastic = field(default_factory=AffineElastic)
    reverse_prob: float = 0.5
    query_aug_prob: float = 0.5


@dataclass(frozen=True)
class EpisodeKeys:
    """The config keys of training episodes (``config.py`` holds their defaults and meaning).

    Attributes:
        n_shot: support slices per episode (the episode uses ``n_shot + 1`` consecutive slices).
        min_size: the largest class area among the window's slices must reach this (pixels of the
            native grid; scaled by the pixel ratio when slices are resampled).
        augment: gamma + affine/elastic augmentation.
        seed: run seed; episode ``i`` depends only on ``(seed, i)``.
        n_steps: ``__len__`` (total training steps).
        max_iters_per_load: the reference's epoch length (``__len__`` when ``n_steps`` is None).
        gin_prob: probability, per slice of an episode (support and query drawn independently), of a
            GIN intensity remapping after the other augmentations (``transforms.gin_transform``); 0 =
            off, the reference's episodes exactly. Needs ``augment``.
    """

    n_shot: int
    min_size: int
    augment: bool
    seed: int
    n_steps: int | None
    max_iters_per_load: int
    gin_prob: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "EpisodeKeys":
        """The keys of a flat config."""
        return cls(**{f.name: config[f.name] for f in fields(cls)})


class TrainDataset(Dataset):
    """Episodic training data of one fold (every scan outside fold ``eval_fold``).

    Args:
        data: the run's dataset, resolved with ``training=True`` (``dataloaders.resolved``):
            scans, image size, test / excluded labels, pseudo-label source (ground truth minus
            ``test_label``, or supervoxels from a folder or computed on load at the image size, with
            in-plane spacing and ``n_sv`` scaled by the size and pixel ratios).
        keys: the episode keys (:class:`EpisodeKeys`).
        eval_fold: the test fold (0..4); its scans are left out. None: train on every scan (e.g. a
            model for another dataset).
        scan_ids: restrict training to these scan ids (must be outside the test fold).
        exclude_scan_ids: training scans left out (e.g. validation scans when ``use_gt``).
        augmentation: the :class:`Augmentation` parameters (used when ``keys.augment``; the slice
            order is reversed with ``augmentation.reverse_prob`` either way).
        num_threads: threads used to read volumes.
        progress: show a tqdm bar while reading.

    Attributes:
        spec, image_dir, supervoxel_dir: the dataset and where its files were found.
        scans: the sampled :class:`TrainScan` s (numeric id order).
        skipped_scan_ids: training scans without any valid window (logged as a warning).

    Raises:
        ValueError / FileNotFoundError with the key or file and the fix, for bad configuration or data.
    """

    def __init__(self, data: ResolvedDataset, keys: EpisodeKeys, eval_fold: int | None, *,
                 scan_ids: Sequence[int] | None = None, exclude_scan_ids: Sequence[int] = (),
                 augmentation: Augmentation = Augmentation(), num_threads: int = 2, progress: bool = False) -> None:
        self.spec: DatasetSpec = data.spec
        self.image_dir = data.image_dir
        self.eval_fold = None if eval_fold is None else data.spec.check_fold(eval_fold)
        if not isinstance(keys.n_shot, (int, np.integer)) or keys.n_shot < 1:
            raise ValueError(f"n_shot: expected an integer >= 1, got {keys.n_shot!r}")
        if not isinstance(keys.seed, (int, np.integer)) or keys.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {keys.seed!r}")
        if data.needs_supervoxel_dir and data.supervoxel_dir is None:
            raise ValueError("supervoxel training needs the supervoxel folder: resolve the dataset with "
                             "dataloaders.resolved.resolve_dataset(config, training=True)")
        self.test_label, self.exclude_label = list(data.test_label), list(data.exclude_label)
        self.exclude_mode = data.exclude_mode
        self.image_size, self.resampled = data.image_size, data.resample
        self.n_sv, self.use_gt, self.regenerate = data.n_sv, data.use_gt, data.regenerate
        self.n_shot, self.min_size, self.seed = int(keys.n_shot), int(keys.min_size), int(keys.seed)
        self.max_iters_per_load, self.n_steps = int(keys.max_iters_per_load), keys.n_steps
        self.augment = bool(keys.augment)
        self.gin_prob = float(keys.gin_prob)
        if not 0.0 <= self.gin_prob <= 1.0 or (self.gin_prob > 0 and not self.augment):
            raise ValueError(f"gin_prob: expected a probability in [0, 1], and 0 unless augment=True; got "
                             f"gin_prob={keys.gin_prob!r} with augment={keys.augment!r}")
        self.augmentation = augmentation
        self.gamma_range = tuple(augmentation.gamma_range)
        self.geometric = augmentation.geometric
        self.reverse_prob = float(augmentation.reverse_prob)
        self.query_aug_prob = float(augmentation.query_aug_prob)
        self.supervoxel_dir = data.supervoxel_dir
        files = list(data.scans) if data.supervoxel_dir is None else pair_supervoxels(data.scans, data.supervoxel_dir)
        self._load_scans(self._training_files(files, scan_ids, exclude_scan_ids), num_threads, progress)

    def _training_files(self, files: list[ScanFiles], scan_ids: Sequence[int] | None,
                        exclude_scan_ids: Sequence[int]) -> list[ScanFiles]:
        """The scans outside the test fold, restricted to ``scan_ids`` and without ``exclude_scan_ids``."""
        eval_fold = self.eval_fold
        test_positions = set(fold_positions(self.spec, len(files), eval_fold)) if eval_fold is not None else set()
        train_files = [f for pos, f in enumerate(files) if pos not in test_positions]
        if scan_ids is not None:
            available = {f.scan_id for f in train_files}
            outside = sorted(set(int(i) for i in scan_ids) - available)
            if outside:
                raise ValueError(
                    f"scan_ids: {outside} are not training scans of fold {eval_fold} "
                    f"(training scans: {sorted(available)})"
                )
            train_files = [f for f in train_files if f.scan_id in set(int(i) for i in scan_ids)]
        left_out = {int(i) for i in exclude_scan_ids}
        return [f for f in train_files if f.scan_id not in left_out]

    def _load_scans(self, train_files: list[ScanFiles], num_threads: int, progress: bool) -> None:
        """Read and pre-compute every training scan (:attr:`scans`); scans without a valid window
        are left out and named (:attr:`skipped_scan_ids`).

        Raises:
            ValueError: no training scan has a valid window.
        """
        sv_dir = self.supervoxel_dir
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            loaded = list(tqdm(pool.map(self._load, train_files), total=len(train_files),
                               desc="loading training scans", disable=not progress))
        self.scans: list[TrainScan] = [s for s in loaded if s.starts.size]
        if not self.scans:
            source = ("ground-truth classes (minus test_label)" if self.use_gt else
                      f"supervoxels in {sv_dir}" if sv_dir else "supervoxels generated on load")
            raise ValueError(
                f"min_size: no class of the {source} of the {len(train_files)} training scans has "
                f"{self.window} consecutive slices (outside exclude_label) with at least "
                f"{self.min_size} pixels; lower min_size or n_shot, or check the labels/supervoxels"
            )
        self.skipped_scan_ids = [s.scan_id for s in loaded if not s.starts.size]
        if self.skipped_scan_ids:
            log.warning(
                "scans %s have no valid window (%d consecutive slices, min_size %d%s) and are not "
                "sampled", self.skipped_scan_ids, self.window, self.min_size,
                f", exclude_label {self.exclude_label} ({self.exclude_mode})" if self.exclude_label else "")

    @property
    def window(self) -> int:
        """Consecutive slices per episode: ``n_shot`` support + 1 query."""
        return self.n_shot + 1

    def _load(self, files: ScanFiles) -> TrainScan:
        image, reference = read_scan_image(self.spec, files.image, check_size=not self.resampled)
        gt = read_label(self.spec, files.label, image.shape)
        allowed = ~excluded_slices(gt, self.exclude_label, self.exclude_mode)  # on the native grid
        native_hw = image.shape[1:]
        image = resize_image(image, self.image_size)
        if self.use_gt:
            pseudo = gt.copy()
            pseudo[np.isin(pseudo, self.test_label)] = 0
            pseudo = resize_labels(pseudo, self.image_size)
        elif self.regenerate:
            pseudo = self._regenerate_supervoxels(image, reference, native_hw)
        else:
            pseudo = resize_labels(read_supervoxels(files.supervoxel, gt.shape), self.image_size)
        min_area = max(1, int(round(self.min_size * pixel_ratio(native_hw, self.image_size))))
        classes, areas = class_slice_areas(pseudo)
        starts, columns, weights = valid_windows(areas, allowed, self.window, min_area)
        cdf = np.cumsum(weights)
        if cdf.size:
            cdf /= cdf[-1]
        side_ratio = float(np.sqrt(pixel_ratio(native_hw, self.image_size))) if self.resampled else 1.0
        return TrainScan(files.scan_id, image, pseudo, allowed, starts, classes[columns], cdf,
                         self.geometric.scaled(side_ratio))

    def _regenerate_supervoxels(self, image: np.ndarray, reference, native_hw: tuple[int, int]) -> np.ndarray:
        """3D Felzenszwalb supervoxels of the resized scan: in-plane spacing scaled up by the size
        ratio, ``min_size = n_sv`` x pixel ratio (the same physical volume per supervoxel)."""
        from data.supervoxels.generate_supervoxels import compute_supervoxels, reference_spacing

        sz, sy, sx = reference_spacing(reference)
        spacing = (sz, sy * native_hw[0] / self.image_size, sx * native_hw[1] / self.image_size)
        n_sv = max(1, int(round(self.n_sv * pixel_ratio(native_hw, self.image_size))))
        return compute_supervoxels(image, spacing, n_sv)

    # ------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        return int(self.n_steps) if self.n_steps is not None else self.max_iters_per_load

    def __getitem__(self, step: int) -> dict:
        return self.episode(int(step))

    def episode_rng(self, step: int) -> np.random.Generator:
        """The generator of episode ``step``: ``SeedSequence([seed, step])``."""
        if step < 0:
            raise ValueError(f"step: expected a non-negative global step, got {step}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, step]))

    def candidate_slices(self, scan_id: int) -> np.ndarray:
        """Sorted slice indices of ``scan_id`` that can appear in an episode."""
        scan = next((s for s in self.scans if s.scan_id == scan_id), None)
        if scan is None:
            return np.zeros(0, dtype=np.int64)
        return np.unique(scan.starts[:, None] + np.arange(self.window)[None, :])

    def episode(self, step: int) -> dict:
        """Episode ``step`` (a pure function of ``(seed, step)``).

        Returns:
            dict with
            ``support_images`` float32 tensor (n_shot x 3 x H x W), z-scored, slice repeated to 3 channels;
            ``support_masks`` float32 (n_shot x H x W) in {0, 1};
            ``query_images`` float32 (1 x 3 x H x W); ``query_labels`` int64 (1 x H x W) in {0, 1};
            ``scan_id`` int; ``class_id`` int (supervoxel or label id);
            ``slices`` int64 (n_shot + 1,) slice indices, support first, query last.
        """
        rng = self.episode_rng(step)
        scan = self.scans[int(rng.integers(len(self.scans)))]
        k = min(int(np.searchsorted(scan.cdf, rng.random(), side="right")), scan.cdf.size - 1)
        class_id = int(scan.window_class[k])
        slices = np.arange(scan.starts[k], scan.starts[k] + self.window)
        if rng.random() < self.reverse_prob:
            slices = slices[::-1].copy()
        images = scan.image[slices]  # (S+1, H, W) fancy indexing copies
        masks = (scan.pseudo[slices] == class_id).astype(np.uint8)
        if self.augment:
            support_part = slice(0, self.n_shot)
            query_part = slice(self.n_shot, self.window)
            part = query_part if rng.random() < self.query_aug_prob else support_part
            images[part] = gamma_transform(images[part], rng, self.gamma_range)
            part = query_part if rng.random() < self.query_aug_prob else support_part
            for i in range(part.start, part.stop):
                images[i], masks[i] = scan.geometric(images[i], masks[i], rng)
        # numpy until the end: torch.from_numpy shares memory, and no torch kernel runs here (torch
        # kernels on tiny tensors are slow when the process has many intra-op threads)
        channels = np.ascontiguousarray(np.broadcast_to(images[:, None], (self.window, 3, *images.shape[1:])))
        if self.gin_prob > 0:  # last draws of the episode: per slice, support first, a coin then its network
            for i in range(self.window):
                if rng.random() < self.gin_prob:
                    channels[i] = gin_transform(images[i], rng)
        return {
            "support_images": torch.from_numpy(channels[: self.n_shot]),
            "support_masks": torch.from_numpy(masks[: self.n_shot].astype(np.float32)),
            "query_images": torch.from_numpy(channels[self.n_shot:]),
            "query_labels": torch.from_numpy(masks[self.n_shot:].astype(np.int64)),
            "scan_id": scan.scan_id,
            "class_id": class_id,
            "slices": torch.from_numpy(slices.astype(np.int64)),
        }
