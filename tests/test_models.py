"""Model tests (CPU, ResNet-50, 32-64 px): prototype counts, QPG, edge bands, PGQP, sampling,
the fast MLP against the reference computation, batched segmentation, seeding, weights, converter."""
from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy import ndimage

from models import build_model, check_state_dict, load_pretrained, make_generator
from tools.convert import PREFIX_MAP, convert_file, main as convert_main, split_reference_state_dict
from models.decoder import conv3x3_winograd
from models.encoder import Encoder
from models.mgsp import N_MAP, PrototypeMLP, edge_bands, folded_weight, mlp_prototypes
from models.pgqp import query_prototypes
from models.qamp import ModelConfig
from models.qpg import query_prior
from models.sampling import UpsampleGrid, draw_positions

SIZE = 32  # image size of the full-model tests (features 8 x 8)
SMALL = {"backbone": "resnet50", "pretrained_weights": "none"}


def _episode(size: int = SIZE, n_shots: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    supp = torch.randn(1, n_shots, 3, size, size, generator=g)
    masks = torch.zeros(1, n_shots, size, size)
    masks[..., size // 4: size // 2 + 3, size // 4 + 1: 3 * size // 4] = 1
    qry = torch.randn(1, 3, size, size, generator=g)
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, size // 4 + 2: size // 2 + 5, size // 4: 3 * size // 4 - 2] = 1
    return supp, masks, qry, labels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # parameter init only
    return build_model(SMALL, SIZE).eval()


# ---- configuration and counts ------------------------------------------------------------------
def test_default_prototype_counts_are_152_and_652(model):
    cfg = ModelConfig()
    assert (cfg.n_fg, cfg.n_bg) == (152, 652)
    assert model.fg_decoder.in_conv.weight.shape[:2] == (150, 152)
    assert model.bg_decoder.in_conv.weight.shape[:2] == (650, 652)
    assert model.fg_mlp.fc1.weight.shape == (100, SIZE * SIZE)
    assert model.bg_mlp.fc2.weight.shape == (600, 600)
    supp, masks, qry, _ = _episode()
    with torch.no_grad():
        state = model.encode_support(supp, masks, generator=make_generator(0))
        out = model._predict(state, *model.encoder(qry), model._grid(state.feats), make_generator(0))
    assert out["fg_prototypes"].shape[1] == 152 and out["bg_prototypes"].shape[1] == 652


def test_counts_follow_config_keys():
    cfg = ModelConfig(n_query_fg=7, n_keep_fg=9, n_edge=4, n_query_bg=3, n_keep_bg=11, n_mlp_bg=20)
    assert (cfg.n_fg, cfg.n_bg) == (7 + 9 + 4 + N_MAP, 3 + 11 + 4 + N_MAP)
    with pytest.raises(ValueError, match="n_keep_bg"):
        ModelConfig.from_config({"n_keep_bg": 700})


# ---- sampling and upsampling algebra -----------------------------------------------------------
def test_draw_positions_rules():
    g = make_generator(3)
    cand = torch.zeros(100, dtype=torch.bool)
    cand[[5, 17, 40, 41, 99]] = True
    many = draw_positions(cand, 4, g)
    assert len(set(many.tolist())) == 4 and set(many.tolist()) <= {5, 17, 40, 41, 99}
    few = draw_positions(cand, 12, g)  # 12 = 2 * 5 + 2: 2 random, then all twice in raster order
    assert few[2:].tolist() == [5, 17, 40, 41, 99] * 2 and set(few[:2].tolist()) <= {5, 17, 40, 41, 99}
    assert draw_positions(torch.zeros(10, dtype=torch.bool), 3, g) is None
    assert draw_positions(cand, 0, g).numel() == 0


def test_upsample_grid_matches_interpolate():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 5, 7, generator=g)
    grid = UpsampleGrid((5, 7), (17, 23), torch.device("cpu"))
    up = F.interpolate(feats[None], size=(17, 23), mode="bilinear", align_corners=True)[0]
    pos = torch.tensor([0, 5, 100, 17 * 23 - 1, 222])
    torch.testing.assert_close(grid.columns(feats, pos), up.flatten(1)[:, pos].T)
    mask = (torch.rand(17, 23, generator=g) > 0.6).float()
    reference_map = (up * mask).sum(dim=(1, 2)) / (mask.sum() + 1e-5)
    torch.testing.assert_close(grid.masked_average(feats[None], mask[None])[0], reference_map)
    a = torch.randn(17, 23, generator=g)  # adjoint: <up(F), A> = <F, up^T(A)>
    torch.testing.assert_close((up[0] * a).sum(), (feats[0] * grid.adjoint(a)).sum())


# ---- QPG -----------------------------------------------------------------------------------------
def test_query_prior_equals_formula_on_hand_example():
    fq = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # 1 x C=2 x 1 x 2: vectors (1,0) and (0,1)
    p0 = torch.tensor([1.0, 1.0])  # cos = 1/sqrt(2) at both positions
    t = torch.tensor([-3.0])
    cos = 1 / math.sqrt(2)
    expected = 1 - 1 / (1 + math.exp(-(0.5 * (-20 * cos - (-3.0)))))
    out = query_prior(fq, p0, t, scaler=20.0, temperature=0.5)
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out, torch.full((1, 1, 2), expected))
    p1 = torch.tensor([2.0, 0.0])  # cos 1 at the first position, 0 at the second
    out = query_prior(fq, p1, t, 20.0, 0.5)[0, 0]
    assert out[0].item() == pytest.approx(1 - 1 / (1 + math.exp(-0.5 * (-20 + 3))), rel=1e-6)
    assert out[1].item() == pytest.approx(1 - 1 / (1 + math.exp(-0.5 * 3)), rel=1e-6)


