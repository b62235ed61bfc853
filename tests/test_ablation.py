"""QAMP's ablation switches (``ModelConfig.use_*``, docs/METHOD.md §3.7; CPU, ResNet-50, 32 px): each
at its off value really removes its part (no draws, narrower decoders, no parameters, no loss term),
invalid combinations and keys of a part switched off are refused, and with every addition of QAMP
over GMRD off, QAMP computes what GMRD computes except for the differences docs/DIFFERENCES.md lists."""
from __future__ import annotations

import pytest
import torch

import models.mgsp as mgsp
import models.qamp as qamp_module
from models import MODEL_KEYS, build_model, make_generator
from models.gmrd import GMRD, QAMP_PARTS
from models.mgsp import N_MAP
from models.qamp import ABLATION_KEYS, ModelConfig

SIZE = 32
HEAD = {"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 32, "n_mlp_fg": 8, "n_keep_fg": 4,
        "n_mlp_bg": 16, "n_keep_bg": 8, "n_query_fg": 3, "n_query_bg": 5, "n_edge": 2}
OFF_GMRD = {"use_query_prototypes": False, "use_edge_samples": False, "use_proto_loss": False,
            "use_boundary_loss": False}  # QAMP's additions over GMRD (the reverse pass and the MLPs are GMRD's too)


