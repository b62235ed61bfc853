"""Deterministic synthetic abdominal MR phantoms: the embedded default data set of the demo.

Each phantom is a T2-SPIR-like axial volume ``(Z, H, W)`` with the CHAOS label convention
(0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen), written in the on-disk layout the
loaders read (``image_<id>.nii.gz``, ``label_<id>.nii.gz``, ``classmap_<min_tp>.json``,
``dataset.json``). It is not meant to fool a radiologist; it is meant to exercise the whole pipeline
(supervoxels, episodic training, the evaluation protocol) with the properties that matter to it:

* anatomy-like shapes in the array orientation of the pre-processed CHAOST2 volumes (row 0 is
  posterior, column 0 is the patient's right, slice 0 is inferior): a large lobed liver on the right
  whose cross-section grows towards the dome, paired bean-shaped kidneys beside the spine in the
  lower slices, a crescent spleen on the left, a body outline with a subcutaneous fat layer,
  a vertebra with its spinal canal, paraspinal muscles, aorta / IVC and bowel / stomach distractors;
* per-organ texture (smooth multiplicative fields, liver vessels as level sets of a smooth field,
  kidney cortex / medulla), a smooth multiplicative bias field, a point-spread blur and Rician noise;
* scan-to-scan variation in position, in-plane rotation, size, organ proportions and the number of
  slices (30..40 by default);
* spacing 1.25 x 1.25 x 7.7 mm at 256 x 256 (the in-plane spacing scales with ``256 / size`` so that
  the field of view stays the same at other sizes); intensities in the CHAOST2 range (0..~1300),
  stored as int16.

Every scan is a pure function of ``(seed, scan index, size)``: the same arguments give byte-identical
files, and scan ``k`` does not depend on how many scans are generated.

Usage::

    python -m data.synthetic --out runs/demo_data [--n-scans 10] [--seed 0] [--size 256] [--overwrite]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from utils.io import write_image, write_json

# CHAOS label ids and the class names the CHAOST2 classmap files use.
LABEL_NAMES: dict[int, str] = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
CLASSMAP_NAMES: dict[int, str] = {0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}
REFERENCE_SIZE = 256  # in-plane size at which the spacing and the pixel-sized parameters are stated
# Orientation of the pre-processed CHAOST2 volumes (LAS after the reference converter).
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Parameters of the phantom generator. Lengths in normalised in-plane units (the half-width of
    the image is 1) unless named ``*_px`` (pixels at ``REFERENCE_SIZE``)."""

    size: int = 256                      # in-plane H = W
    spacing_xy_mm: float = 1.25          # at REFERENCE_SIZE; scaled by REFERENCE_SIZE / size
    spacing_z_mm: float = 7.7            # CHAOST2 after pre-processing
    min_slices: int = 30
    max_slices: int = 40
    max_shift: float = 0.06              # global in-plane translation, uniform in +-max_shift
    scale_range: tuple[float, float] = (0.9, 1.1)   # global in-plane scale (body size)
    max_rotation_deg: float = 8.0        # global in-plane rotation, uniform in +-max_rotation_deg
    organ_jitter: float = 0.03           # per-organ centre jitter
    organ_scale_range: tuple[float, float] = (0.88, 1.12)  # per-organ size factor
    z_jitter: float = 0.04               # per-organ shift of the cranio-caudal extent (fraction)
    texture_sigma_px: float = 3.0        # smoothness of the organ texture fields
    texture_strength: float = 0.12       # relative std of the multiplicative organ texture
    vessel_sigma_px: float = 6.0         # smoothness of the field whose level set draws liver vessels
    vessel_width: float = 0.06           # |field| < vessel_width (unit-std field) is a vessel
    bias_strength: float = 0.2           # bias field spans about exp(+-bias_strength)
    psf_sigma_px: float = 0.7            # in-plane point-spread blur
    noise_sigma: float = 18.0            # Rician noise level (intensity units)
    max_intensity: float = 1300.0        # clip, as the 99.5th-percentile clip of the CHAOS recipe


