"""Convert a checkpoint saved by the reference QAMP code (docs/METHOD.md §10) to this model.

    python -m tools.convert REF.pth OUT.pth [--dataset CHAOST2] [--orientation LAS] [--overwrite]

The output holds ``{'model': state_dict, 'meta': ..., 'config': None, 'image_size': [H, W],
'backbone': ..., 'converted_from': name}``. ``meta`` (``engine.snapshot.snapshot_meta``) describes the
model like a training snapshot does: the model keys (backbone, feature width and MLP widths inferred
from the tensors, the reference's defaults for the rest), the image size, the normalisation
(per-volume z-score, as the reference's loaders) and, with ``--dataset``, the dataset's class names,
PGQP thresholds and the orientation of its pre-processed scans. ``test.py with
reload_model_path=OUT.pth`` and ``predict.py --snapshot OUT.pth`` then use it as it is. Tensors the
mapping does not know are reported, not copied.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Mapping

import torch

logger = logging.getLogger("qamp")

# Reference module prefix -> ours. The reference MLP is Sequential(Linear, Dropout, Linear) and its
# decoder Sequentials res1 = (conv, relu), res2 = (conv, relu, conv, relu), down = (conv, relu, drop, conv).
PREFIX_MAP = {"encoder.": "encoder."}
for ref, ours in (("mlp1", "fg_mlp"), ("mlp2", "bg_mlp")):
    PREFIX_MAP.update({f"{ref}.reduce.0.": f"{ours}.fc1.", f"{ref}.reduce.2.": f"{ours}.fc2."})
for ref, ours in (("decoder1", "fg_decoder"), ("decoder2", "bg_decoder")):
    PREFIX_MAP.update({f"{ref}.res1.0.": f"{ours}.in_conv.", f"{ref}.res2.0.": f"{ours}.res_conv1.",
                       f"{ref}.res2.2.": f"{ours}.res_conv2.", f"{ref}.down.0.": f"{ours}.out_conv.",
                       f"{ref}.down.3.": f"{ours}.head."})
WRAPPER_PREFIX = "module."  # nn.DataParallel


def split_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename reference tensors; return ``(converted, leftover reference keys)``."""
    converted, leftovers = {}, []
    for key, value in state_dict.items():
        name = key[len(WRAPPER_PREFIX):] if key.startswith(WRAPPER_PREFIX) else key
        prefix = next((p for p in PREFIX_MAP if name.startswith(p)), None)
        if prefix is None:
            leftovers.append(key)
        else:
            converted[PREFIX_MAP[prefix] + name[len(prefix):]] = value
    return converted, leftovers


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference state dict -> this model's names (leftovers are logged and dropped)."""
    converted, leftovers = split_reference_state_dict(state_dict)
    if leftovers:
        logger.warning("reference checkpoint: %d tensors not converted: %s", len(leftovers), leftovers)
    return converted


