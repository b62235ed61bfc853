"""Dilated ResNet encoder of QAMP (docs/METHOD.md §2) and pretrained-weight loading.

``Encoder(x)`` returns the ``feature_dim x H/4 x W/4`` features of layer3 (through ``reduce1``)
and one threshold scalar per image, ``t = reduce1d(fc(avgpool(layer4)))``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torchvision

logger = logging.getLogger("qamp")

BACKBONES = ("resnet101", "resnet50")
PRETRAINED_KINDS = ("deeplabv3", "imagenet", "none")
PRETRAINED_ENV = "QAMP_PRETRAINED_PATH"
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

    Shapes: ``forward(x: N x 3 x H x W) -> (N x feature_dim x ceil(H/4) x ceil(W/4), N)``.
    ``reduce2`` (layer4 -> feature_dim) is kept so that reference checkpoints load, but it is not
    computed: the reference computes it and never uses the result.
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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b["maxpool"](b["relu"](b["bn1"](b["conv1"](x))))
        x = b["layer3"](b["layer2"](b["layer1"](x)))
        features = self.reduce1(x)  # (N, C, h, w)
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
    """Copy pretrained backbone tensors into ``encoder`` (in place) and return how many were loaded.

    Both key layouts load: DeepLabV3 checkpoints (``backbone.conv1.weight`` ..., its
    ``classifier.*`` heads are ignored) and ImageNet classification checkpoints
    (``conv1.weight`` ..., ``fc.*``), which are mapped under ``backbone.``.

    Args:
        encoder: the encoder to fill.
        kind: 'deeplabv3' | 'imagenet' | 'none' (nothing is loaded, returns 0).
        path: weights file; the environment variable ``QAMP_PRETRAINED_PATH`` overrides it; when both
            are unset the standard torchvision file name is looked up in ``torch.hub.get_dir()/checkpoints``.
        backbone: 'resnet101' | 'resnet50' (selects the default file name).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown ``kind``; the file is not a state dict; no key matches; a matching key
            has another shape (weights of another architecture).
    """
    if kind not in PRETRAINED_KINDS:
        raise ValueError(f"pretrained_weights: expected one of {PRETRAINED_KINDS}, got {kind!r}")
    if kind == "none":
        return 0
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
    logger.info("loaded %d pretrained tensors (%s) from %s (sha256 %s); %d backbone tensors keep their init%s",
                len(matched), kind, file, _sha256(file), len(missing),
                f" (e.g. {missing[:3]})" if missing else "")
    return len(matched)