# ---- MGSP ----------------------------------------------------------------------------------------
def test_edge_bands_equal_scipy_erosion_dilation():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 40, 36), dtype=bool)
    masks[0, 5:30, 8:20] = True
    masks[1] = ndimage.binary_opening(rng.random((40, 36)) > 0.45)
    masks[2, 0:12, 0:36] = True  # touches the border: outside the image neither erodes nor dilates
    inner, outer = edge_bands(torch.from_numpy(masks).float(), kernel=3, iterations=2)
    ones = np.ones((3, 3), dtype=bool)
    for m, ie, oe in zip(masks, inner.numpy(), outer.numpy()):
        eroded = ndimage.binary_erosion(m, ones, iterations=2, border_value=1)
        dilated = ndimage.binary_dilation(m, ones, iterations=2)
        np.testing.assert_array_equal(ie, (m & ~eroded).astype(np.float32))
        np.testing.assert_array_equal(oe, (dilated & ~m).astype(np.float32))


@pytest.mark.parametrize("mask_kind", ["blob", "large", "full", "empty"])
def test_fast_mlp_equals_reference_computation(mask_kind):
    g = torch.Generator().manual_seed(2)
    H, W, h, w, C = 24, 20, 6, 5, 8
    feats = torch.randn(C, h, w, generator=g, requires_grad=True)
    mask = torch.zeros(H, W)
    if mask_kind == "blob":  # few in-mask positions: columns moved to their source, then spread
        mask[3:11, 4:15] = 1
    elif mask_kind == "large":  # few positions outside: folded W1 @ U corrected there
        mask[2:22, 1:19] = 1
    elif mask_kind == "full":
        mask[:] = 1
    mlp = PrototypeMLP(H * W, 6, p=0.2).train()
    grid = UpsampleGrid((h, w), (H, W), torch.device("cpu"))
    outs, grads = [], []
    for fast, folded in ((True, None), (True, folded_weight(mlp, grid)), (False, None)):
        mlp.zero_grad()
        feats.grad = None
        out = mlp_prototypes(mlp, feats, mask, grid, make_generator(7), fast, folded)  # same draws and dropout
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append((feats.grad.clone(), mlp.fc1.weight.grad.clone(), mlp.fc1.bias.grad.clone()))
    assert outs[0].shape == (6, C)
    for fast in (0, 1):
        torch.testing.assert_close(outs[fast], outs[2], rtol=1e-4, atol=1e-5)
        for a, b in zip(grads[fast], grads[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_full_model_fast_mlp_flag_gives_same_prediction(model):
    supp, masks, qry, _ = _episode()
    slow = build_model({**SMALL, "fast_mlp": False}, SIZE).eval()
    slow.load_state_dict(model.state_dict())
    with torch.no_grad():
        a = model(supp, masks, qry, generator=make_generator(5))["pred"]
        b = slow(supp, masks, qry, generator=make_generator(5))["pred"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- decoder: Winograd convolution ----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 5, 7, 9), (3, 4, 1, 1), (1, 3, 2, 5)])