def infer_image_size(converted: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Square image size from the MLP input width ``H*W`` (65536 -> 256, 66049 -> 257)."""
    n_positions = converted["fg_mlp.fc1.weight"].shape[1]
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise ValueError(f"fg_mlp.fc1.weight has {n_positions} inputs, not a square image size H*W")
    return side, side


def infer_backbone(converted: Mapping[str, torch.Tensor]) -> str:
    """resnet101 has 23 blocks in layer3, resnet50 6."""
    blocks = {int(k.split(".")[3]) for k in converted if k.startswith("encoder.backbone.layer3.")}
    return "resnet101" if len(blocks) == 23 else "resnet50"


def converted_meta(cfg: Mapping, image_size: tuple[int, int], dataset: str | None,
                   orientation: str | None) -> dict:
    """``meta`` of a converted checkpoint: the reference's defaults plus the inferred keys; the PGQP
    thresholds (the modality's, ``models.qamp.prior_thresholds`` as in config.py), class names and
    scan orientation (``data.registry``) only with ``dataset``."""
    from dataclasses import asdict

    from dataloaders.datasets import DATASETS
    from models import MODEL_KEYS
    from models.qamp import ModelConfig, prior_thresholds
    from engine.snapshot import snapshot_meta

    keys = {**asdict(ModelConfig()), "model": "qamp", **cfg}
    if dataset is None:
        del keys["tau_fg"], keys["tau_bg"]  # then they follow the test run's dataset
    else:
        keys["tau_fg"], keys["tau_bg"] = prior_thresholds(DATASETS[dataset].modality)
    names = DATASETS[dataset].label_names if dataset is not None else {}
    if orientation is None and dataset is not None:
        orientation = DATASETS[dataset].orientation
    return snapshot_meta(keys, image_size[0], names, orientation, dataset=dataset, model_keys=MODEL_KEYS)


def convert_file(ref_path: Path, out_path: Path, overwrite: bool = False, dataset: str | None = None,
                 orientation: str | None = None) -> dict:
    """Convert ``ref_path``, check it against a freshly built model, write ``out_path`` atomically.

    Args:
        dataset: the dataset the checkpoint was trained on (a key of ``DATASETS``), for class names,
            thresholds and orientation in ``meta``; None leaves them to the user of the checkpoint.
        orientation: ITK orientation code of the training scans (default: the dataset's).
    """
    from dataloaders.datasets import DATASETS
    from models import build_model, check_state_dict
    from utils.io import atomic_write

    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r} is unknown: expected one of {list(DATASETS)}")

    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists: pass --overwrite to replace it")
    from utils.io import load_torch_file

    state = load_torch_file(ref_path, "a reference QAMP checkpoint (state_dict)", "reference checkpoint")
    converted, leftovers = split_reference_state_dict(state)
    if "fg_mlp.fc1.weight" not in converted:
        raise ValueError(f"{ref_path}: no 'mlp1.reduce.0.weight': not a reference QAMP checkpoint")
    image_size, backbone = infer_image_size(converted), infer_backbone(converted)
    feature_dim = converted["encoder.reduce1.weight"].shape[0]
    cfg = {"backbone": backbone, "feature_dim": feature_dim, "pretrained_weights": "none",
           "n_mlp_fg": converted["fg_mlp.fc2.weight"].shape[0], "n_mlp_bg": converted["bg_mlp.fc2.weight"].shape[0]}
    model = build_model(cfg, image_size)
    # The reference's BN buffers num_batches_tracked may be absent in old torchvision saves: take ours.
    own = model.state_dict()
    filled = [k for k in own if k.endswith("num_batches_tracked") and k not in converted]
    for k in filled:
        converted[k] = own[k]
    check_state_dict(model, converted, source=str(ref_path))
    meta = converted_meta({k: v for k, v in cfg.items() if k != "pretrained_weights"}, image_size, dataset,
                          orientation)
    with atomic_write(out_path) as tmp:
        torch.save({"model": converted, "meta": meta, "config": None, "image_size": list(image_size),
                    "backbone": backbone, "converted_from": ref_path.name}, tmp)
    return {"converted": len(converted) - len(filled), "leftovers": leftovers, "image_size": list(image_size),
            "backbone": backbone, "out": str(out_path), "meta": meta}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", type=Path, help="state dict saved by the reference QAMP code")
    parser.add_argument("out", type=Path, help="converted checkpoint to write")
    parser.add_argument("--dataset", default=None,
                        help="dataset the checkpoint was trained on (CHAOST2, SABS, Prostate_MRI, CMR): its class "
                             "names, PGQP thresholds and scan orientation go into the checkpoint's meta")
    parser.add_argument("--orientation", default=None,
                        help="ITK orientation code of the training scans (default: the dataset's, data/registry.py: "
                             "CHAOST2 LAS, SABS LPS)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    if not args.ref.is_file():
        parser.error(f"reference checkpoint {args.ref} does not exist")
    report = convert_file(args.ref, args.out, args.overwrite, args.dataset, args.orientation)
    print(f"converted {report['converted']} tensors ({report['backbone']}, image size "
          f"{report['image_size'][0]} x {report['image_size'][1]}) -> {report['out']}")
    print(f"left over ({len(report['leftovers'])}): {report['leftovers'] if report['leftovers'] else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