# Mean T2-SPIR-like intensities per tissue (fat suppressed: fat is dark grey, fluid is bright).
TISSUE_INTENSITY: dict[str, float] = {
    "air": 0.0,
    "subcutaneous_fat": 170.0,
    "abdominal_wall": 140.0,
    "mesenteric_fat": 210.0,
    "vertebra": 330.0,
    "csf": 1000.0,
    "paraspinal_muscle": 150.0,
    "aorta": 110.0,            # flow void
    "ivc": 480.0,
    "stomach": 430.0,
    "bowel_low": 300.0,
    "bowel_high": 820.0,
    "perirenal_fat": 120.0,
    "liver": 340.0,
    "liver_vessel": 720.0,
    "kidney_cortex": 690.0,
    "kidney_medulla": 820.0,
    "spleen": 600.0,
}


def _z_profile(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cross-section scale along the cranio-caudal axis: an ellipsoidal cap, 0 outside [lo, hi].

    Args:
        w: slice positions in [0, 1] (0 inferior), any shape.
    Returns:
        values in [0, 1], same shape as ``w``.
    """
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    return np.sqrt(np.clip(1.0 - ((w - mid) / half) ** 2, 0.0, None))


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float,
             angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius and polar angle of points ``(u, v)`` w.r.t. a rotated ellipse.

    Returns:
        ``(rho, theta)``: ``rho <= 1`` inside the ellipse; ``theta`` in (-pi, pi].
    """
    du, dv = u - cu, v - cv
    c, s = np.cos(angle), np.sin(angle)
    pu, pv = (c * du + s * dv) / au, (-s * du + c * dv) / av
    return np.hypot(pu, pv), np.arctan2(pv, pu)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float) -> np.ndarray:
    """A smooth 3D random field with zero mean and unit std (float32, ``shape`` = (Z, H, W))."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32),
                                    sigma=(0.7, sigma_px, sigma_px), mode="reflect")
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


# Straight through: the anatomy painted structure by structure; the order of the draws from ``rng`` is
# the phantom (splitting it must keep that order bit for bit, or every phantom changes).
def make_phantom(rng: np.random.Generator, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom.

    Args:
        rng: the scan's generator (the only source of randomness).
        cfg: generator parameters.
    Returns:
        ``(image, label)``: image int16 ``(Z, H, W)`` in [0, ``cfg.max_intensity``]; label uint8
        ``(Z, H, W)`` in {0, 1, 2, 3, 4}. Row 0 is posterior, column 0 the patient's right,
        slice 0 inferior (the array layout of the pre-processed CHAOST2 volumes).
    """
    size = cfg.size
    n_z = int(rng.integers(cfg.min_slices, cfg.max_slices + 1))
    px = size / REFERENCE_SIZE  # pixel-sized parameters scale with the image size

    # Normalised coordinates of every voxel, then the inverse of the scan's global similarity
    # transform, so that shapes are defined once in a canonical frame.
    axis = (np.arange(size, dtype=np.float32) + 0.5) / (size / 2) - 1.0
    shift = rng.uniform(-cfg.max_shift, cfg.max_shift, size=2)
    scale = rng.uniform(*cfg.scale_range)
    rot = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    x, y = axis[None, :] - shift[0], axis[:, None] - shift[1]          # (1, W), (H, 1)
    u2 = (np.cos(rot) * x + np.sin(rot) * y) / scale                     # (H, W)
    v2 = (-np.sin(rot) * x + np.cos(rot) * y) / scale
    w = ((np.arange(n_z, dtype=np.float32) + 0.5) / n_z)[:, None, None]  # (Z, 1, 1), 0 = inferior
    u, v = u2[None], v2[None]                                            # (1, H, W)
    shape = (n_z, size, size)

    def jitter() -> tuple[float, float, float, float]:
        du, dv = rng.uniform(-cfg.organ_jitter, cfg.organ_jitter, size=2)
        return float(du), float(dv), float(rng.uniform(*cfg.organ_scale_range)), float(
            rng.uniform(-cfg.z_jitter, cfg.z_jitter))

    tissue = np.zeros(shape, dtype=np.uint8)  # index into the tissue list below
    names = list(TISSUE_INTENSITY)
    label = np.zeros(shape, dtype=np.uint8)

    def paint(mask: np.ndarray, name: str, label_id: int | None = 0) -> None:
        """Later paints win; ``label_id=None`` keeps the label underneath (e.g. a texture detail)."""
        mask = np.broadcast_to(mask, shape)
        tissue[mask] = names.index(name)
        if label_id is not None:
            label[mask] = label_id

    # Body outline: a super-ellipse, slightly wider in lower slices; subcutaneous fat layer and
    # abdominal wall as rings inside it; what is left inside is mesenteric fat.
    body_au = 0.84 * (1.0 + 0.04 * (0.5 - w))
    body_av = 0.60 * (1.0 + 0.03 * (0.5 - w))
    body_r = (np.abs(u / body_au) ** 2.6 + np.abs((v - 0.04) / body_av) ** 2.6) ** (1 / 2.6)
    fat_thickness = rng.uniform(0.05, 0.09)
    paint(body_r <= 1.0, "subcutaneous_fat")
    paint(body_r <= 1.0 - fat_thickness, "abdominal_wall")
    paint(body_r <= 1.0 - fat_thickness - 0.03, "mesenteric_fat")

    # Spine (posterior midline): paraspinal muscles, vertebral body, spinal canal; aorta and IVC.
    for side in (-1.0, 1.0):
        rho, _ = _ellipse(u, v, side * 0.15, -0.44, 0.12, 0.08)
        paint(rho <= 1.0, "paraspinal_muscle")
    paint(_ellipse(u, v, 0.0, -0.32, 0.10, 0.09)[0] <= 1.0, "vertebra")
    paint(_ellipse(u, v, 0.0, -0.45, 0.04, 0.035)[0] <= 1.0, "csf")
    paint(_ellipse(u, v, 0.06, -0.19, 0.045, 0.045)[0] <= 1.0, "aorta")
    paint(_ellipse(u, v, -0.11, -0.17, 0.05, 0.04)[0] <= 1.0, "ivc")

    # Stomach (left, anterior, upper slices) and bowel loops (anterior, lower slices): distractors
    # with organ-like intensities.
    du, dv, s, dz = jitter()
    prof = _z_profile(w, 0.45 + dz, 0.9 + dz) * s
    rho, _ = _ellipse(u, v, 0.28 + du, 0.22 + dv, 0.22, 0.15, angle=0.4)
    paint(rho <= prof, "stomach")
    for _ in range(int(rng.integers(4, 8))):
        cu, cv = rng.uniform(-0.35, 0.45), rng.uniform(0.05, 0.42)
        lo = rng.uniform(0.0, 0.35)
        prof = _z_profile(w, lo, lo + rng.uniform(0.2, 0.4))
        r = rng.uniform(0.05, 0.10)
        paint(_ellipse(u, v, cu, cv, r, r * rng.uniform(0.7, 1.3))[0] <= prof,
              "bowel_high" if rng.random() < 0.4 else "bowel_low")

    # Liver (label 1): a big right lobe and a left lobe reaching across the midline anteriorly,
    # lobulated by a few random harmonics of the polar angle; it grows towards the dome.
    du, dv, s, dz = jitter()
    harm = [(k, rng.uniform(0.02, 0.07), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
    rho, theta = _ellipse(u, v, -0.44 + du, 0.11 + dv, 0.40 * s, 0.44 * s, angle=-0.2)
    lobes = 1.0 + sum(a * np.sin(k * theta + ph) for k, a, ph in harm)
    right_lobe = rho <= _z_profile(w, 0.28 + dz, 1.05 + dz) * lobes
    rho, _ = _ellipse(u, v, 0.02 + du, 0.26 + dv, 0.36 * s, 0.17 * s, angle=0.25)
    left_lobe = rho <= _z_profile(w, 0.55 + dz, 0.98 + dz)
    liver = right_lobe | left_lobe
    paint(liver, "liver", 1)

    # Spleen (label 4): a crescent posterolateral on the left, concave towards the stomach.
    du, dv, s, dz = jitter()
    prof = _z_profile(w, 0.35 + dz, 0.85 + dz)
    cu, cv = 0.63 + du, -0.08 + dv
    outer, _ = _ellipse(u, v, cu, cv, 0.16 * s, 0.26 * s, angle=-0.35)
    inner, _ = _ellipse(u, v, cu - 0.11 * s, cv + 0.06 * s, 0.13 * s, 0.22 * s, angle=-0.35)
    paint((outer <= prof) & (inner > prof), "spleen", 4)

    # Kidneys (labels 2, 3), after the spleen so that their perirenal fat rim separates the two:
    # beans with the hilum notch facing the spine, a perirenal fat rim,
    # cortex outside and brighter medulla inside; the left one sits slightly higher.
    for label_id, side, z_lo in ((2, -1.0, 0.06), (3, 1.0, 0.12)):
        du, dv, s, dz = jitter()
        cu, cv = side * 0.36 + du, -0.26 + dv
        au, av = 0.14 * s, 0.19 * s
        angle = side * rng.uniform(0.2, 0.5)
        prof = _z_profile(w, z_lo + dz, z_lo + 0.5 + dz)
        rho, _ = _ellipse(u, v, cu, cv, au, av, angle=angle)
        notch, _ = _ellipse(u, v, cu - side * 0.9 * au, cv, 0.45 * au, 0.35 * av)
        bean = (rho <= prof) & (notch > prof)
        paint((rho <= prof * 1.18) & (prof > 0), "perirenal_fat")
        paint(bean, "kidney_cortex", label_id)
        paint(bean & (rho <= 0.6 * prof), "kidney_medulla", None)

    # Everything outside the body is air, whatever was painted there.
    outside = np.broadcast_to(body_r > 1.0, shape)
    tissue[outside] = names.index("air")
    label[outside] = 0

    # Intensities: tissue means, per-organ multiplicative texture, liver vessels.
    means = np.array([TISSUE_INTENSITY[n] for n in names], dtype=np.float32)
    image = means[tissue]
    texture = _smooth_field(rng, shape, cfg.texture_sigma_px * px)
    image *= 1.0 + cfg.texture_strength * texture
    vessels = np.abs(_smooth_field(rng, shape, cfg.vessel_sigma_px * px)) < cfg.vessel_width
    vessels &= np.broadcast_to(liver, shape) & (label == 1)
    image[vessels] = TISSUE_INTENSITY["liver_vessel"]

    # Acquisition: smooth multiplicative bias field (low-order polynomial in u, v, w), blur, Rician
    # noise, clip to the CHAOS range.
    coef = rng.uniform(-1.0, 1.0, size=6)
    poly = (coef[0] * u + coef[1] * v + coef[2] * (w - 0.5) + coef[3] * u * v
            + coef[4] * u ** 2 + coef[5] * v ** 2)
    image *= np.exp(cfg.bias_strength * poly / 2.0).astype(np.float32)
    image = ndimage.gaussian_filter(image, sigma=(0.0, cfg.psf_sigma_px * px, cfg.psf_sigma_px * px))
    real = image + cfg.noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = cfg.noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(np.hypot(real, imag)), 0, cfg.max_intensity).astype(np.int16)
    return image, label


def scan_rng(seed: int, scan_index: int) -> np.random.Generator:
    """The generator of scan ``scan_index`` (0-based): independent of the number of scans."""
    return np.random.default_rng(np.random.SeedSequence([seed, scan_index]))


def to_sitk(array: np.ndarray, cfg: PhantomConfig) -> sitk.Image:
    """Wrap a ``(Z, H, W)`` array with the phantom geometry (CHAOST2 spacing and direction)."""
    image = sitk.GetImageFromArray(array)
    spacing_xy = cfg.spacing_xy_mm * REFERENCE_SIZE / cfg.size
    image.SetSpacing((spacing_xy, spacing_xy, cfg.spacing_z_mm))
    image.SetDirection(DIRECTION)
    # Centre the field of view on the origin in x / y (as the CHAOST2 volumes roughly are).
    half = 0.5 * cfg.size * spacing_xy
    image.SetOrigin((-half, half, 0.0))
    return image


def classmap(labels: dict[int, np.ndarray], min_tp: int) -> dict[str, dict[str, list[int]]]:
    """Class name -> scan id -> sorted slice indices holding at least ``min_tp`` pixels of it."""
    out: dict[str, dict[str, list[int]]] = {name: {} for name in CLASSMAP_NAMES.values()}
    for scan_id, label in labels.items():
        for class_id, name in CLASSMAP_NAMES.items():
            counts = (label == class_id).reshape(label.shape[0], -1).sum(axis=1)
            out[name][str(scan_id)] = [int(z) for z in np.flatnonzero(counts >= min_tp)]
    return out


def dataset_definition(size: int, name: str = "synthetic_abdomen_MR") -> dict:
    """The ``dataset.json`` the custom-dataset loader reads (``dataloaders.datasets.load_custom_spec``).

    ``n_sv`` (the supervoxel ``min_size`` in voxels, 5000 for CHAOST2 at 256 x 256) scales with the
    in-plane pixel count, so that smaller phantoms get about as many supervoxels per scan.
    """
    return {
        "name": name,
        "modality": "MR",
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "test_labels": sorted(LABEL_NAMES),
        "n_sv": supervoxel_min_size(size),
        "image_size": size,
    }


def supervoxel_min_size(size: int, reference_n_sv: int = 5000) -> int:
    """Supervoxel ``min_size`` for ``size x size`` phantoms: ``reference_n_sv`` scaled by pixel count."""
    return max(1, round(reference_n_sv * (size / REFERENCE_SIZE) ** 2))


def output_paths(out_dir: Path, n_scans: int, classmap_min_tps: Sequence[int]) -> list[Path]:
    """Every file :func:`generate` writes into ``out_dir``."""
    paths = [out_dir / f"{kind}_{i}.nii.gz" for i in range(1, n_scans + 1) for kind in ("image", "label")]
    paths += [out_dir / f"classmap_{t}.json" for t in classmap_min_tps]
    return paths + [out_dir / "dataset.json"]


def generate(out_dir: str | Path, n_scans: int = 10, seed: int = 0, size: int = 256,
             overwrite: bool = False, classmap_min_tps: Sequence[int] = (1, 100),
             progress: bool = True) -> list[Path]:
    """Write ``n_scans`` phantoms (ids 1..n_scans) and their metadata into ``out_dir``.

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False.
        ValueError: ``n_scans`` < 1 or ``size`` < 32.
    Returns:
        the written paths.
    """
    if n_scans < 1:
        raise ValueError(f"expected n_scans >= 1, got {n_scans}")
    if size < 32:
        raise ValueError(f"expected size >= 32 (pixels), got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, n_scans, classmap_min_tps)
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists ({len(existing)} of the outputs do): pass --overwrite "
            f"to replace them, or choose another --out")
    cfg = PhantomConfig(size=size)
    labels: dict[int, np.ndarray] = {}
    for index in tqdm(range(n_scans), desc="synthetic phantoms", disable=not progress):
        scan_id = index + 1
        image, label = make_phantom(scan_rng(seed, index), cfg)
        write_image(to_sitk(image, cfg), out_dir / f"image_{scan_id}.nii.gz")
        write_image(to_sitk(label, cfg), out_dir / f"label_{scan_id}.nii.gz")
        labels[scan_id] = label
    for min_tp in classmap_min_tps:
        write_json(out_dir / f"classmap_{min_tp}.json", classmap(labels, min_tp))
    write_json(out_dir / "dataset.json", dataset_definition(size))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--n-scans", type=int, default=10, help="number of phantoms (ids 1..n)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set")
    parser.add_argument("--size", type=int, default=256, help="in-plane size H = W in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out, args.n_scans, args.seed, args.size, args.overwrite)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
