"""An encoder initialised from another run of this project (``pretrained_weights='snapshot'``), and
the heads that never read the encoder's threshold not computing it (CPU, ResNet-50, 32-96 px).

Snapshots are written as train.py writes them (``engine.snapshot.build_snapshot`` +
``save_snapshot`` into ``<run>/snapshots/final.pth``): full training state, optimizer included.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from engine.distributed import Distributed
from engine.snapshot import FINAL_NAME, build_snapshot, load_snapshot, save_snapshot, snapshot_meta
from helpers import TINY_HEAD
from models import MODEL_KEYS, build_model, load_pretrained

SMALL = {"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64}
SIZE = 32
SIZES = {"adnet": 32, "alpnet": 64}  # ALPNet at 64 px: 16 x 16 features, pooling windows of 2 (train) / 1 (eval) cells


def _episode(size: int, seed: int = 0):
    """Noise with a bright square in support and query, and their masks."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(size, size)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    supp = torch.randn(1, 1, 3, size, size, generator=g) * 0.3 + 2 * mask
    qry = torch.randn(1, 3, size, size, generator=g) * 0.3 + 2 * mask.roll(2, dims=1)
    return supp, mask[None, None], qry, mask.roll(2, dims=1)[None].long()


def _build(cfg: dict, size: int = SIZE, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # parameter init only
    return build_model({**SMALL, **cfg}, size)


def _write_run(folder: Path, cfg: dict, size: int = SIZE, seed: int = 0, steps: int = 1) -> Path:
    """A run folder whose final snapshot holds a model trained ``steps`` SGD steps (momentum, so the
    optimizer state is not empty), written the way train.py writes it. Returns the snapshot file."""
    model = _build(cfg, size, seed).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    supp, masks, qry, labels = _episode(size)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(supp, masks, qry, labels, generator=generator)["loss"].backward()
        optimizer.step()
    config = {**SMALL, **cfg, "image_size": size}
    meta = snapshot_meta(config, size, {1: "square"}, model_keys=MODEL_KEYS)
    state = build_snapshot(steps, True, model, optimizer, scheduler, generator, {"loss": [1.0] * steps}, config, [],
                           meta, Distributed())
    return save_snapshot(folder / "snapshots" / FINAL_NAME, state)


@pytest.fixture(scope="module")
def adnet_run(tmp_path_factory) -> Path:
    """An ADNet run folder (ResNet-50, feature_dim 64, one SGD step)."""
    folder = tmp_path_factory.mktemp("adnet_run")
    _write_run(folder, {"model": "adnet"})
    return folder


def _qamp(seed: int = 1, **cfg) -> torch.nn.Module:
    return _build({"model": "qamp", **TINY_HEAD, **cfg}, seed=seed)


# ---- loading ---------------------------------------------------------------------------------------
def test_snapshot_encoder_is_copied_whole_and_the_head_is_untouched(adnet_run, caplog):
    file = adnet_run / "snapshots" / FINAL_NAME
    source = load_snapshot(file)["model"]
    expected = {k[len("encoder."):]: v for k, v in source.items() if k.startswith("encoder.")}
    model = _qamp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(before["encoder.backbone.conv1.weight"], expected["backbone.conv1.weight"])
    with caplog.at_level(logging.INFO, logger="qamp"):
        n = load_pretrained(model.encoder, "snapshot", str(file), "resnet50")
    assert n == len(expected) == len(model.encoder.state_dict())
    own = model.encoder.state_dict()
    for key, value in expected.items():  # reduce1 / reduce2 / fc / reduce1d and BN buffers included
        assert torch.equal(own[key], value), key
    for key, value in model.state_dict().items():
        if not key.startswith("encoder."):
            assert torch.equal(value, before[key]), key  # head tensors untouched
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert model.encoder.pretrained_source == {"kind": "snapshot", "path": str(file), "file": str(file),
                                               "sha256": digest, "tensors": n}
    assert f"loaded {n} pretrained tensors (snapshot)" in caplog.text and digest in caplog.text


def test_run_folder_through_build_model_and_the_new_snapshot_records_its_source(adnet_run, tmp_path):
    file = adnet_run / "snapshots" / FINAL_NAME
    model = _qamp(pretrained_weights="snapshot", pretrained_path=str(adnet_run))  # a run folder: its final snapshot
    source = load_snapshot(file)["model"]
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, source[f"encoder.{key}"]), key
    record = model.encoder.pretrained_source
    assert record["path"] == str(adnet_run) and record["file"] == str(file) and record["kind"] == "snapshot"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = build_snapshot(0, False, model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1),
                           torch.Generator(), {}, {}, [], {"version": 1}, Distributed())
    assert state["meta"]["encoder_init"] == record and state["meta"]["version"] == 1
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() and record["tensors"] > 300


