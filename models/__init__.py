"""QAMP models: ``build_model(cfg, image_size)`` and helpers the training / test scripts use.

Seeding rule for evaluation: one generator per (run seed, test class), e.g.
``make_generator(cfg['seed'], class_id)``, so the numbers of one class do not depend on which
other classes are tested. Training: one generator per run (``make_generator(cfg['seed'])``),
whose state goes into the snapshot for exact resume.
"""
from __future__ import annotations

import hashlib
from dataclasses import fields
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from models.adnet import ADNet
from models.alpnet import ALPNet
from models.encoder import BACKBONES, PRETRAINED_KINDS, Encoder, load_pretrained
from models.qamp import COMPUTE_ONLY_KEYS, QAMP, ModelConfig, SupportState
from models.panet import PANet
from models.qnet import QNet
from models.gmrd import GMRD, GMRD_KEYS

MODELS = ("qamp", "adnet", "alpnet", "qnet", "panet", "gmrd")  # networks; config.py adds the test-only baseline 'copy_support'
# adnet, alpnet, qnet: the authors' heads on our encoder
MODEL_CLASSES = {"qamp": QAMP, "adnet": ADNet, "alpnet": ALPNet, "qnet": QNet, "panet": PANet, "gmrd": GMRD}
# Names of the per-step values the networks return under "monitors" (not losses; train.py logs them).
MODEL_MONITORS = ("threshold", "fg_local_prototypes", "bg_local_prototypes", "empty_bg_set")
# The ModelConfig keys the baseline heads read (the encoder's); every other number of theirs is the
# authors' constant, so QAMP's keys given explicitly with model='adnet' / 'alpnet' are refused (config.py).
BASELINE_KEYS = ("backbone", "feature_dim")
QNET_KEYS = ("qnet_alpha", "qnet_refine_iters")  # ModelConfig fields only Q-Net reads (models/qnet.py)
# The ModelConfig keys each network reads; the others, given explicitly, are refused (config.py), since
# they would be accepted and ignored.
MODEL_READS = {"qamp": tuple(f.name for f in fields(ModelConfig) if f.name not in QNET_KEYS),
               "adnet": BASELINE_KEYS, "alpnet": BASELINE_KEYS, "panet": BASELINE_KEYS, "qnet": BASELINE_KEYS + QNET_KEYS,
               "gmrd": GMRD_KEYS}  # GMRD: the encoder's, its descriptor counts and bands (models/gmrd.py)
# Config keys that define the model of a snapshot (its meta's ``model_keys``, engine/snapshot.py): the
# network, the image size and ModelConfig's fields except the compute-only switches. test.py and
# predict.py build the model with a snapshot's values; callers of engine.snapshot pass this list.
MODEL_KEYS = ("model", "image_size") + tuple(f.name for f in fields(ModelConfig) if f.name not in COMPUTE_ONLY_KEYS)
# Model keys that act at test time only (training never reads them; the validation curve does): a
# snapshot records them as its default, and a test run may give another value (engine/snapshot.py
# load_model, engine/snapshot_config.py), e.g. test.py with qnet_refine_iters=0 for Q-Net unrefined.
TEST_TIME_KEYS = ("qnet_refine_iters",)

__all__ = ["build_model", "load_pretrained", "make_generator", "check_state_dict", "check_episode_config",
           "ModelConfig", "QAMP", "ADNet", "ALPNet", "PANet", "QNet", "GMRD", "Encoder", "SupportState", "MODELS", "MODEL_KEYS", "MODEL_MONITORS", "BASELINE_KEYS", "BACKBONES",
           "PRETRAINED_KINDS", "QNET_KEYS", "MODEL_READS", "TEST_TIME_KEYS"]


def check_episode_config(cfg: Mapping[str, Any]) -> None:
    """Only 1-way, 1-query episodes are implemented (classes are tested one at a time).

    Raises:
        ValueError: ``n_way`` or ``n_query`` other than 1 (missing keys count as 1).
    """
    for key in ("n_way", "n_query"):
        if cfg.get(key, 1) != 1:
            raise ValueError(f"{key}={cfg[key]!r} is not supported: only 1-way, 1-query episodes are implemented "
                             f"(classes are tested one at a time); set {key}=1")