def _episode(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    supp = torch.randn(1, 1, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(1, 1, SIZE, SIZE)
    masks[..., 8:20, 9:24] = 1
    qry = torch.randn(1, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    labels[:, 10:22, 8:22] = 1
    return supp, masks, qry, labels


def _build(**keys):
    torch.manual_seed(0)  # parameter init only
    return build_model({**HEAD, **keys}, SIZE)


def _foreground_everywhere(model) -> None:
    """Every query pixel predicted foreground (the reverse pass then always runs): the heads read
    non-negative ReLU maps, so fg weights +1 and bg weights -1 make the fg logit the larger."""
    with torch.no_grad():
        model.fg_decoder.head.weight.fill_(1.0)
        model.bg_decoder.head.weight.fill_(-1.0)


def _state_after(model, *args, **kwargs) -> torch.Tensor:
    g = make_generator(3)
    with torch.no_grad():
        model(*args, generator=g, **kwargs)
    return g.get_state()


# ---- the switches and their keys ------------------------------------------------------------------
def test_switches_default_on_are_model_keys_and_counted():
    cfg = ModelConfig()
    assert all(getattr(cfg, k) is True for k in ABLATION_KEYS)
    assert set(ABLATION_KEYS) <= set(MODEL_KEYS)  # stored in the snapshot meta, compared on test / resume
    assert set(ABLATION_KEYS) == {"use_query_prototypes", "use_edge_samples", "use_mlp_prototypes", "use_alignment",
                                  "use_proto_loss", "use_boundary_loss"}
    counts = {(): (3 + 4 + 2 + N_MAP, 5 + 8 + 2 + N_MAP), ("use_query_prototypes",): (4 + 2 + N_MAP, 8 + 2 + N_MAP),
              ("use_edge_samples",): (3 + 4 + N_MAP, 5 + 8 + N_MAP), ("use_mlp_prototypes",): (3 + 2 + N_MAP, 5 + 2 + N_MAP)}
    for off, (n_fg, n_bg) in counts.items():
        cfg = ModelConfig.from_config({**HEAD, **{k: False for k in off}})
        assert (cfg.n_fg, cfg.n_bg) == (n_fg, n_bg), off


def test_invalid_combinations_are_refused():
    with pytest.raises(ValueError, match="use_proto_loss=True needs use_alignment=True"):
        ModelConfig.from_config({"use_alignment": False})
    ModelConfig.from_config({"use_alignment": False, "use_proto_loss": False})
    with pytest.raises(ValueError, match="no sampled fg prototypes left"):
        ModelConfig.from_config({"use_query_prototypes": False, "use_mlp_prototypes": False, "use_edge_samples": False})
    with pytest.raises(ValueError, match="use_edge_samples: expected True or False, got 0"):
        ModelConfig.from_config({"use_edge_samples": 0})
    # n_keep_* are not read without MLP prototypes: not checked either
    ModelConfig.from_config({"use_mlp_prototypes": False, "n_keep_fg": 500})


def test_keys_of_a_part_switched_off_are_refused(tmp_path):
    from helpers import experiment

    ex = experiment()
    log = {"path": {"log_dir": str(tmp_path)}}
    for keys, message in (({"use_boundary_loss": False, "boundary_weight": 0.5},
                           r"boundary_weight=0.5 is set but use_boundary_loss=False"),
                          ({"use_query_prototypes": False, "tau_fg": 0.6, "n_query_bg": 7},
                           r"n_query_bg=7 is set but use_query_prototypes=False.*tau_fg=0.6 is set"),
                          ({"use_alignment": False, "use_proto_loss": False, "proto_weight": 0.1},
                           r"proto_weight=0.1 is set but use_proto_loss=False"),
                          ({"model": "adnet", "use_edge_samples": False}, r"model='adnet' does not read")):
        with pytest.raises(ValueError, match=message):
            ex.run("print_config", config_updates={**keys, **log})
    ex.run("print_config", config_updates={"use_boundary_loss": False, "use_edge_samples": False, **log})
    ex.run("print_config", config_updates={"use_alignment": False, "use_proto_loss": False, **log})


# ---- each switch at its off value ---------------------------------------------------------------
def test_no_query_prototypes_draws_nothing_on_the_query_side(monkeypatch):
    model = _build(use_query_prototypes=False).eval()
    supp, masks, qry, _ = _episode()
    assert model.fg_decoder.in_conv.weight.shape[:2] == (4 + 2, 4 + 2 + N_MAP)
    assert model.bg_decoder.in_conv.weight.shape[:2] == (8 + 2, 8 + 2 + N_MAP)
    monkeypatch.setattr(qamp_module, "query_prototypes", lambda *a: pytest.fail("PGQP drew"))
    with torch.no_grad():
        g = make_generator(3)
        state = model.encode_support(supp, masks, generator=g)
        support_only = g.get_state()
        out = model._predict(state, *model.encoder(qry), model._grid(state.feats), g)
        assert torch.equal(g.get_state(), support_only)  # eval: the query side draws nothing
    assert out["fg_prototypes"].shape[1] == 4 + 2 + N_MAP and out["bg_prototypes"].shape[1] == 8 + 2 + N_MAP
    torch.testing.assert_close(out["fg_prototypes"][0], state.fg)  # the support part alone
    assert out["prior"].shape == (1, SIZE, SIZE)  # QPG stays (the overlays' prior, the empty-support fallback)


def test_no_edge_samples_keeps_the_band_averages(monkeypatch):
    model = _build(use_edge_samples=False).eval()
    full = _build().eval()
    supp, masks, _, _ = _episode()
    monkeypatch.setattr(mgsp, "sampled_columns", lambda *a: pytest.fail("edge samples drawn"))
    with torch.no_grad():
        state = model.encode_support(supp, masks, generator=make_generator(3))
    assert state.fg.shape[0] == 4 + N_MAP and state.bg.shape[0] == 8 + N_MAP
    assert model.fg_decoder.in_conv.weight.shape[:2] == (3 + 4, 3 + 4 + N_MAP)
    monkeypatch.undo()
    with torch.no_grad():  # the same MLP weights (built before the decoders from the same seed)
        reference = full.encode_support(supp, masks, generator=make_generator(3))
    # same draws up to the edge samples: the kept MLP prototypes and the two MAPs are the full model's
    torch.testing.assert_close(state.fg[:4], reference.fg[:4])
    torch.testing.assert_close(state.fg[-N_MAP:], reference.fg[-N_MAP:])


def test_no_mlp_prototypes_has_no_mlps_and_no_fill_draws(monkeypatch):
    model = _build(use_mlp_prototypes=False).eval()
    assert model.fg_mlp is None and model.bg_mlp is None
    assert not any(k.startswith(("fg_mlp.", "bg_mlp.")) for k in model.state_dict())
    assert model.fg_decoder.in_conv.weight.shape[:2] == (3 + 2, 3 + 2 + N_MAP)
    monkeypatch.setattr(mgsp, "mlp_prototypes", lambda *a: pytest.fail("MLP prototypes computed"))
    monkeypatch.setattr(mgsp, "kept_columns", lambda *a: pytest.fail("kept columns drawn"))
    supp, masks, qry, labels = _episode()
    model.train()
    out = model(supp, masks, qry, labels, generator=make_generator(0))
    assert set(out["losses"]) == {"query", "align", "proto", "boundary"}
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out["losses"].values())


def test_no_alignment_has_no_reverse_pass():
    model = _build(use_alignment=False, use_proto_loss=False).train()
    _foreground_everywhere(model)
    supp, masks, qry, labels = _episode()
    out = model(supp, masks, qry, labels, generator=make_generator(3))
    assert set(out["losses"]) == {"query", "boundary"}
    torch.testing.assert_close(out["loss"], out["losses"]["query"] + 0.8 * out["losses"]["boundary"])
    # the labels add no draw: no reverse pass (with it, they would: the predicted mask is not empty)
    assert torch.equal(_state_after(model, supp, masks, qry, labels), _state_after(model, supp, masks, qry))
    full = _build().train()
    _foreground_everywhere(full)
    assert not torch.equal(_state_after(full, supp, masks, qry, labels), _state_after(full, supp, masks, qry))


def test_no_proto_loss_and_no_boundary_loss_have_no_term(monkeypatch):
    monkeypatch.setattr(qamp_module, "boundary_f1_loss", lambda *a: pytest.fail("boundary loss computed"))
    monkeypatch.setattr(qamp_module, "prototype_consistency_loss", lambda *a: pytest.fail("proto loss computed"))
    model = _build(use_proto_loss=False, use_boundary_loss=False).train()
    _foreground_everywhere(model)
    supp, masks, qry, labels = _episode()
    out = model(supp, masks, qry, labels, generator=make_generator(3))
    assert set(out["losses"]) == {"query", "align"} and out["losses"]["align"].item() > 0
    torch.testing.assert_close(out["loss"], out["losses"]["query"] + out["losses"]["align"])
    # neither draws: the same generator stream as the full model
    monkeypatch.undo()
    full = _build().train()
    _foreground_everywhere(full)
    assert torch.equal(_state_after(model, supp, masks, qry, labels), _state_after(full, supp, masks, qry, labels))


@pytest.mark.parametrize("key", ABLATION_KEYS)
def test_each_switch_off_gives_finite_losses_and_gradients(key):
    keys = {key: False, **({"use_proto_loss": False} if key == "use_alignment" else {})}
    model = _build(**keys).train()
    supp, masks, qry, labels = _episode()
    out = model(supp, masks, qry, labels, generator=make_generator(1))
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in out["losses"].values())
    absent = {"use_alignment": {"align", "proto"}, "use_proto_loss": {"proto"}, "use_boundary_loss": {"boundary"}}
    assert set(out["losses"]) == {"query", "align", "proto", "boundary"} - absent.get(key, set())
    out["loss"].backward()
    assert model.fg_decoder.in_conv.weight.grad is not None and model.encoder.reduce1.weight.grad is not None


# ---- QAMP with its additions off against GMRD ------------------------------------------------------
def test_qamp_without_its_additions_is_gmrd_up_to_the_listed_differences(monkeypatch):
    """QAMP with ``OFF_GMRD`` and every MLP prototype kept is GMRD up to docs/DIFFERENCES.md's list:
    the random order of the kept MLP prototypes (QAMP draws it even when all are kept), the decoder's
    last width and dropout, the MLP's ReLU and GMRD's background band (``GMRDConstants``), and GMRD's
    auxiliary descriptor loss (QAMP's prototype loss is another formula, switched off here). With those
    made equal (``QAMP_PARTS``, the order patched to the identity), the same weights and generator give
    the same prediction, query loss and alignment loss, bit for bit, in eval and in training mode."""
    counts = {"n_mlp_fg": 8, "n_keep_fg": 8, "n_mlp_bg": 16, "n_keep_bg": 16}
    qamp = _build(**counts, **OFF_GMRD)
    gmrd_config = ModelConfig.from_config({**HEAD, "n_mlp_fg": 8, "n_mlp_bg": 16}, model="gmrd")
    gmrd = GMRD(gmrd_config, (SIZE, SIZE), constants=QAMP_PARTS)
    gmrd.load_state_dict(qamp.state_dict())  # the same tensors under the same names
    supp, masks, qry, labels = _episode()
    with torch.no_grad():  # the kept MLP prototypes: the same rows, in QAMP's random order
        q_fg = qamp.encode_support(supp, masks, generator=make_generator(4)).fg[:8]
        g_fg = gmrd.encode_support(supp, masks, generator=make_generator(4)).fg[:8]
    assert not torch.equal(q_fg, g_fg)
    assert torch.cdist(q_fg, g_fg).min(dim=1).values.max() < 1e-5 and sorted(torch.cdist(q_fg, g_fg).argmin(1).tolist()) == list(range(8))
    monkeypatch.setattr(mgsp, "kept_columns", lambda n, n_keep, generator: torch.arange(n_keep))
    for training in (False, True):
        qamp.train(training), gmrd.train(training)
        _foreground_everywhere(qamp), _foreground_everywhere(gmrd)
        a = qamp(supp, masks, qry, labels, generator=make_generator(5))
        b = gmrd(supp, masks, qry, labels, generator=make_generator(5))
        assert set(a["losses"]) == {"query", "align"} and set(b["losses"]) == {"query", "align", "aux"}
        assert torch.equal(a["pred"], b["pred"]), training
        for key in ("query", "align"):
            assert torch.equal(a["losses"][key], b["losses"][key]), (training, key)
        assert a["losses"]["align"].item() > 0
        torch.testing.assert_close(a["loss"], b["loss"] - 0.5 * b["losses"]["aux"])


def test_the_listed_differences_are_the_authors_constants():
    from models.gmrd import AUTHORS

    gmrd = build_model({**HEAD, "model": "gmrd", "n_mlp_fg": 8, "n_mlp_bg": 16}, SIZE)
    assert gmrd.constants == AUTHORS
    assert gmrd.fg_mlp.relu and not _build().fg_mlp.relu
    assert gmrd.bg_decoder.out_conv.weight.shape[:2] == (100, 16) and gmrd.bg_decoder.p == 0.1
    mirrored = GMRD(gmrd.config, (SIZE, SIZE), constants=QAMP_PARTS)
    assert mirrored.bg_decoder.out_conv.weight.shape[:2] == (16, 16) and mirrored.bg_decoder.p == 0.2