def test_none_records_a_fresh_encoder():
    model = _build({"model": "adnet"})
    assert model.encoder.pretrained_source == {"kind": "none", "path": None, "file": None, "sha256": None,
                                               "tensors": 0}


def test_train_py_run_from_another_heads_run_records_it_in_meta_and_config(adnet_run, phantoms48, tmp_path):
    """End to end: a one-step QAMP run of train.py initialised from the ADNet run folder."""
    from helpers import experiment, tiny_train_config

    config = tiny_train_config(phantoms48, tmp_path / "qamp", pretrained_weights="snapshot",
                               pretrained_path=str(adnet_run), n_steps=1, save_snapshot_every=1, val_interval=0)
    result = experiment().run("train", config_updates=config).result
    snapshot = load_snapshot(result["snapshot"])
    file = adnet_run / "snapshots" / FINAL_NAME
    assert snapshot["meta"]["encoder_init"] == {
        "kind": "snapshot", "path": str(adnet_run), "file": str(file),
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "tensors": len(_qamp().encoder.state_dict())}
    assert snapshot["config"]["pretrained_weights"] == "snapshot"
    assert snapshot["config"]["pretrained_path"] == str(adnet_run)
    # refused by config.py before any data are read
    with pytest.raises(FileNotFoundError, match=r"pretrained_path=.*nowhere.*does not exist"):
        experiment().run("train", config_updates={**config, "pretrained_path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"pretrained_weights='snapshot' needs pretrained_path"):
        experiment().run("train", config_updates={**config, "pretrained_path": None})


# ---- refusals --------------------------------------------------------------------------------------
def test_a_file_without_encoder_tensors_is_refused(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"fg_decoder.head.weight": torch.zeros(2, 3)}, "meta": {}}, plain)
    with pytest.raises(ValueError, match=r"plain\.pth holds no encoder tensor: expected keys "
                                         r"'encoder\.backbone\.conv1\.weight'.*pretrained_weights='deeplabv3'"):
        load_pretrained(_qamp().encoder, "snapshot", str(plain), "resnet50")
    torchvision_like = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, torchvision_like)
    with pytest.raises(ValueError, match="holds no encoder tensor"):
        load_pretrained(_qamp().encoder, "snapshot", str(torchvision_like), "resnet50")


def test_another_backbone_is_refused(tmp_path):
    file = tmp_path / "resnet101.pth"
    torch.save(_build({"model": "adnet", "backbone": "resnet101"}).state_dict(), file)  # a plain state dict
    with pytest.raises(ValueError, match=r"(?s)expected backbone=resnet50, feature_dim=64; found backbone resnet101 "
                                         r"\(23 layer3 blocks\), feature_dim 64\): unexpected \(\d+\): "
                                         r"encoder\.backbone\.layer3\.10.*Set backbone and feature_dim"):
        load_pretrained(_qamp().encoder, "snapshot", str(file), "resnet50")


