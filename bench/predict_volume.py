#!/usr/bin/env python
"""predict.py against test.py: seconds per query slice on the same slices, model and support.

A random-weight model (``pretrained_weights='none'``; speed does not depend on the weights) is saved
as a self-describing snapshot; the same query slices of one CHAOST2 scan are then segmented
(1) by ``predict.segment`` (predict.py's loop, after its reading / re-orientation / z-score) and
(2) by ``engine.evaluate.predict_scan`` (test.py's loop, ``eval_mode='all_slices'``), each with an
empty support-feature cache (so both pay the 3 support encoder passes) after one untimed warm-up.
Prints ONE JSON line and writes ``bench/results/predict_volume.json`` (atomically).

    python bench/predict_volume.py                                  # ResNet-101, 256 px, 12 slices
    python bench/predict_volume.py --backbone resnet50 --size 64    # small and quick
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import add_data_dir, emit, machine  # noqa: E402
from engine.malloc import keep_freed_memory  # noqa: E402


# Straight through: one benchmark, in order: arguments, one model, the same slices through both loops, timed.
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir(parser)
    parser.add_argument("--support-id", type=int, default=3)
    parser.add_argument("--query-id", type=int, default=2)
    parser.add_argument("--class-id", type=int, default=2, help="class to segment (CHAOST2 2 = right kidney)")
    parser.add_argument("--slices", type=int, default=12, help="query slices timed (the middle ones)")
    parser.add_argument("--backbone", default="resnet101", choices=["resnet101", "resnet50"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "predict_volume.json"))
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)

    import SimpleITK as sitk

    import predict
    from config import cfg
    from dataloaders.datasets import get_dataset, resolve_image_dir
    from dataloaders.eval_dataset import EvalDataset, ProtocolKeys
    from dataloaders.resolved import resolve_dataset
    from models import MODEL_KEYS, build_model, make_generator
    from engine.evaluate import predict_scan
    from engine.snapshot import SNAPSHOT_FORMAT, load_model, save_snapshot, snapshot_meta

    device = torch.device("cpu")
    spec = get_dataset("CHAOST2", args.data_dir)
    image_dir = resolve_image_dir(spec, args.data_dir)
    config = dict(cfg(fixed={"backbone": args.backbone, "pretrained_weights": "none", "image_size": args.size}))
    torch.manual_seed(0)
    model = build_model(config, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "final.pth"
        save_snapshot(path, {"format": SNAPSHOT_FORMAT, "step": 0, "final": True, "model": model.state_dict(),
                             "config": json.loads(json.dumps(config)),
                             "meta": snapshot_meta(config, args.size, spec.label_names, spec.orientation,
                                                   model_keys=MODEL_KEYS)})
        loaded = load_model(path, device)
        predictor, meta = loaded.model, loaded.meta

    def volume(scan_id: int, what: str) -> predict.Volume:
        file = image_dir / f"image_{scan_id}.nii.gz"
        return predict.Volume.load(file, sitk.ReadImage(str(file)), meta["orientation"], args.size, what)

    support = volume(args.support_id, "support")
    support_label = predict.orient(sitk.ReadImage(str(image_dir / f"label_{args.support_id}.nii.gz")),
                                   spec.orientation).array.astype(np.int64)
    query = volume(args.query_id, "query")
    mid = query.image.shape[0] // 2
    slices = np.arange(max(0, mid - args.slices // 2), min(query.image.shape[0], mid - args.slices // 2 + args.slices))

    # test.py's loop on the same scans and slices
    class Subset(EvalDataset):
        def query_slices(self, scan, class_id):
            return slices

    data = resolve_dataset({**config, "dataset": "CHAOST2", "data_dir": args.data_dir, "test_label": [args.class_id]},
                           training=False)
    tds = Subset(data, ProtocolKeys(n_part=3, eval_mode="all_slices"), 0, 0, scan_ids=[args.support_id, args.query_id])
    scan = next(s for s in tds.fold_scans if s.scan_id == args.query_id)
    tds = tds.with_support(next(i for i, s in enumerate(tds.fold_scans) if s.scan_id == args.support_id))

    def run_predict() -> float:
        start = time.perf_counter()
        predict.segment(predictor, support, support_label, query, [args.class_id], slices, 3, args.batch_size,
                        device, 2025, {})
        return time.perf_counter() - start

    def run_test() -> float:
        start = time.perf_counter()
        predict_scan(predictor, tds, scan, args.class_id, args.batch_size, device,
                     make_generator(2025, args.class_id, device=device), {})
        return time.perf_counter() - start

    run_test()  # warm-up (allocator, kernels)
    timings = {"predict": run_predict(), "test": run_test()}
    result = {
        "bench": "predict_volume", "backbone": args.backbone, "image_size": args.size, "batch_size": args.batch_size,
        "support_id": args.support_id, "query_id": args.query_id, "class_id": args.class_id,
        "slices": int(slices.size), "support_encoder_passes": 3,
        "predict_s_per_slice": round(timings["predict"] / slices.size, 3),
        "test_s_per_slice": round(timings["test"] / slices.size, 3),
        "ratio": round(timings["predict"] / timings["test"], 3),
        "threads": args.threads, **machine()}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