def build_model(cfg: Mapping[str, Any], image_size: Union[int, tuple[int, int]]) -> nn.Module:
    """Build the model named by ``cfg['model']`` for ``image_size`` images and load its backbone weights.

    Args:
        cfg: flat config (keys of ``ModelConfig`` plus model, pretrained_weights, pretrained_path,
            n_way, n_query).
        image_size: ``H`` (square) or ``(H, W)`` of the data.

    Raises:
        ValueError: unknown model; ``n_way`` or ``n_query`` other than 1; bad hyper-parameters;
            weights problems (see ``load_pretrained``).
    """
    check_episode_config(cfg)
    name = cfg.get("model", "qamp")
    if name not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    config = ModelConfig.from_config(cfg, model=name)  # n_keep_* and the ablation switches: QAMP's only
    model = MODEL_CLASSES[name](config, size)
    load_pretrained(model.encoder, cfg.get("pretrained_weights", "deeplabv3"), cfg.get("pretrained_path"),
                    config.backbone)
    return model


def make_generator(seed: int, *keys: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, *keys)`` via SHA-256.

    ``make_generator(seed, class_id)`` gives each test class its own stream.
    """
    text = ",".join(str(int(k)) for k in (seed, *keys))
    derived = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(derived)
    return generator


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "snapshot") -> None:
    """Raise a ValueError naming every tensor that does not fit ``model`` (missing, unexpected, other shape).

    Call it before ``model.load_state_dict`` on a snapshot; ``source`` (e.g. the file name) goes
    into the message.
    """
    if any(key.startswith(("mlp1.", "decoder1.")) for key in state_dict):
        raise ValueError(f"{source} is a checkpoint of the reference QAMP code: convert it first with "
                         "`python -m tools.convert REF.pth OUT.pth`")
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    reshaped_keys = [k for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    reshaped = [f"{k}: model {tuple(own[k].shape)}, {source} {tuple(state_dict[k].shape)}" for k in reshaped_keys]
    if not (missing or unexpected or reshaped):
        return
    lines = [f"{source} does not fit this model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    hints = []
    if any(k.endswith("mlp.fc1.weight") and own[k].shape[1] != state_dict[k].shape[1] for k in reshaped_keys):
        hints.append("the MLP input width is H*W: the snapshot was trained at another image size")
    if any(k.endswith("mlp.fc2.weight") for k in reshaped_keys):
        hints.append("the MLP widths differ: the snapshot has other n_mlp_fg / n_mlp_bg")
    if any(k.startswith(("fg_decoder.", "bg_decoder.")) for k in reshaped_keys):
        hints.append("the decoder widths differ: the snapshot has other prototype counts "
                     "(n_query_*, n_keep_*, n_edge) or ablation switches (use_*_prototypes, use_edge_samples)")
    if any(k.startswith("encoder.reduce") for k in reshaped_keys):
        hints.append("the reduced feature width differs: the snapshot has another feature_dim")
    if any("backbone.layer" in k for k in missing + unexpected):
        hints.append("backbone layers differ: the snapshot uses another backbone (resnet50 / resnet101)")
    if missing == ["threshold"] and not unexpected:
        hints.append("only ADNet's learned 'threshold' is missing: a snapshot of qnet or alpnet, or of the old ADNet head "
                     "(per-image thresholds from the encoder), which the authors' head replaced: retrain")
    elif any(k.startswith(("fg_", "bg_")) or k == "threshold" for k in missing + unexpected):
        hints.append(f"head tensors differ: the snapshot is of another model ({' / '.join(MODELS)}) or prototype "
                     "counts")
    if hints:
        lines.append("  likely cause: " + "; ".join(hints) + ". Use the config the snapshot was trained with")
    raise ValueError("\n".join(lines))
