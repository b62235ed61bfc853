"""How the methods' spatial constants behave at 64, 128 and 256 px on CHAOST2 (issue: every method
at its authors' scale).

    .venv/bin/python bench/scale_rules.py [--data-dir DIR]

Masks: every (slice, organ) of the 20 CHAOST2 label volumes (liver, right kidney, left kidney,
spleen), and every published supervoxel (``supervoxels_5000``) on the slice where it is largest.
At each size ``S`` the volumes are resized as the loaders resize them (nearest, ``utils.resample``).

1. SSL-ALPNet's mode decision: the fraction of support masks whose foreground uses local prototypes
   ('gridconv+': some window of the mask, resized to the features, averages >= 0.95). Rows: the
   authors' (32 x 32 features at 256 px, window 4 cells), this code's rule (``models.alpnet``:
   window = feature side / ``MODE_GRID``, features S / 4), and the old fixed window of 4 cells.
2. QAMP's edge bands: inner band area / mask area and outer band area / mask area (mean over
   masks) with the rule of ``models.mgsp.band_iterations`` and with the authors' fixed 2
   iterations of a 3 x 3 kernel at every size.

Prints one JSON line and writes ``bench/results/scale_rules.json``. No timing: load is recorded only
as the report's machine line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.report import add_data_dir, emit, machine  # noqa: E402
from dataloaders.datasets import discover_scans, get_dataset, read_label, read_supervoxels, resolve_image_dir  # noqa: E402
from models import alpnet  # noqa: E402
from models.mgsp import band_iterations, edge_bands  # noqa: E402
from utils.io import read_volume  # noqa: E402
from utils.resample import resize_labels  # noqa: E402

SIZES = (64, 128, 256)
ORGANS = {1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}
AUTHORS_FEATURE_SIDE = 32  # SSL-ALPNet's features at 256 px (output stride 8)
AUTHORS_MODE_WINDOW = 4  # grid_proto_fewshot.py L142: avg_pool2d(mask, 4) on those features
OLD_WINDOW = 4  # this code's fixed window in feature cells before the rule
AUTHORS_ITERS = 2  # QAMP models/qamp.py L296, L329


def mask_sets(data_dir: str) -> tuple[dict[str, list[tuple[np.ndarray, int, int]]], list[tuple[np.ndarray, int, int]]]:
    """``(organs, supervoxels)``: per organ name and for supervoxels, ``(volume, slice, id)`` triples
    that select one binary mask each (the volume is shared, not copied)."""
    spec = get_dataset("CHAOST2", data_dir)
    image_dir = resolve_image_dir(spec, data_dir)
    files = discover_scans(image_dir, image_dir.parent / "supervoxels_5000")
    organs: dict[str, list] = {name: [] for name in ORGANS.values()}
    supervoxels: list = []
    for f in files:
        shape = read_volume(f.image)[0].shape
        label = read_label(spec, f.label, shape)
        for class_id, name in ORGANS.items():
            organs[name] += [(label, int(z), class_id) for z in np.flatnonzero((label == class_id).any(axis=(1, 2)))]
        sv = read_supervoxels(f.supervoxel, shape)
        for sv_id in np.unique(sv[sv > 0]):
            areas = (sv == sv_id).sum(axis=(1, 2))
            supervoxels.append((sv, int(np.argmax(areas)), int(sv_id)))
    return organs, supervoxels


def masks_at(triples: list[tuple[np.ndarray, int, int]], size: int, cache: dict) -> torch.Tensor:
    """``N x S x S`` float masks of the triples, the volumes resized to ``size`` (nearest) once."""
    out = []
    for volume, z, class_id in triples:
        key = (id(volume), size)
        if key not in cache:
            cache[key] = resize_labels(volume, size)
        out.append(cache[key][z] == class_id)
    return torch.from_numpy(np.stack(out).astype(np.float32))


def gridconv_fraction(masks: torch.Tensor, feature_side: int, window: int) -> float:
    """Fraction of masks (``N x S x S``) with a ``window`` cell average >= 0.95 on ``feature_side`` features."""
    small = alpnet.resize_masks(masks, (feature_side, feature_side))
    pooled = F.avg_pool2d(small[:, None], window).flatten(1).max(dim=1).values
    return round(float((pooled >= alpnet.PROTO_THRESHOLD).float().mean()), 3)


def band_fractions(masks: torch.Tensor, iterations: int) -> dict[str, float]:
    """Mean inner / outer band area over mask area (``N x S x S`` masks, 3 x 3 kernel)."""
    inner, outer = edge_bands(masks, 3, iterations)
    area = masks.sum(dim=(1, 2)).clamp(min=1)
    return {"inner": round(float((inner.sum(dim=(1, 2)) / area).mean()), 3),
            "outer": round(float((outer.sum(dim=(1, 2)) / area).mean()), 3)}


def measure(groups: dict[str, list]) -> dict:
    """Both measurements for every group of masks at every size."""
    alp: dict[str, dict] = {"authors_256": {}}
    bands: dict[str, dict] = {}
    cache: dict = {}
    for name, triples in groups.items():
        for size in SIZES:
            masks = masks_at(triples, size, cache)
            side = size // 4
            alp.setdefault(f"rule_{size}", {})[name] = gridconv_fraction(
                masks, side, alpnet.window_cells(side, alpnet.MODE_GRID))
            alp.setdefault(f"old_{size}", {})[name] = gridconv_fraction(masks, side, OLD_WINDOW)
            iterations = band_iterations(None, 3, (size, size))
            bands.setdefault(f"rule_{size}", {"iterations": iterations})[name] = band_fractions(masks, iterations)
            bands.setdefault(f"authors_iters_{size}", {"iterations": AUTHORS_ITERS})[name] = band_fractions(
                masks, AUTHORS_ITERS)
            if size == 256:
                alp["authors_256"][name] = gridconv_fraction(masks, AUTHORS_FEATURE_SIDE, AUTHORS_MODE_WINDOW)
        cache.clear()
    return {"alpnet_gridconv_plus_fraction": alp, "qamp_band_over_mask_area": bands}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir(parser)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "scale_rules.json"))
    args = parser.parse_args(argv)
    organs, supervoxels = mask_sets(args.data_dir)
    groups = {**organs, "supervoxels": supervoxels}
    result = {"name": "scale_rules", "dataset": "CHAOST2",
              "n_masks": {name: len(t) for name, t in groups.items()}, **measure(groups), **machine()}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
