"""Baseline heads on this project's encoder (CPU, ResNet-50, 32-96 px): the authors' ADNet
(``model='adnet'``) and SSL-ALPNet (``model='alpnet'``). Shapes and ranges, their formulas on
hand-made inputs, a few SGD steps on one fixed episode, encode_support + segment, weights."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from models import MODEL_MONITORS, MODELS, build_model, check_state_dict
from models import adnet as adnet_mod
from models import alpnet as alp
from models.sampling import UpsampleGrid

SMALL = {"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64}
HEADS = ("adnet", "alpnet")
SIZES = {"adnet": 32, "alpnet": 96}  # ALPNet windows: 96 px gives 24 x 24 features, windows of 3 (train) / 1 (test) cells


def _disk(size: int, cy: float, cx: float, r: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((y - cy) ** 2 + (x - cx) ** 2) <= r * r).float()


def _episode(size: int, seed: int = 0):
    """A bright disk on noise in the support and (moved) in the query, with its masks."""
    g = torch.Generator().manual_seed(seed)
    supp_mask = _disk(size, 0.5 * size, 0.5 * size, 0.25 * size)
    qry_mask = _disk(size, 0.55 * size, 0.45 * size, 0.22 * size)
    supp = torch.randn(1, 1, 3, size, size, generator=g) * 0.3 + 2 * supp_mask
    qry = torch.randn(1, 3, size, size, generator=g) * 0.3 + 2 * qry_mask
    return supp, supp_mask[None, None], qry, qry_mask[None].long()


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)  # parameter init only
    return build_model({**SMALL, "model": name}, SIZES[name])


@pytest.fixture(scope="module")
def models():
    return {name: _build(name).eval() for name in HEADS}


# ---- both heads ----------------------------------------------------------------------------------
def test_registered(models):
    assert MODELS[:3] == ("qamp", "adnet", "alpnet") and "qnet" in MODELS  # qnet: tests/test_qnet.py
    assert type(models["adnet"]).__name__ == "ADNet" and type(models["alpnet"]).__name__ == "ALPNet"


@pytest.mark.parametrize("name", HEADS)
def test_outputs_losses_and_monitors(models, name):
    model, size = models[name], SIZES[name]
    supp, masks, qry, labels = _episode(size)
    model.train()
    try:
        out = model(supp, masks, qry, labels)
    finally:
        model.eval()
    pred = out["pred"]
    assert pred.shape == (1, 2, size, size)
    assert bool(((pred >= 0) & (pred <= 1)).all())
    torch.testing.assert_close(pred.sum(dim=1), torch.ones(1, size, size))
    expected = {"adnet": {"query", "align", "threshold"}, "alpnet": {"query", "align"}}[name]
    assert set(out["losses"]) == expected
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in out["losses"].values())
    weights = {"adnet": adnet_mod.LOSS_WEIGHTS, "alpnet": alp.LOSS_WEIGHTS}[name]
    torch.testing.assert_close(out["loss"], sum(weights[k] * v for k, v in out["losses"].items()))
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in out["monitors"].values())
    assert set(out["monitors"]) <= set(MODEL_MONITORS)  # train.py logs them as monitors, not losses
    if name == "adnet":
        assert out["prior"].shape == (1, size, size)
        torch.testing.assert_close(out["prior"], pred[:, 1])
        assert set(out["monitors"]) == {"threshold"} and out["monitors"]["threshold"].item() == -10.0
    else:
        assert out["logits"].shape == (1, 2, size, size)
        torch.testing.assert_close(pred, torch.softmax(out["logits"], dim=1))
        assert set(out["monitors"]) == {"fg_local_prototypes", "bg_local_prototypes", "empty_bg_set"}


@pytest.mark.parametrize("name", HEADS)
def test_sgd_steps_lower_the_loss_and_skip_the_unused_threshold_head(name):
    model = _build(name).train()
    supp, masks, qry, labels = _episode(SIZES[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    unused = model.encoder.reduce1d.weight.detach().clone()
    losses = []
    for _ in range(10):
        out = model(supp, masks, qry, labels)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert model.encoder.reduce1d.weight.grad is None  # per-image threshold head: unused, no gradient
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert torch.equal(model.encoder.reduce1d.weight, unused)  # SGD skipped it (weight decay too)


@pytest.mark.parametrize("name", HEADS)
def test_forward_equals_encode_support_then_segment(models, name):
    model, size = models[name], SIZES[name]
    supp, masks, qry, _ = _episode(size)
    more = torch.cat([qry, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        whole = model(supp, masks, qry)
        state = model.encode_support(supp, masks)
        batched = model.segment(state, more)
        cached = model.segment(model.encode_support(supp, masks, feats=state.feats), qry)
    torch.testing.assert_close(batched["pred"][:1], whole["pred"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached["pred"], whole["pred"], rtol=1e-4, atol=1e-5)
    assert batched["pred"].shape == (3, 2, size, size)


@pytest.mark.parametrize("name", HEADS)
def test_state_dict_round_trip(tmp_path, models, name):
    model = models[name]
    supp, masks, qry, labels = _episode(SIZES[name])
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    fresh = _build(name, seed=1).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(supp, masks, qry)["pred"], model(supp, masks, qry)["pred"])
        state = torch.load(path, weights_only=True)
        check_state_dict(fresh, state)
        fresh.load_state_dict(state)
        a, b = model(supp, masks, qry, labels), fresh(supp, masks, qry, labels)
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["loss"], b["loss"])


def test_check_state_dict_hints_name_the_other_head(models):
    with pytest.raises(ValueError, match=r"(?s)missing \(1\): threshold.*alpnet, or of the old ADNet head"):
        check_state_dict(models["adnet"], models["alpnet"].state_dict())
    with pytest.raises(ValueError, match=r"(?s)unexpected \(1\): threshold.*another model " + re.escape(f"({' / '.join(MODELS)})")):
        check_state_dict(models["alpnet"], models["adnet"].state_dict())


# ---- ADNet ---------------------------------------------------------------------------------------
def test_adnet_prediction_is_the_authors_formula(models):
    model = models["adnet"]
    supp, masks, qry, _ = _episode(32)
    with torch.no_grad():
        out = model(supp, masks, qry)
        feats, _ = model.encoder(torch.cat([supp[0], qry]))
    # prototype: masked average of features up-sampled with align_corners=False (their getFeatures)
    up = F.interpolate(feats[:1], size=(32, 32), mode="bilinear", align_corners=False)
    proto = (up * masks[0][:, None]).sum(dim=(0, 2, 3)) / (masks.sum() + 1e-5)
    torch.testing.assert_close(adnet_mod.support_prototype(feats[:1], masks[0]), proto)
    other = UpsampleGrid((8, 8), (32, 32), torch.device("cpu")).masked_average(feats[:1], masks[0])[0]
    assert not torch.allclose(other, proto, atol=1e-4)  # align_corners=True would be another prototype
    score = -20 * F.cosine_similarity(feats[1:], proto[None, :, None, None], dim=1)
    fg = 1 - torch.sigmoid(0.5 * (score - model.threshold.detach()))
    expected = F.interpolate(fg[:, None], size=(32, 32), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(out["pred"][:, 1], expected, rtol=1e-5, atol=1e-6)


def test_adnet_threshold_is_one_learned_parameter():
    model = _build("adnet").train()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("encoder.")}
    assert shapes == {"threshold": (1,)} and model.threshold.item() == -10.0
    supp, masks, qry, labels = _episode(32)
    out = model(supp, masks, qry, labels)
    assert out["losses"]["threshold"].item() == pytest.approx(-10.0 / 20)
    (grad,) = torch.autograd.grad(out["losses"]["threshold"], model.threshold, retain_graph=True)
    assert grad.item() == pytest.approx(1 / 20)
    out["loss"].backward()
    assert model.threshold.grad is not None and model.threshold.grad.abs().item() > 1e-6
    with torch.no_grad():  # one T for every image: moving it moves every query's prediction
        before = model.segment(model.encode_support(supp, masks), qry)["pred"]
        model.threshold.fill_(0.0)
        after = model.segment(model.encode_support(supp, masks), qry)["pred"]
    assert not torch.allclose(before, after)


def test_adnet_alignment_is_skipped_without_predicted_foreground():
    model = _build("adnet").train()
    supp, masks, qry, labels = _episode(32)
    with torch.no_grad():
        model.threshold.fill_(-1000.0)  # p_fg = 1 - sigmoid(0.5 (S + 1000)) = 0: nothing foreground
        out = model(supp, masks, qry, labels)
        assert out["losses"]["align"].item() == 0.0 and out["losses"]["query"].item() > 0
        model.threshold.fill_(-10.0)
        assert model(supp, masks, qry, labels)["losses"]["align"].item() > 0


# ---- ALPNet --------------------------------------------------------------------------------------
def test_local_prototypes_kept_where_the_pooled_mask_is_over_095(monkeypatch):
    feats = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :4] = 1  # window (0, 0) of 4: 16/16 -> kept
    mask[0, :4, 4:] = 1
    mask[0, 0, 7] = 0  # window (0, 1): 15/16 = 0.9375 -> not kept
    mask[0, 4:, 4:] = 1  # window (1, 1): kept
    kept = alp.local_prototypes(feats, mask, 4)
    assert kept.shape == (2, 2)
    torch.testing.assert_close(kept, torch.stack([feats[0, :, :4, :4].mean(dim=(1, 2)),
                                                  feats[0, :, 4:, 4:].mean(dim=(1, 2))]))
    # window 2: 16 cells, of which (0, 3) holds 3/4 = 0.75; 4 + 3 + 4 fully covered
    assert alp.local_prototypes(feats, mask, 2).shape == (11, 2)
    assert alp.local_prototypes(feats, 1 - mask, 4).shape == (1, 2)  # background: window (1, 0) only
    monkeypatch.setattr(alp, "PROTO_THRESHOLD", 0.75)  # reached exactly by cell (0, 3): strictly >, not kept
    assert alp.local_prototypes(feats, mask, 2).shape == (11, 2)
    assert alp.local_prototypes(feats, torch.full((1, 8, 8), 0.75), 2).shape == (0, 2)
    with pytest.raises(ValueError, match=r"4 x 4 feature map is smaller than the 8 x 8 pooling window"):
        alp.local_prototypes(feats[..., :4, :4], mask[..., :4, :4], 8)


def test_alpnet_windows_cover_the_authors_pixels_at_any_image_size():
    """At 256 px the authors pool 4 and 2 cells of their stride-8 32 x 32 features (32 x 32 and 16 x 16 px,
    config_ssl_upload.py L63, L70-71); on our stride-4 features the same pixels are side / 8 and / 16."""
    for size, (train, test) in {256: (8, 4), 128: (4, 2), 64: (2, 1), 48: (1, 1)}.items():
        side = size // 4
        assert (alp.window_cells(side, alp.TRAIN_GRID), alp.window_cells(side, alp.EVAL_GRID)) == (train, test)
        assert alp.window_cells(side, alp.MODE_GRID) == train
        if size >= 64:
            assert (4 * train, 4 * test) == (32 * size // 256, 16 * size // 256)  # pixels per window
    assert (alp.window_cells(32, alp.TRAIN_GRID), alp.window_cells(32, alp.EVAL_GRID)) == (4, 2)  # their features


def test_alpnet_prototype_counts_follow_the_mask_and_the_mode(models):
    model = models["alpnet"]
    supp, _, _, _ = _episode(96)
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., 32:96, 32:96] = 1  # feature cells 8..23 of 24 exactly (bilinear half-pixel resize)
    # training: window 3, 8 x 8 windows, 5 x 5 inside cells 8..23 (window 2 = cells 6..8 is partial),
    # 64 - 36 background; test: window 1, 16 x 16 of 24 x 24 cells
    expected = {True: (25 + 1, 28), False: (256 + 1, 320)}  # (local + 1 global, local)
    for training, (n_fg, n_bg) in expected.items():
        model.train(training)
        with torch.no_grad():
            state = model.encode_support(supp, mask)
        assert (state.fg.shape[0], state.bg.shape[0]) == (n_fg, n_bg)
    model.eval()
    with torch.no_grad():
        monitors = model(supp, mask, supp[:, 0])["monitors"]
    assert {k: v.item() for k, v in monitors.items()} == {"fg_local_prototypes": 256.0, "bg_local_prototypes": 320.0,
                                                          "empty_bg_set": 0.0}


def test_alpnet_mask_mode_when_no_window_reaches_095(models):
    model = models["alpnet"]
    supp, _, qry, _ = _episode(96)
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., 52:68, 52:68] = 1  # cells 13..16: fills no 3 x 3 window of feature cells (12..14, 15..17)
    model.eval()  # the mode decision's window is side / 8 in both modes; eval's local window (1) would fit
    with torch.no_grad():
        state = model.encode_support(supp, mask)
        out = model.segment(state, qry)
        feats, _ = model.encoder(torch.cat([supp[0], qry]))
    assert state.fg is None
    small = alp.resize_masks(mask[0], (24, 24))
    proto = (feats[:1] * small[:, None]).sum(dim=(0, 2, 3)) / (small.sum() + 1e-5)
    fg = 20 * F.cosine_similarity(feats[1:], proto[None, :, None, None], dim=1, eps=1e-4)
    expected = F.interpolate(fg[:, None], size=(96, 96), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out["logits"][:, 1], expected, rtol=1e-5, atol=1e-5)


def test_alpnet_scores_are_the_softmax_weighted_similarities():
    g = torch.Generator().manual_seed(0)
    feats, protos = torch.randn(1, 5, 3, 3, generator=g), torch.randn(4, 5, generator=g)
    d = 20 * F.cosine_similarity(feats[:, None], protos[None, :, :, None, None], dim=2)  # (1, 4, 3, 3)
    torch.testing.assert_close(alp.prototype_scores(feats, protos), (torch.softmax(d, 1) * d).sum(1, keepdim=True))
    assert torch.equal(alp.prototype_scores(feats, protos[:0]), torch.zeros(1, 1, 3, 3))


def test_alpnet_empty_background_set_gives_zero_background_score(models):
    model = models["alpnet"]
    supp, _, qry, labels = _episode(96)
    full = torch.ones(1, 1, 96, 96)
    model.train()
    try:
        out = model(supp, full, qry, labels)
    finally:
        model.eval()
    assert out["monitors"]["bg_local_prototypes"].item() == 0 and out["monitors"]["empty_bg_set"].item() == 1
    assert torch.equal(out["logits"][:, 0], torch.zeros(1, 96, 96))
    assert all(bool(torch.isfinite(v)) for v in out["losses"].values())


def test_alpnet_alignment_runs_with_an_empty_predicted_foreground():
    g = torch.Generator().manual_seed(0)
    query_feats, supp_feats = torch.rand(1, 6, 16, 16, generator=g), torch.rand(2, 6, 16, 16, generator=g)
    all_background = torch.stack([torch.ones(16, 16), torch.zeros(16, 16)])[None]  # (1, 2, h, w) logits
    masks = torch.zeros(2, 64, 64)
    masks[:, 20:40, 20:40] = 1
    loss, reverse = alp.alignment_loss(query_feats, all_background, supp_feats, masks)
    assert reverse.fg is None and torch.equal(reverse.prototype, torch.zeros(6))  # 'mask' mode, zero prototype
    # every background cell kept: 16 x 16 features, training window 16 // 8 = 2 cells, 8 x 8 windows
    assert reverse.bg.shape == (64, 6) and bool(torch.isfinite(loss)) and loss.item() > 0


def test_qamp_keys_given_with_a_baseline_are_refused(tmp_path):
    """model='adnet' / 'alpnet' read only the encoder's model keys: QAMP's, given explicitly, are refused
    (not accepted and ignored); the same keys from a named config (cpu_budget) are fine."""
    from helpers import experiment

    ex = experiment()
    log = {"path": {"log_dir": str(tmp_path)}}
    with pytest.raises(ValueError, match=r"n_mlp_fg=4: model='adnet' does not read these QAMP keys"):
        ex.run("print_config", config_updates={"model": "adnet", "n_mlp_fg": 4, **log})
    ex.run("print_config", config_updates={"model": "alpnet", "feature_dim": 64, **log})
    ex.run("print_config", config_updates={"model": "adnet", **log}, named_configs=["cpu_budget"])
    ex.run("print_config", config_updates={"model": "qamp", "n_mlp_fg": 4, **log})


@pytest.mark.parametrize("name", HEADS)
def test_resume_through_train_py_is_bit_exact(name, phantoms48, tmp_path):
    """train.py with model=<head>: 2 steps, then resumed to 4, gives the losses and weights of 4
    steps straight (ADNet's T and ALPNet's weights included)."""
    from helpers import TINY_HEAD, experiment, tiny_train_config
    from engine.snapshot import load_snapshot

    ex = experiment()

    def config(folder, **updates):
        # no validation: what it draws is covered by QAMP's resume tests; here it doubled the time
        base = tiny_train_config(phantoms48, tmp_path / folder, model=name, feature_dim=64,
                                 image_size=SIZES[name], val_interval=0, **updates)
        return {k: v for k, v in base.items() if k not in TINY_HEAD or k == "feature_dim"}

    straight = ex.run("train", config_updates=config("straight")).result
    half = ex.run("train", config_updates=config("resumed", n_steps=2)).result
    resumed = ex.run("train", config_updates=config("resumed", resume=half["run_dir"])).result
    a, b = load_snapshot(straight["snapshot"]), load_snapshot(resumed["snapshot"])
    assert b["step"] == 4 and b["history"]["loss"] == a["history"]["loss"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    if name == "adnet":
        assert a["model"]["threshold"].item() != -10.0  # T was trained, and resumed exactly