def test_another_feature_dim_is_refused(tmp_path):
    file = _write_run(tmp_path / "fd32", {"model": "adnet", "feature_dim": 32}, steps=0)
    model = _qamp()
    before = model.encoder.state_dict()["backbone.conv1.weight"].clone()
    with pytest.raises(ValueError, match=r"expected backbone=resnet50, feature_dim=64; found backbone resnet50 "
                                         r"\(6 layer3 blocks\), feature_dim 32\): different shape \(2\): "
                                         r"encoder\.reduce1\.weight: file \(32, 1024, 1, 1\), expected \(64, 1024, 1, 1\)"):
        load_pretrained(model.encoder, "snapshot", str(tmp_path / "fd32"), "resnet50")
    assert torch.equal(model.encoder.state_dict()["backbone.conv1.weight"], before)  # nothing half loaded


def test_snapshot_kind_needs_a_path_and_a_final_snapshot(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained_weights='snapshot' needs pretrained_path=<training run folder"):
        load_pretrained(_qamp().encoder, "snapshot", None, "resnet50")
    (tmp_path / "run" / "snapshots").mkdir(parents=True)
    torch.save({}, tmp_path / "run" / "snapshots" / "step_0000002.pth")
    with pytest.raises(FileNotFoundError, match=r"pretrained_path=.*run.*holds no final snapshot.*step_0000002"):
        load_pretrained(_qamp().encoder, "snapshot", str(tmp_path / "run"), "resnet50")
    with pytest.raises(FileNotFoundError, match=r"pretrained_path=.*nowhere.*does not exist"):
        load_pretrained(_qamp().encoder, "snapshot", str(tmp_path / "nowhere"), "resnet50")


# ---- heads that never read the threshold do not compute it -------------------------------------------
def _full_path(model: torch.nn.Module) -> None:
    """Make ``model.encoder`` compute layer4 and the threshold head whatever its caller asks (the old path)."""
    forward = model.encoder.forward
    model.encoder.forward = lambda x, threshold=True: forward(x, threshold=True)


@pytest.mark.parametrize("name", ("adnet", "alpnet"))
def test_skipping_the_threshold_head_changes_no_prediction_loss_or_gradient(name):
    size = SIZES[name]
    supp, masks, qry, labels = _episode(size)
    results = []
    for full in (False, True):
        model = _build({"model": name}, size).train()
        if full:
            _full_path(model)
        out = model(supp, masks, qry, labels)
        out["loss"].backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        stats = model.encoder.backbone["layer4"][0].bn1.running_mean.clone()
        with torch.no_grad():
            model.eval()
            state = model.encode_support(supp, masks)
            segmented = model.segment(state, qry)["pred"]
        results.append((out, grads, stats, segmented))
    (skip, skip_grads, skip_stats, skip_seg), (full, full_grads, full_stats, full_seg) = results
    assert torch.equal(skip["pred"], full["pred"]) and torch.equal(skip["loss"], full["loss"])
    assert skip["losses"].keys() == full["losses"].keys()
    for key in skip["losses"]:
        assert torch.equal(skip["losses"][key], full["losses"][key]), key
    assert torch.equal(skip_seg, full_seg)
    assert skip_grads.keys() == full_grads.keys()
    for key, grad in skip_grads.items():  # the same parameters have gradients (DDP's all-reduce relies on it)
        assert (grad is None) == (full_grads[key] is None), key
        assert grad is None or torch.equal(grad, full_grads[key]), key
    assert skip_grads["encoder.backbone.layer4.0.conv1.weight"] is None and skip_grads["encoder.reduce1d.weight"] is None
    # what does differ: layer4's batch-norm statistics no longer move in training mode
    assert torch.equal(skip_stats, torch.zeros_like(skip_stats)) and not torch.equal(full_stats, skip_stats)


def test_encoder_without_threshold_gives_the_same_features_and_runs_under_autocast():
    from engine.amp import Amp

    model = _build({"model": "adnet"})
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, t = model.encoder.eval()(x)
        features, none = model.encoder(x, threshold=False)
    assert none is None and t.shape == (2,) and torch.equal(features, full)
    Amp("bf16", "cpu").apply(model)  # wraps encoder.forward: the keyword and the None pass through
    with torch.no_grad():
        features, none = model.encoder(x, threshold=False)
    assert none is None and features.dtype == torch.float32 and features.shape == full.shape