def test_winograd_conv_equals_direct_convolution_and_its_gradients(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, shape[1], 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    direct, wino = F.conv2d(x, w, padding=1), conv3x3_winograd(x, w)
    assert wino.shape == direct.shape
    torch.testing.assert_close(wino, direct, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(direct.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(direct, (x, w), upstream), torch.autograd.grad(wino, (x, w), upstream)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_winograd_conv_rejects_a_non_3x3_weight():
    with pytest.raises(ValueError, match=r"expected weight O x 4 x 3 x 3, got \(2, 4, 5, 5\)"):
        conv3x3_winograd(torch.zeros(1, 4, 6, 6), torch.zeros(2, 4, 5, 5))


def test_full_model_winograd_flag_gives_same_prediction_and_loss(model):
    supp, masks, qry, labels = _episode()
    direct = build_model({**SMALL, "decoder_winograd": False}, SIZE).eval()
    direct.load_state_dict(model.state_dict())
    assert model.bg_decoder.winograd and not direct.bg_decoder.winograd
    with torch.no_grad():
        a = model(supp, masks, qry, labels, generator=make_generator(5))
        b = direct(supp, masks, qry, labels, generator=make_generator(5))
    torch.testing.assert_close(a["pred"], b["pred"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)


# ---- PGQP ----------------------------------------------------------------------------------------
def test_pgqp_draws_only_where_prior_passes_tau():
    H = W = 12
    grid = UpsampleGrid((H, W), (H, W), torch.device("cpu"))  # identity: columns are the features
    feats = torch.arange(H * W, dtype=torch.float32).view(1, H, W)  # channel 0 = flat position
    prior = torch.rand(H, W, generator=torch.Generator().manual_seed(0))
    for tau, n in ((0.5, 20), (0.9, 30), (0.99, 5)):
        drawn = query_prototypes(feats, prior, tau, n, grid, make_generator(1))[:, 0].long()
        assert drawn.shape == (n,)
        assert bool((prior.flatten()[drawn] > tau).all())
    assert bool((query_prototypes(feats, prior, 0.999999, 4, grid, make_generator(1)) == 0).all())


# ---- model behaviour -----------------------------------------------------------------------------
def test_forward_outputs_and_losses(model):
    supp, masks, qry, labels = _episode()
    model.train()
    try:
        out = model(supp, masks, qry, labels, generator=make_generator(0))
    finally:
        model.eval()
    assert out["pred"].shape == (1, 2, SIZE, SIZE) and out["prior"].shape == (1, SIZE, SIZE)
    torch.testing.assert_close(out["pred"].sum(dim=1), torch.ones(1, SIZE, SIZE))
    assert set(out["losses"]) == {"query", "align", "proto", "boundary"}
    cfg = ModelConfig()
    expected = sum(w * out["losses"][k] for k, w in (("query", 1.0), ("align", cfg.align_weight),
                                                    ("proto", cfg.proto_weight), ("boundary", cfg.boundary_weight)))
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert model.fg_mlp.fc1.weight.grad is not None and model.encoder.reduce1.weight.grad is not None
    model.zero_grad()


def test_batched_segment_equals_per_slice_and_forward(model):
    supp, masks, _, _ = _episode(n_shots=2)
    qry = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        g = make_generator(11)
        batched = model.segment(model.encode_support(supp, masks, generator=g), qry, generator=g)
        g = make_generator(11)
        state = model.encode_support(supp, masks, generator=g)
        single = [model.segment(state, qry[i:i + 1], generator=g) for i in range(3)]
        whole = model(supp, masks, qry[:1], generator=make_generator(11))
    for key in ("pred", "prior"):
        torch.testing.assert_close(batched[key], torch.cat([s[key] for s in single]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole["pred"], batched["pred"][:1], rtol=1e-4, atol=1e-5)


def test_same_seed_same_output_and_classes_independent(model):
    supp, masks, qry, _ = _episode()
    with torch.no_grad():
        a = model(supp, masks, qry, generator=make_generator(2025, 1))["pred"]
        model(supp, masks, qry, generator=make_generator(2025, 6))  # another class in between
        b = model(supp, masks, qry, generator=make_generator(2025, 1))["pred"]
        c = model(supp, masks, qry, generator=make_generator(2025, 2))["pred"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another class key draws other prototypes
    assert make_generator(1, 2).initial_seed() != make_generator(2, 1).initial_seed()


def test_empty_support_mask_falls_back_to_adnet_prediction(model):
    supp, masks, qry, labels = _episode()
    masks.zero_()
    with torch.no_grad():
        out = model(supp, masks, qry, labels, generator=make_generator(0))
    torch.testing.assert_close(out["pred"], torch.stack([1 - out["prior"], out["prior"]], dim=1))
    assert out["losses"]["proto"].item() == 0.0


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_errors(model):
    supp, masks, qry, _ = _episode(size=48)
    with pytest.raises(ValueError, match="built for 32 x 32 images .*got 48 x 48"):
        model(supp, masks, qry, generator=make_generator(0))
    supp, masks, qry, _ = _episode()
    with pytest.raises(ValueError, match="generator"):
        model(supp, masks, qry)
    for key in ("n_way", "n_query"):
        with pytest.raises(ValueError, match=f"{key}=2 is not supported"):
            build_model({**SMALL, key: 2}, SIZE)
    with pytest.raises(ValueError, match="model: expected one of"):
        build_model({**SMALL, "model": "unet"}, SIZE)


def test_check_state_dict_names_differing_tensors(model):
    check_state_dict(model, model.state_dict())  # fits
    other_size = {k: v for k, v in model.state_dict().items()}
    other_size["fg_mlp.fc1.weight"] = torch.zeros(100, 48 * 48)
    expected = r"(?s)fg_mlp\.fc1\.weight: model \(100, 1024\), ckpt \(100, 2304\).*image size"
    with pytest.raises(ValueError, match=expected):
        check_state_dict(model, other_size, source="ckpt")
    adnet_sd = build_model({**SMALL, "model": "adnet"}, SIZE).state_dict()
    with pytest.raises(ValueError, match=r"(?s)missing \(18\): bg_decoder.head.weight.*another model"):
        check_state_dict(model, adnet_sd)
    resnet101_sd = build_model({**SMALL, "backbone": "resnet101"}, SIZE).state_dict()
    with pytest.raises(ValueError, match=r"(?s)unexpected \(\d+\): encoder\.backbone\.layer3\.10.*another backbone"):
        check_state_dict(model, resnet101_sd)
    with pytest.raises(ValueError, match="tools.convert"):
        check_state_dict(model, {"mlp1.reduce.0.weight": torch.zeros(1)})


# ---- pretrained weights --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50_state():
    torch.manual_seed(1)
    return torchvision.models.resnet50(weights=None).state_dict()


def test_load_pretrained_both_layouts(tmp_path, resnet50_state, caplog, monkeypatch):
    monkeypatch.delenv("QAMP_PRETRAINED_PATH", raising=False)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(resnet50_state, imagenet)
    deeplab = tmp_path / "deeplab.pth"
    torch.save({**{f"backbone.{k}": v for k, v in resnet50_state.items() if not k.startswith("fc.")},
                "classifier.4.weight": torch.zeros(21, 256, 1, 1)}, deeplab)
    for path, kind, n_expected in ((imagenet, "imagenet", len(resnet50_state)),
                                   (deeplab, "deeplabv3", len(resnet50_state) - 2)):
        encoder = Encoder("resnet50")
        with caplog.at_level(logging.INFO, logger="qamp"):
            n = load_pretrained(encoder, kind, str(path), "resnet50")
        assert n == n_expected
        own = encoder.state_dict()
        torch.testing.assert_close(own["backbone.layer3.2.conv2.weight"],
                                   resnet50_state["layer3.2.conv2.weight"])
        assert f"loaded {n_expected} pretrained tensors" in caplog.text
        assert hashlib.sha256(path.read_bytes()).hexdigest() in caplog.text
    # the environment variable overrides the configured path
    monkeypatch.setenv("QAMP_PRETRAINED_PATH", str(imagenet))
    n = load_pretrained(Encoder("resnet50"), "imagenet", str(tmp_path / "nowhere.pth"), "resnet50")
    assert n == len(resnet50_state)


def test_load_pretrained_errors(tmp_path, resnet50_state, monkeypatch):
    monkeypatch.delenv("QAMP_PRETRAINED_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(Encoder("resnet50"), "deeplabv3", str(tmp_path / "missing.pth"), "resnet50")
    wrong = tmp_path / "wrong.pth"
    torch.save({"decoder.weight": torch.zeros(3), "head.bias": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(Encoder("resnet50"), "imagenet", str(wrong), "resnet50")
    other_arch = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other_arch)
    with pytest.raises(ValueError, match="another architecture"):
        load_pretrained(Encoder("resnet50"), "imagenet", str(other_arch), "resnet50")
    with pytest.raises(ValueError, match="pretrained_weights: expected one of"):
        load_pretrained(Encoder("resnet50"), "coco", None, "resnet50")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="deeplabv3_resnet50_coco"):
        load_pretrained(Encoder("resnet50"), "deeplabv3", None, "resnet50")


# ---- reference checkpoint converter --------------------------------------------------------------
def test_converter_on_fabricated_reference_state_dict(tmp_path, model):
    inverse = {ours: ref for ref, ours in PREFIX_MAP.items()}
    ours_sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    reference = {}
    for key, value in ours_sd.items():
        prefix = next(p for p in inverse if key.startswith(p))
        reference[inverse[prefix] + key[len(prefix):]] = value
    # section 9 names and shapes at H*W = 32*32
    assert reference["mlp1.reduce.0.weight"].shape == (100, SIZE * SIZE)
    assert reference["mlp2.reduce.2.weight"].shape == (600, 600)
    assert reference["decoder1.res1.0.weight"].shape == (150, 152, 1, 1)
    assert reference["decoder2.res2.2.weight"].shape == (650, 650, 3, 3)
    assert reference["decoder1.down.3.weight"].shape == (1, 150, 1, 1)
    assert reference["encoder.reduce1d.weight"].shape == (1, 1000)
    reference["stray.weight"] = torch.zeros(2)
    converted, leftovers = split_reference_state_dict(reference)
    assert leftovers == ["stray.weight"] and set(converted) == set(ours_sd)
    assert split_reference_state_dict({"module.mlp1.reduce.0.bias": torch.zeros(1)})[0].keys() == {"fg_mlp.fc1.bias"}
    ref_file, out_file = tmp_path / "ref.pth", tmp_path / "out.pth"
    torch.save(reference, ref_file)
    report = convert_file(ref_file, out_file)
    assert report["leftovers"] == ["stray.weight"] and report["image_size"] == [SIZE, SIZE]
    assert report["backbone"] == "resnet50"
    ckpt = torch.load(out_file, weights_only=True)
    fresh = build_model({**SMALL, "model": "qamp"}, ckpt["image_size"])
    fresh.load_state_dict(ckpt["model"])
    for key in ("fg_mlp.fc1.weight", "bg_decoder.head.weight", "encoder.backbone.layer1.0.conv1.weight"):
        torch.testing.assert_close(fresh.state_dict()[key], ours_sd[key])
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_file(ref_file, out_file)
    assert convert_main([str(ref_file), str(out_file), "--overwrite"]) == 0
