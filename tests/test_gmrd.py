"""The GMRD head (``model='gmrd'``, docs/METHOD.md §14; CPU, ResNet-50, 32 px): registration, shapes,
its formulas on hand-made inputs (descriptors, background band, decoder, descriptor loss, fallback),
a few SGD steps on one fixed episode, encode_support + segment, the keys it reads, resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from models import MODEL_CLASSES, MODEL_READS, MODELS, build_model, make_generator
from models import gmrd as gmrd_module
from models.decoder import cosine_maps
from models.gmrd import AUTHORS, GMRD, GMRD_KEYS, background_band
from models.losses import descriptor_loss
from models.mgsp import N_MAP, PrototypeMLP, mlp_prototypes
from models.qpg import query_prior

SIZE = 32
SMALL = {"model": "gmrd", "backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 32,
         "n_mlp_fg": 6, "n_mlp_bg": 10}


def _episode(seed: int = 0, n_shots: int = 1):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    supp_mask = (((y - 16) ** 2 + (x - 15) ** 2) <= 64).float()
    qry_mask = (((y - 17) ** 2 + (x - 14) ** 2) <= 56).long()
    supp = torch.randn(1, n_shots, 3, SIZE, SIZE, generator=g) * 0.3 + 2 * supp_mask
    qry = torch.randn(1, 3, SIZE, SIZE, generator=g) * 0.3 + 2 * qry_mask
    return supp, supp_mask.expand(1, n_shots, SIZE, SIZE).clone(), qry, qry_mask[None]


def _build(seed: int = 0, **keys):
    torch.manual_seed(seed)  # parameter init only
    return build_model({**SMALL, **keys}, SIZE)


@pytest.fixture(scope="module")
def model():
    return _build().eval()


def test_registered_with_the_keys_it_reads(model):
    assert "gmrd" in MODELS and MODEL_CLASSES["gmrd"] is GMRD and isinstance(model, GMRD)
    assert MODEL_READS["gmrd"] == GMRD_KEYS
    assert gmrd_module.AUTHORS_COMMIT.startswith("45ba5c2")
    # n_keep_* are QAMP's: the default 50 / 500 above these MLP widths is not an error for GMRD
    assert model.config.n_keep_fg == 50 > model.config.n_mlp_fg


def test_shapes_and_the_authors_modules(model):
    supp, masks, qry, _ = _episode()
    with torch.no_grad():
        state = model.encode_support(supp, masks, generator=make_generator(0))
        out = model.segment(state, qry, generator=make_generator(0))
    assert state.fg.shape == (6 + N_MAP, 32) and state.bg.shape == (10 + N_MAP, 32)  # every MLP descriptor + 2 MAPs
    assert out["pred"].shape == (1, 2, SIZE, SIZE) and set(out) == {"pred"}  # no query prior
    torch.testing.assert_close(out["pred"].sum(dim=1), torch.ones(1, SIZE, SIZE))
    # moudles.py L9-16 and L27-40: MLP with ReLU and dropout 0.2; decoder 1x1 (P + 2 -> P), two 3x3 (P -> P),
    # 3x3 to 100, channel dropout 0.1, 1x1 to one logit, all bias-free
    assert model.fg_mlp.relu and model.fg_mlp.p == 0.2 and model.bg_mlp.fc2.weight.shape == (10, 10)
    for decoder, n in ((model.fg_decoder, 6), (model.bg_decoder, 10)):
        shapes = [tuple(c.weight.shape) for c in (decoder.in_conv, decoder.res_conv1, decoder.res_conv2,
                                                   decoder.out_conv, decoder.head)]
        assert shapes == [(n, n + 2, 1, 1), (n, n, 3, 3), (n, n, 3, 3), (100, n, 3, 3), (1, 100, 1, 1)]
        assert decoder.p == 0.1 and all(c.bias is None for c in (decoder.in_conv, decoder.out_conv, decoder.head))


# ---- formulas ------------------------------------------------------------------------------------
def test_background_band_is_the_authors_dilation_of_the_background():
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 30, 28), dtype=bool)
    masks[0, 5:22, 6:20] = True
    masks[1] = ndimage.binary_opening(rng.random((30, 28)) > 0.4)
    band = background_band(torch.from_numpy(masks).float(), 3, 2, authors=True).numpy()
    ones = np.ones((3, 3), dtype=bool)
    for m, b in zip(masks, band):  # cv2.dilate(1 - M) - M (fewshot_GMRD.py L305-306): 1 / 0 / -1
        expected = ndimage.binary_dilation(~m, ones, iterations=2).astype(np.float32) - m
        np.testing.assert_array_equal(b, expected)
        eroded = ndimage.binary_erosion(m, ones, iterations=2, border_value=1)
        assert set(np.unique(b[~m])) == {1.0} and set(np.unique(b[eroded])) <= {-1.0}
        assert set(np.unique(b[m & ~eroded])) <= {0.0}
    outer = background_band(torch.from_numpy(masks).float(), 3, 2, authors=False).numpy()
    for m, b in zip(masks, outer):
        np.testing.assert_array_equal(b, (ndimage.binary_dilation(m, ones, iterations=2) & ~m).astype(np.float32))


def test_support_descriptors_are_all_mlp_outputs_in_order_then_two_averages(model):
    supp, masks, _, _ = _episode()
    with torch.no_grad():
        feats, _ = model.encoder(supp[0])
        state = model.encode_support(supp, masks, generator=make_generator(7), feats=feats)
        grid = model._grid(feats)
        g = make_generator(7)  # the same draws: fg fill map, then bg fill map
        fg_mlp = mlp_prototypes(model.fg_mlp, feats[0], masks[0, 0], grid, g, fast=False)
        bg_mlp = mlp_prototypes(model.bg_mlp, feats[0], 1 - masks[0, 0], grid, g, fast=False)
    up = F.interpolate(feats, size=(SIZE, SIZE), mode="bilinear", align_corners=True)[0]  # (C, H, W)

    def average(w):
        return (up * w).sum(dim=(1, 2)) / (w.sum() + 1e-5)

    m = masks[0, 0]
    inner = m - (-F.max_pool2d(-m[None, None], 3, 1, 1)).squeeze()  # one iteration at 32 px (edge_iters None)
    assert model.edge_iters == 1
    band = F.max_pool2d((1 - m)[None, None], 3, 1, 1).squeeze() - m
    torch.testing.assert_close(state.fg, torch.cat([fg_mlp, average(m)[None], average(inner)[None]]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.bg, torch.cat([bg_mlp, average(1 - m)[None], average(band)[None]]),
                               rtol=1e-4, atol=1e-5)


def test_mlp_relu_sits_after_the_dropout():
    mlp = PrototypeMLP(12, 4, p=0.5, relu=True).train()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    out = mlp(x, make_generator(1))
    keep = torch.rand((3, 4), generator=make_generator(1)) >= 0.5
    expected = mlp.fc2(F.relu(mlp.fc1(x) * keep / 0.5))
    torch.testing.assert_close(out, expected)
    mlp.relu = False
    torch.testing.assert_close(mlp(x, make_generator(1)), mlp.fc2(mlp.fc1(x) * keep / 0.5))


def test_prediction_is_the_softmax_of_the_two_decoders(model):
    supp, masks, qry, _ = _episode()
    with torch.no_grad():
        state = model.encode_support(supp, masks, generator=make_generator(0))
        pred = model.segment(state, qry, generator=make_generator(0))["pred"]
        feats, _ = model.encoder(qry)

    def decoder(d, sim):  # moudles.py L42-48, written out
        x = F.relu(F.conv2d(sim, d.in_conv.weight))
        x = F.relu(F.conv2d(F.relu(F.conv2d(x, d.res_conv1.weight, padding=1)), d.res_conv2.weight, padding=1)) + x
        return F.conv2d(F.relu(F.conv2d(x, d.out_conv.weight, padding=1)), d.head.weight)

    def sim(protos):  # cosine of every position with every descriptor (fewshot_GMRD.py L378-381)
        return torch.einsum("chw,pc->phw", F.normalize(feats[0], dim=0), F.normalize(protos, dim=1))[None]

    with torch.no_grad():
        logits = torch.cat([decoder(model.bg_decoder, sim(state.bg)), decoder(model.fg_decoder, sim(state.fg))], 1)
    expected = torch.softmax(F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=True), dim=1)
    torch.testing.assert_close(pred, expected, rtol=1e-4, atol=1e-5)


def test_descriptor_loss_on_a_hand_example():
    g = torch.Generator().manual_seed(0)
    sup_fg, qry_fg = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    sup_bg, qry_bg = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)

    def cos(a, b):
        return float(F.cosine_similarity(a, b, dim=0))

    def intra(s, q):  # each learned support descriptor's best match, plus the two paired averages
        values = [max(cos(s[i], q[j]) for j in range(len(q) - 2)) for i in range(len(s) - 2)]
        return sum(values + [cos(s[-2], q[-2]), cos(s[-1], q[-1])]) / len(s)

    def inter(a, b):
        return max(0.0, sum(cos(x, y) for x in a for y in b) / (len(a) * len(b)))

    expected = 2 - intra(sup_fg, qry_fg) - intra(sup_bg, qry_bg) + inter(sup_fg, sup_bg) + inter(qry_fg, qry_bg)
    assert descriptor_loss(sup_fg, qry_fg, sup_bg, qry_bg).item() == pytest.approx(expected, rel=1e-5)
    same = descriptor_loss(sup_fg, sup_fg, -sup_fg, -sup_fg)  # identical sets, opposite classes: 2 - 1 - 1 + 0 + 0
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_losses_and_their_weights(model):
    supp, masks, qry, labels = _episode()
    model.train()
    try:
        out = model(supp, masks, qry, labels, generator=make_generator(0))
    finally:
        model.eval()
    assert set(out["losses"]) == {"query", "align", "aux"} and "prior" not in out
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in out["losses"].values())
    torch.testing.assert_close(out["loss"], out["losses"]["query"] + out["losses"]["align"]
                               + AUTHORS.aux_weight * out["losses"]["aux"])
    assert AUTHORS.aux_weight == 0.5 and set(out["monitors"]) == {"threshold"}


def test_alignment_and_descriptor_loss_are_skipped_without_predicted_foreground():
    model = _build().train()
    supp, masks, qry, labels = _episode()
    with torch.no_grad():
        model.fg_decoder.head.weight.fill_(-1.0)  # fg logit <= 0 <= bg logit everywhere
        model.bg_decoder.head.weight.fill_(1.0)
    out = model(supp, masks, qry, labels, generator=make_generator(0))
    assert out["losses"]["align"].item() == 0.0 and out["losses"]["aux"].item() == 0.0
    assert out["losses"]["query"].item() > 0


def test_empty_support_falls_back_to_adnet_with_the_query_threshold(model):
    supp, masks, qry, labels = _episode()
    masks.zero_()
    model.train()
    try:
        out = model(supp, masks, qry, labels, generator=make_generator(0))
    finally:
        model.eval()
    with torch.no_grad():
        model.train()
        feats, t = model.encoder(torch.cat([supp[0], qry]))
        model.eval()
    p0 = query_prior(feats[1:], torch.zeros(32), t[1:], 20.0, 0.5)  # zero prototype: MAP over an empty mask
    prior = F.interpolate(p0[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(out["pred"], torch.stack([1 - prior, prior], dim=1).detach(), rtol=1e-4, atol=1e-5)
    assert out["losses"]["aux"].item() == 0.0 and math.isfinite(out["losses"]["align"].item())


# ---- behaviour -----------------------------------------------------------------------------------
def test_forward_equals_encode_support_then_batched_segment(model):
    supp, masks, qry, _ = _episode()
    more = torch.cat([qry, torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        whole = model(supp, masks, qry, generator=make_generator(11))
        g = make_generator(11)
        state = model.encode_support(supp, masks, generator=g)
        batched = model.segment(state, more, generator=g)
        single = [model.segment(state, more[i:i + 1], generator=g) for i in range(3)]
    torch.testing.assert_close(batched["pred"][:1], whole["pred"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched["pred"], torch.cat([s["pred"] for s in single]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="generator"):
        model(supp, masks, qry)


def test_sgd_steps_lower_the_loss_on_a_fixed_episode():
    model = _build().train()
    supp, masks, qry, labels = _episode()
    optimizer = torch.optim.SGD(model.parameters(), lr=2e-2, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(4):
        out = model(supp, masks, qry, labels, generator=make_generator(2))  # the same draws every step
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses) and min(losses[-2:]) < losses[0] - 0.05, losses


def test_two_shots_draw_the_reverse_descriptors_per_shot():
    model = _build().train()
    supp, masks, qry, labels = _episode(n_shots=2)
    masks[0, 1] = 0  # one empty shot: no fallback (the authors' rule: every shot empty, L83)
    out = model(supp, masks, qry, labels, generator=make_generator(0))
    assert all(bool(torch.isfinite(v)) for v in out["losses"].values())
    calls = []
    original = model._support_state
    model._support_state = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    with torch.no_grad():
        model.fg_decoder.head.weight.fill_(1.0)
        model.bg_decoder.head.weight.fill_(-1.0)  # foreground everywhere: the reverse pass runs
    model(supp, masks, qry, labels, generator=make_generator(0))
    assert calls == [2, 1, 1]  # the support once, the query once per shot


# ---- keys ----------------------------------------------------------------------------------------
def test_keys_gmrd_does_not_read_are_refused(tmp_path):
    from helpers import experiment

    ex = experiment()
    log = {"path": {"log_dir": str(tmp_path)}}
    for key, value in (("n_keep_fg", 4), ("use_edge_samples", False), ("dropout", 0.1), ("proto_weight", 0.5)):
        with pytest.raises(ValueError, match=rf"{key}={value!r}: model='gmrd' does not read these QAMP keys"):
            ex.run("print_config", config_updates={"model": "gmrd", key: value, **log})
    ex.run("print_config", config_updates={"model": "gmrd", "n_mlp_fg": 8, "edge_iters": 1, "fast_mlp": False, **log})
    ex.run("print_config", config_updates={"model": "gmrd", **log}, named_configs=["cpu_budget"])


def test_resume_through_train_py_is_bit_exact(phantoms48, tmp_path):
    """train.py with model=gmrd: 2 steps, then resumed to 4, gives the losses and weights of 4 steps straight."""
    from engine.snapshot import load_snapshot
    from helpers import TINY_HEAD, experiment, tiny_train_config

    ex = experiment()

    def config(folder, **updates):
        base = tiny_train_config(phantoms48, tmp_path / folder, model="gmrd", val_interval=0, **updates)
        return {k: v for k, v in base.items() if k not in TINY_HEAD or k in ("feature_dim", "n_mlp_fg", "n_mlp_bg")}

    straight = ex.run("train", config_updates=config("straight")).result
    half = ex.run("train", config_updates=config("resumed", n_steps=2)).result
    resumed = ex.run("train", config_updates=config("resumed", resume=half["run_dir"])).result
    a, b = load_snapshot(straight["snapshot"]), load_snapshot(resumed["snapshot"])
    assert b["step"] == 4 and b["history"]["loss"] == a["history"]["loss"] and "aux" in a["history"]
    assert a["meta"]["model_keys"]["model"] == "gmrd"
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
