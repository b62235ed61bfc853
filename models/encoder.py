"""Dilated ResNet encoder of QAMP (docs/METHOD.md §2) and pretrained-weight loading.

``Encoder(x)`` returns the ``feature_dim x H/4 x W/4`` features of layer3 (through ``reduce1``)
and one threshold scalar per image, ``t = reduce1d(fc(avgpool(layer4)))``;
``Encoder(x, threshold=False)`` returns ``(features, None)`` without computing layer4, avgpool, fc
and ``reduce1d`` (the heads that never read ``t``: ADNet, ALPNet).

Initial weights (``load_pretrained``): torchvision checkpoints ('deeplabv3', 'imagenet': backbone
tensors only) or the encoder of any model of this project ('snapshot': a training run folder or
snapshot file; every encoder tensor, ``reduce1`` / ``reduce2`` / the threshold head included).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torchvision

from utils.run_folder import find_snapshot

logger = logging.getLogger("qamp")

BACKBONES = ("resnet101", "resnet50")
# 'snapshot': the encoder of a run of this project (any head: qamp, adnet, alpnet), pretrained_path=<run | .pth>
PRETRAINED_KINDS = ("deeplabv3", "imagenet", "snapshot", "none")
PRETRAINED_ENV = "QAMP_PRETRAINED_PATH"  # overrides pretrained_path for the torchvision kinds (not 'snapshot')
ENCODER_PREFIX = "encoder."  # the encoder's tensors in a model state dict of this project
# Standard torchvision file names, looked up in torch.hub's checkpoint cache when no path is given.
PRETRAINED_FILES = {
    ("deeplabv3", "resnet101"): "deeplabv3_resnet101_coco-586e9e4e.pth",
    ("deeplabv3", "resnet50"): "deeplabv3_resnet50_coco-cd0a2569.pth",
    ("imagenet", "resnet101"): "resnet101-63fe2227.pth",
    ("imagenet", "resnet50"): "resnet50-0676ba61.pth",
}
LAYER3_CHANNELS = 1024  # ResNet-50/101 bottleneck widths
LAYER4_CHANNELS = 2048
FC_CLASSES = 1000  # torchvision classifier width; the threshold head reads its output


class Encoder(nn.Module):
    """torchvision ResNet with strides of layer2/layer3 replaced by dilation (output stride 4 at layer3).

    Args:
        backbone: 'resnet101' (reference) or 'resnet50'.
        feature_dim: channels of the features QAMP uses (``reduce1`` output).

    Shapes: ``forward(x: N x 3 x H x W) -> (N x feature_dim x ceil(H/4) x ceil(W/4), N)``;
    ``forward(x, threshold=False) -> (features, None)`` skips layer4 and the threshold head.
    ``reduce2`` (layer4 -> feature_dim) is kept so that reference checkpoints load, but it is not
    computed: the reference computes it and never uses the result.

    ``pretrained_source``: where the initial weights came from (set by ``load_pretrained``; None
    before), which ``engine.snapshot.build_snapshot`` stores as the snapshots' ``meta['encoder_init']``.
    """

    def __init__(self, backbone: str = "resnet101", feature_dim: int = 512):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {BACKBONES}, got {backbone!r}")
        resnet = getattr(torchvision.models, backbone)(weights=None, replace_stride_with_dilation=[True, True, False])
        self.backbone = nn.ModuleDict(dict(resnet.named_children()))
        self.reduce1 = nn.Conv2d(LAYER3_CHANNELS, feature_dim, kernel_size=1, bias=False)
        self.reduce2 = nn.Conv2d(LAYER4_CHANNELS, feature_dim, kernel_size=1, bias=False)  # unused, see docstring
        self.reduce1d = nn.Linear(FC_CLASSES, 1)  # threshold head
        self.pretrained_source: Optional[dict[str, Any]] = None  # load_pretrained's record
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, threshold: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``N x 3 x H x W`` -> features ``N x feature_dim x h x w`` and thresholds ``N`` (None when
        ``threshold`` is False: layer4, avgpool, fc and reduce1d are then not computed, so their
        batch-norm statistics do not move either; the features are the same)."""
        b = self.backbone
        x = b["maxpool"](b["relu"](b["bn1"](b["conv1"](x))))
        x = b["layer3"](b["layer2"](b["layer1"](x)))
        features = self.reduce1(x)  # (N, C, h, w)
        if not threshold:
            return features, None
        x = b["layer4"](x)  # (N, 2048, h/2, w/2)
        t = self.reduce1d(b["fc"](torch.flatten(b["avgpool"](x), 1)))  # (N, 1)
        return features, t[:, 0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_pretrained_path(kind: str, path: Optional[str], backbone: str) -> Path:
    """Where the weights file is: env ``QAMP_PRETRAINED_PATH``, else ``path``, else torch.hub's cache."""
    chosen = os.environ.get(PRETRAINED_ENV) or path
    if chosen:
        resolved = Path(chosen).expanduser()
        if not resolved.is_file():
            source = f"environment variable {PRETRAINED_ENV}" if os.environ.get(PRETRAINED_ENV) else "pretrained_path"
            raise FileNotFoundError(
                f"pretrained weights file {resolved} (from {source}) does not exist: point it at the "
                f"{PRETRAINED_FILES.get((kind, backbone), 'weights')} file, or set pretrained_weights='none'")
        return resolved
    name = PRETRAINED_FILES[(kind, backbone)]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        raise FileNotFoundError(
            f"pretrained_weights={kind!r} needs {name}: not found in torch.hub's cache ({cached}). "
            f"Set pretrained_path=<file> (or {PRETRAINED_ENV}), copy the file there, or use pretrained_weights='none'")
    return cached


def _unwrap(state: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                return state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_pretrained(encoder: Encoder, kind: str, path: Optional[str] = None, backbone: str = "resnet101") -> int:
    """Copy pretrained tensors into ``encoder`` (in place) and return how many were loaded.

    'deeplabv3' / 'imagenet' (torchvision files): both key layouts load, DeepLabV3 checkpoints
    (``backbone.conv1.weight`` ..., its ``classifier.*`` heads are ignored) and ImageNet
    classification checkpoints (``conv1.weight`` ..., ``fc.*``), mapped under ``backbone.``;
    ``reduce1`` / ``reduce2`` / ``reduce1d`` keep their init.

    'snapshot': the encoder of a model of this project (``qamp``, ``adnet``, ``alpnet``, any head):
    the ``encoder.*`` tensors of the snapshot's model state dict (optimizer, generator and head
    tensors are not read), every one of them, ``reduce1`` (the ``feature_dim`` projection),
    ``reduce2`` and the threshold head (``fc``, ``reduce1d``) included, with strict names and
    shapes (see ``load_snapshot_encoder``).

    Every kind sets ``encoder.pretrained_source`` = ``{'kind', 'path' (as given), 'file' (read),
    'sha256', 'tensors'}``; the count and the SHA-256 are logged.

    Args:
        encoder: the encoder to fill.
        kind: 'deeplabv3' | 'imagenet' | 'snapshot' | 'none' (nothing is loaded, returns 0).
        path: weights file; for 'snapshot' a training run folder (its final snapshot,
            ``utils.run_folder.find_snapshot``) or a snapshot file. For the torchvision kinds the
            environment variable ``QAMP_PRETRAINED_PATH`` overrides it, and when both are unset the
            standard torchvision file name is looked up in ``torch.hub.get_dir()/checkpoints``.
        backbone: 'resnet101' | 'resnet50' (selects the default file name; named in errors).

    Raises:
        FileNotFoundError: the file (or the run folder's final snapshot) does not exist.
        ValueError: unknown ``kind``; 'snapshot' without ``path``; the file is not a state dict or
            snapshot; no key matches; a matching key has another shape (weights of another
            architecture); 'snapshot': an encoder of another backbone or ``feature_dim``.
    """
    if kind not in PRETRAINED_KINDS:
        raise ValueError(f"pretrained_weights: expected one of {PRETRAINED_KINDS}, got {kind!r}")
    if kind == "none":
        encoder.pretrained_source = {"kind": "none", "path": None, "file": None, "sha256": None, "tensors": 0}
        return 0
    if kind == "snapshot":
        given = None if path is None else str(path)
        count, file = load_snapshot_encoder(encoder, path, backbone)
        note = f": every encoder tensor (backbone, reduce1, reduce2, fc, reduce1d), pretrained_path={given!r}"
    else:
        given = os.environ.get(PRETRAINED_ENV) or (None if path is None else str(path))
        count, file, note = _load_torchvision(encoder, kind, path, backbone)
    digest = _sha256(file)
    encoder.pretrained_source = {"kind": kind, "path": given, "file": str(file), "sha256": digest, "tensors": count}
    logger.info("loaded %d pretrained tensors (%s) from %s (sha256 %s)%s", count, kind, file, digest, note)
    return count


def _load_torchvision(encoder: Encoder, kind: str, path: Optional[str], backbone: str) -> tuple[int, Path, str]:
    """The 'deeplabv3' / 'imagenet' part of ``load_pretrained``: ``(tensors loaded, file, log note)``."""
    file = resolve_pretrained_path(kind, path, backbone)
    from utils.io import load_torch_file

    key = PRETRAINED_ENV if os.environ.get(PRETRAINED_ENV) else "pretrained_path"
    state = _unwrap(load_torch_file(file, f"{kind} {backbone} weights (a state_dict)", key), file)
    own = encoder.state_dict()
    matched: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key if key.startswith("backbone.") else f"backbone.{key}"
        if name in own:
            if own[name].shape != value.shape:
                raise ValueError(f"{file}: tensor {key} has shape {tuple(value.shape)}, the {backbone} encoder "
                                 f"expects {tuple(own[name].shape)}: weights of another architecture? "
                                 "Set backbone to match the file")
            matched[name] = value
    if not matched:
        raise ValueError(f"{file}: no tensor matches the {backbone} encoder (expected keys like "
                         "'backbone.conv1.weight' or 'conv1.weight'): not a ResNet checkpoint?")
    encoder.load_state_dict(matched, strict=False)
    backbone_keys = [k for k in own if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    missing = [k for k in backbone_keys if k not in matched]
    note = f"; {len(missing)} backbone tensors keep their init" + (f" (e.g. {missing[:3]})" if missing else "")
    return len(matched), file, note


def load_snapshot_encoder(encoder: Encoder, path: Optional[str], backbone: str = "resnet101") -> tuple[int, Path]:
    """Copy the encoder of a snapshot of this project into ``encoder``: ``(tensors loaded, file read)``.

    Every tensor of ``encoder.state_dict()`` (parameters and batch-norm buffers: backbone layers,
    ``reduce1``, ``reduce2``, ``fc``, ``reduce1d``) is taken from the snapshot model's
    ``encoder.<name>``, with the same names and shapes: nothing is left at its init and nothing is
    reshaped, so a snapshot of another backbone (other layer3 blocks) or ``feature_dim`` (other
    ``reduce1`` / ``reduce2``) is refused rather than half loaded.

    Args:
        encoder: the encoder to fill (in place).
        path: a training run folder (its final snapshot) or a snapshot / model state_dict file.
        backbone: this encoder's backbone, named in errors.

    Raises:
        ValueError: ``path`` is None; the file is not a snapshot or state dict; it holds no
            ``encoder.*`` tensor; its encoder has missing / unexpected / other-shape tensors.
        FileNotFoundError: no such file or folder, or a run folder without a final snapshot.
    """
    if not path:
        raise ValueError("pretrained_weights='snapshot' needs pretrained_path=<training run folder or snapshot file> "
                         "(a run folder means its final snapshot, <run>/snapshots/final.pth); got "
                         f"pretrained_path={path!r}")
    try:
        file = find_snapshot(Path(path).expanduser(), which="final")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pretrained_path={str(path)!r} (pretrained_weights='snapshot'): {err}") from None
    from utils.io import load_torch_file

    obj = load_torch_file(file, "a snapshot of this project (<run>/snapshots/*.pth) or a model state_dict",
                          "pretrained_path")
    tensors = _snapshot_encoder_tensors(obj, file)
    _check_encoder_fit(encoder, tensors, file, backbone)
    encoder.load_state_dict(tensors, strict=True)
    return len(tensors), file


def _snapshot_encoder_tensors(obj: object, file: Path) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` tensors of a snapshot's (or plain state dict's) model, under the Encoder's names."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"pretrained_path: {file}: expected a snapshot (a dict with 'model': the model's "
                         f"state_dict) or a state_dict, got {type(obj).__name__}")
    state = obj.get("model")
    if not isinstance(state, Mapping):
        if not (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise ValueError(f"pretrained_path: {file}: expected a snapshot of this project (a dict with 'model': "
                             f"the model's state_dict, as train.py writes) or a model state_dict, got a dict with "
                             f"keys {sorted(map(str, obj))[:6]}; point pretrained_path at a run folder or its "
                             "snapshots/*.pth")
        state = obj
    tensors = {k[len(ENCODER_PREFIX):]: v for k, v in state.items()
               if isinstance(k, str) and k.startswith(ENCODER_PREFIX) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"pretrained_path: {file} holds no encoder tensor: expected keys "
                         f"'{ENCODER_PREFIX}backbone.conv1.weight', ... in its model state dict, found "
                         f"{len(state)} keys like {sorted(map(str, state))[:3]}. Use a snapshot of a model of this "
                         "project (qamp, adnet, alpnet); torchvision weights load with pretrained_weights="
                         "'deeplabv3' or 'imagenet'")
    return tensors


def _describe_encoder(tensors: Mapping[str, torch.Tensor]) -> str:
    """'backbone resnet50 (6 layer3 blocks), feature_dim 64' from an encoder's tensors."""
    blocks = {int(k.split(".")[2]) for k in tensors if k.startswith("backbone.layer3.") and k.split(".")[2].isdigit()}
    names = {6: "resnet50", 23: "resnet101"}  # torchvision's layer3 block counts
    layer3 = f"backbone {names.get(len(blocks), 'unknown')} ({len(blocks)} layer3 blocks)"
    reduce1 = tensors.get("reduce1.weight")
    return layer3 + (f", feature_dim {reduce1.shape[0]}" if reduce1 is not None else ", no reduce1")


def _check_encoder_fit(encoder: Encoder, tensors: Mapping[str, torch.Tensor], file: Path, backbone: str) -> None:
    """Raise a ValueError naming every missing, unexpected or other-shape encoder tensor of ``file``."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    reshaped = [f"{ENCODER_PREFIX}{k}: file {tuple(tensors[k].shape)}, expected {tuple(own[k].shape)}"
                for k in sorted(set(own) & set(tensors)) if own[k].shape != tensors[k].shape]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    for title, items in (("missing", [ENCODER_PREFIX + k for k in missing]),
                         ("unexpected", [ENCODER_PREFIX + k for k in unexpected]), ("different shape", reshaped)):
        if items:
            parts.append(f"{title} ({len(items)}): " + "; ".join(items[:4]) + (" ..." if len(items) > 4 else ""))
    expected = f"backbone={backbone}, feature_dim={own['reduce1.weight'].shape[0]}"
    raise ValueError(f"pretrained_path: the encoder of {file} does not fit this model's encoder (expected {expected}; "
                     f"found {_describe_encoder(tensors)}): " + "; ".join(parts)
                     + ". Set backbone and feature_dim to the snapshot's values, or use a snapshot trained with these")
