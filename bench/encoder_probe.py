"""How good a start an encoder is before any training on CHAOST2: PANet (masked-average prototypes,
cosine x 20, no parameters of its own; models/panet.py) on the encoder as it is, scored with the
validation protocol (each scan the support once, the others its queries; native-grid 3D Dice).

    .venv/bin/python bench/encoder_probe.py [--data-dir DIR] --encoder NAME=RUN_OR_SNAPSHOT ...

A random encoder (``pretrained_weights='none'``, the from-scratch start, seed 2025) is always the
first row: an encoder below it transfers nothing PANet can use. ``cpu_budget`` geometry (64 px,
dilated ResNet-50). ``--bn-scans``: first reset the encoder's batch-norm statistics and re-estimate
them (train mode, no gradient, cumulative average, batches of 16) on every third slice of these
scans, to tell features that do not transfer from statistics of another modality. Scans: ``--scans`` (default 36-39, the last four scans of CHAOST2's numeric
order: fold 0's training scans that its validation uses, and fold 4's test scans). A diagnostic of
the pre-training (docs/CPU_BUDGET.md), never used to choose between encoders.

Prints one JSON line and writes ``bench/results/encoder_probe.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.report import add_data_dir, emit, machine  # noqa: E402
from config import cfg  # noqa: E402
from dataloaders.datasets import load_scan  # noqa: E402
from dataloaders.eval_dataset import EvalDataset, ProtocolKeys  # noqa: E402
from dataloaders.resolved import resolve_dataset  # noqa: E402
from engine.evaluate import score_queries  # noqa: E402
from models import build_model, make_generator  # noqa: E402
from utils.run_folder import find_snapshot  # noqa: E402

SEED = 2025
GEOMETRY = {"image_size": 64, "backbone": "resnet50"}  # cpu_budget's


def bn_slices(data, scans: list[int]) -> torch.Tensor:
    """Every third slice of ``scans`` at the model's size: N x 3 x H x W (z-scored, bilinear)."""
    out = []
    for files in (f for f in data.scans if f.scan_id in scans):
        image = torch.from_numpy(np.ascontiguousarray(load_scan(data.spec, files, check_size=False).image[::3]))
        out.append(F.interpolate(image.float()[:, None], size=(data.image_size, data.image_size), mode="bilinear",
                                 align_corners=False))
    return torch.cat(out).repeat(1, 3, 1, 1)


def reestimate_bn(model: torch.nn.Module, slices: torch.Tensor) -> None:
    """Reset every batch norm's running statistics and average them over ``slices`` (batches of 16)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, len(slices), 16):
            model.encoder(slices[start:start + 16])


def probe(config: dict, data, vds: EvalDataset, encoder: tuple[str, str | None], bn: torch.Tensor | None = None) -> dict:
    """Mean Dice (%) per organ of PANet on ``encoder`` = (pretrained_weights, pretrained_path) over the
    probe scans ``vds`` of the resolved dataset ``data``; ``bn``: slices to re-estimate the batch-norm
    statistics on first (:func:`reestimate_bn`)."""
    weights, path = encoder
    torch.manual_seed(SEED)  # the random encoder: the from-scratch start of every run with this seed
    model = build_model({**config, "model": "panet", "pretrained_weights": weights, "pretrained_path": path},
                        data.image_size)
    if bn is not None:
        reestimate_bn(model, bn)
    model.eval()
    dice: dict[str, list[float]] = {data.spec.label_names[c]: [] for c in data.test_label}
    for supp in range(len(vds.fold_scans)):
        scores = score_queries(model, vds.with_support(supp), list(data.test_label), config["test_batch_size"],
                               torch.device("cpu"), lambda c: make_generator(SEED, c))
        for class_id, values in scores.items():
            dice[data.spec.label_names[class_id]] += [o.dice for o in values]
    organs = {name: round(100 * sum(v) / len(v), 2) for name, v in dice.items()}
    return {**organs, "mean": round(sum(organs.values()) / len(organs), 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir(parser)
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                        help="a training run folder or snapshot whose encoder to probe (repeatable)")
    parser.add_argument("--scans", default="36,37,38,39", help="CHAOST2 scan ids, comma-separated (>= 2)")
    parser.add_argument("--bn-scans", default="", help="re-estimate batch-norm statistics on these scan ids first")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "encoder_probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        scans = [int(v) for v in args.scans.split(",")]
        bn_scans = [int(v) for v in args.bn_scans.split(",") if v]
    except ValueError:
        parser.error(f"--scans {args.scans!r} / --bn-scans {args.bn_scans!r}: expected comma-separated scan ids, e.g. 36,37")
    if set(bn_scans) & set(scans):
        parser.error(f"--bn-scans {bn_scans} overlap --scans {scans}: re-estimate on other scans")
    encoders: dict[str, tuple[str, str | None]] = {"random": ("none", None)}
    for item in args.encoder:
        name, sep, path = item.partition("=")
        if not sep or not path:
            parser.error(f"--encoder {item!r}: expected NAME=PATH (a training run folder or snapshot file)")
        encoders[name] = ("snapshot", str(find_snapshot(path)))
    config = dict(cfg(fixed={"dataset": "CHAOST2", "data_dir": args.data_dir, **GEOMETRY}))
    data = resolve_dataset(config, training=False)
    bn = bn_slices(data, bn_scans) if bn_scans else None
    vds = EvalDataset(data, ProtocolKeys(n_part=config["n_part"], eval_mode="protocol"), 0, 0, scan_ids=scans)
    rows = {}
    for name, encoder in encoders.items():
        start = time.perf_counter()
        rows[name] = {**probe(config, data, vds, encoder, bn), "seconds": round(time.perf_counter() - start, 1),
                      "path": None if encoder[1] is None else Path(encoder[1]).name}
    result = {"name": "encoder_probe", "head": "panet", "scans": scans, "bn_scans": bn_scans, "geometry": GEOMETRY,
              "dice_percent": rows, **machine()}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
