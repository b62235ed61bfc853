"""Q-Net head (``model='qnet'``, models/qnet.py) on this project's encoder (CPU, ResNet-50, 32-64 px):
its formulas on hand-made inputs (two paths and their weights, the query's threshold, the alignment
loss, the test-time refinement against a per-slice re-implementation of the authors' loop),
shapes, losses, SGD steps, refinement under inference mode leaving the weights untouched, the
config keys and their refusals, and train.py / test.py end to end (resume bit for bit).

The comparison with the authors' code itself (same features into both heads, within 1e-5) is
recorded in docs/METHOD.md §12; these tests need no copy of it."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MODEL_KEYS, MODELS, TEST_TIME_KEYS, build_model, check_state_dict, sampling
from models import qnet as qn
from models.qamp import ModelConfig

SMALL = {"model": "qnet", "backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64}
SIZE = 32  # the real encoder: 8 x 8 layer3 and 4 x 4 layer4 features
BANK_SIZE, C = 64, 16  # fixed features: 16 x 16 and 8 x 8, 16 channels


def _disk(size: int, cy: float, cx: float, r: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((y - cy * size) ** 2 + (x - cx * size) ** 2) <= (r * size) ** 2).float()


def _episode(size: int = SIZE, seed: int = 0):
    """A bright disk on noise in the support and (moved) in the query, with its masks."""
    g = torch.Generator().manual_seed(seed)
    supp_mask, qry_mask = _disk(size, 0.5, 0.5, 0.25), _disk(size, 0.55, 0.45, 0.22)
    supp = torch.randn(1, 1, 3, size, size, generator=g) * 0.3 + 2 * supp_mask
    qry = torch.randn(1, 3, size, size, generator=g) * 0.3 + 2 * qry_mask
    return supp, supp_mask[None, None], qry, qry_mask[None].long()


def _build(seed: int = 0, size: int = SIZE, **keys) -> nn.Module:
    torch.manual_seed(seed)  # parameter init only
    return build_model({**SMALL, **keys}, size)


class Bank:
    """Fixed encoder outputs: image ``i`` (pixel ``[0, 0, 0]`` holds ``i``) gets layer3 / layer4
    features with a block along one direction (the 'organ', centre ``centres[i]``) on noise, and
    threshold ``t[i]``. ``model.encoder.forward = bank`` makes both paths exactly these."""

    def __init__(self, centres, t, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(C, generator=g)
        self.feats = []
        for h in (BANK_SIZE // 4, BANK_SIZE // 8):
            f = torch.randn(len(centres), C, h, h, generator=g)
            r = h // 4
            for i, (cy, cx) in enumerate(centres):
                f[i, :, int(cy * h) - r:int(cy * h) + r, int(cx * h) - r:int(cx * h) + r] += 1.5 * v[:, None, None]
            self.feats.append(f)
        self.t = torch.as_tensor(t, dtype=torch.float32)

    def images(self, *index: int) -> torch.Tensor:
        x = torch.zeros(len(index), 3, BANK_SIZE, BANK_SIZE)
        x[:, 0, 0, 0] = torch.tensor(index, dtype=torch.float32)
        return x

    def __call__(self, x: torch.Tensor):
        i = x[:, 0, 0, 0].long()
        return self.feats[0][i], self.feats[1][i], self.t[i]


def _banked(bank: Bank, **keys) -> nn.Module:
    model = _build(size=BANK_SIZE, **keys).eval()
    model.encoder.forward = bank
    return model


@pytest.fixture(scope="module")
def bank() -> Bank:
    # image 0: support (its own t is far off, so using it instead of the query's would show), 1-3 queries
    return Bank([(0.5, 0.5), (0.55, 0.45), (0.45, 0.5), (0.6, 0.55)], [5.0, -10.0, -9.0, -11.0])


SUPPORT_MASK = _disk(BANK_SIZE, 0.5, 0.5, 0.2)[None, None]  # (1, 1, H, W)


# ---- registration and config keys ----------------------------------------------------------------
def test_registered_and_keys():
    assert "qnet" in MODELS and type(_build()).__name__ == "QNet"
    assert {"qnet_alpha", "qnet_refine_iters"} <= set(MODEL_KEYS) and TEST_TIME_KEYS == ("qnet_refine_iters",)
    defaults = ModelConfig()
    assert (defaults.qnet_alpha, defaults.qnet_refine_iters) == (0.9, 7)  # authors' config.py L65, L72
    assert qn.default_alpha(1) == 0.9 and qn.default_alpha(2) == 0.6  # authors' README.md L60-61
    assert qn.REFINE_LR == 0.01 and qn.QUERY_WEIGHTS == (0.1, 1.0) and qn.LOSS_WEIGHTS == {"query": 1.0, "align": 1.0}
    for bad, match in (({"qnet_alpha": 1.5}, "qnet_alpha: expected a weight in"),
                       ({"qnet_refine_iters": -1}, "qnet_refine_iters: expected an integer >= 0")):
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_config(bad)


def test_keys_of_another_model_are_refused(tmp_path):
    """QAMP's keys given with model='qnet', Q-Net's with 'qamp' or 'adnet': refused, not accepted and
    ignored; Q-Net's own keys and named configs pass; Setting 2 takes the authors' alpha 0.6."""
    from helpers import experiment

    ex, log = experiment(), {"path": {"log_dir": str(tmp_path)}}
    for updates, match in (({"model": "qnet", "n_mlp_fg": 10}, r"n_mlp_fg=10: model='qnet' does not read these QAMP keys"),
                           ({"model": "qamp", "qnet_alpha": 0.5}, r"qnet_alpha=0.5: model='qamp' does not read these Q-Net"),
                           ({"model": "adnet", "qnet_refine_iters": 0}, r"qnet_refine_iters=0: model='adnet' does not read "
                                                                         r"these Q-Net keys")):
        with pytest.raises(ValueError, match=match):
            ex.run("print_config", config_updates={**updates, **log})
    run = ex.run("print_config", config_updates={"model": "qnet", "qnet_alpha": 0.7, "qnet_refine_iters": 0,
                                                 "feature_dim": 64, **log})
    assert (run.config["qnet_alpha"], run.config["qnet_refine_iters"]) == (0.7, 0)
    assert ex.run("print_config", config_updates={"model": "qnet", **log}, named_configs=["setting2"]).config["qnet_alpha"] == 0.6
    ex.run("print_config", config_updates={"model": "qnet", **log}, named_configs=["cpu_budget"])


# ---- formulas on hand-made inputs ----------------------------------------------------------------
def test_paths_combine_with_alpha_after_aligned_upsampling():
    p3, p4 = torch.full((1, 8, 8), 0.2), torch.full((1, 4, 4), 0.6)
    w = qn.path_weights(0.9, p3)
    torch.testing.assert_close(qn.combine([p3, p4], w, (32, 32)), torch.full((1, 32, 32), 0.9 * 0.2 + 0.1 * 0.6))
    g = torch.Generator().manual_seed(0)
    p3, p4 = torch.rand(2, 8, 8, generator=g), torch.rand(2, 4, 4, generator=g)
    up = [F.interpolate(p[:, None], size=(32, 32), mode="bilinear", align_corners=True)[:, 0] for p in (p3, p4)]
    torch.testing.assert_close(qn.combine([p3, p4], qn.path_weights(0.6, p3), (32, 32)), 0.6 * up[0] + 0.4 * up[1])


def test_prototype_is_the_masked_average_of_half_pixel_upsampled_features():
    g = torch.Generator().manual_seed(0)
    feats, masks = torch.randn(2, 5, 4, 4, generator=g), (torch.rand(2, 16, 16, generator=g) > 0.5).float()
    up = F.interpolate(feats, size=(16, 16), mode="bilinear", align_corners=False)  # their getFeatures L181
    expected = (up * masks[:, None]).sum(dim=(2, 3)) / (masks.sum(dim=(1, 2))[:, None] + 1e-5)
    torch.testing.assert_close(qn.masked_average(feats, masks), expected, rtol=1e-5, atol=1e-6)


def test_foreground_probability_and_mask():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # cells e0, e1
    p = qn.foreground_probability(feats, torch.tensor([1.0, 0.0]), torch.tensor([-20.0]))
    # e0: cos 1, score -20 = t: 1 - sigmoid(0) = 0.5; e1: cos 0, score 0: 1 - sigmoid(10)
    torch.testing.assert_close(p, torch.tensor([[[0.5, 1 - 1 / (1 + math.exp(-10))]]]))
    assert qn.foreground_mask(torch.tensor([[0.5, 0.5001, 0.2]])).tolist() == [[False, True, False]]  # ties: bg


def test_min_max_sigmoid_is_per_slice():
    x = torch.tensor([0.0, 1.0, 2.0, 4.0]).reshape(1, 1, 2, 2)
    out = qn.min_max_sigmoid(torch.cat([x, 10 * x - 3]))
    expected = torch.sigmoid(torch.tensor([0.0, 0.25, 0.5, 1.0])).reshape(1, 1, 2, 2)
    torch.testing.assert_close(out, torch.cat([expected, expected]))


def test_reconstruction_loss_is_a_sum_of_slice_means_through_the_target():
    u = torch.tensor([[0.0, 1.0], [0.5, 2.0]]).reshape(2, 1, 1, 2)  # two slices of 2 cells
    reference = torch.sigmoid(u)
    rebuilt = torch.full((2, 1, 1, 2), 0.6, requires_grad=True)
    loss = qn.reconstruction_loss(reference, rebuilt)
    y, x = 0.6, reference
    per_cell = -(y * torch.log(x) + (1 - y) * torch.log(1 - x))
    torch.testing.assert_close(loss, per_cell.reshape(2, 2).mean(dim=1).sum())
    loss.backward()
    torch.testing.assert_close(rebuilt.grad, -u / 2)  # d BCE / d target = -logit(input); mean over 2 cells


def _authors_refinement(feats, prototype, t, iters, lr=0.01):
    """The authors' updatePrototype loop (fewshot.py L121-154) re-written for one slice: float mask
    arithmetic, whole-tensor min / max, nn.BCELoss, one Adam per slice."""
    proto = nn.Parameter(prototype.clone()[None])  # (1, C)
    optimizer = torch.optim.Adam([proto], lr=lr)
    for _ in range(iters):
        with torch.no_grad():
            pred = 1 - torch.sigmoid(0.5 * (-20 * F.cosine_similarity(feats, proto[..., None, None], dim=1) - t))
            mask = torch.stack((1 - pred, pred), dim=1).argmax(dim=1, keepdim=True).float()  # (1, 1, h, w)
        new = feats * (1 - mask) + proto[..., None, None] * mask
        norm = lambda f: torch.sigmoid((f - f.min()) / (f.max() - f.min()))  # noqa: E731
        loss = nn.BCELoss()(norm(feats), norm(new))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return proto.detach()[0]


def test_refinement_batched_equals_the_authors_loop_per_slice(bank):
    feats, t = bank.feats[0][1:], bank.t[1:]  # 3 query slices, layer3 path
    proto = qn.masked_average(bank.feats[0][:1], SUPPORT_MASK[0])[0]
    refined = qn.refine_prototype(feats, proto, t, 7)
    per_slice = torch.stack([_authors_refinement(feats[i:i + 1], proto, t[i], 7) for i in range(3)])
    torch.testing.assert_close(refined, per_slice, rtol=0, atol=1e-6)
    assert (refined - proto).abs().max() > 0.03  # 7 steps of lr 0.01 moved it
    single = torch.cat([qn.refine_prototype(feats[i:i + 1], proto, t[i:i + 1], 7) for i in range(3)])
    torch.testing.assert_close(refined, single, rtol=0, atol=1e-6)
    assert torch.equal(qn.refine_prototype(feats, proto, t, 0), proto.expand(3, -1))


def test_one_refinement_step_is_one_adam_step(bank):
    feats, t = bank.feats[1][1:2], bank.t[1:2]  # layer4 path, one slice
    proto = qn.masked_average(bank.feats[1][:1], SUPPORT_MASK[0])[0]
    p = proto.clone().requires_grad_()
    fg = qn.foreground_mask(qn.foreground_probability(feats, proto, t))[:, None]
    assert 0 < int(fg.sum()) < fg.numel()
    loss = nn.BCELoss()(qn.min_max_sigmoid(feats), qn.min_max_sigmoid(torch.where(fg, p[None, :, None, None], feats)))
    (grad,) = torch.autograd.grad(loss, p)
    expected = proto - 0.01 * grad / (grad.abs() + 1e-8)  # Adam's first step: m / (sqrt(v) + eps), bias-corrected
    torch.testing.assert_close(qn.refine_prototype(feats, proto, t, 1)[0], expected, rtol=0, atol=1e-7)


def test_prediction_uses_the_querys_threshold_in_both_paths(bank):
    model = _banked(bank, qnet_refine_iters=0)
    with torch.no_grad():
        out = model(bank.images(0)[None], SUPPORT_MASK, bank.images(1))
    probs = [qn.foreground_probability(f[1:2], qn.masked_average(f[:1], SUPPORT_MASK[0])[0], bank.t[1:2])
             for f in bank.feats]
    ups = [F.interpolate(p[:, None], size=(BANK_SIZE,) * 2, mode="bilinear", align_corners=True)[:, 0] for p in probs]
    expected = (0.9 * ups[0] + 0.1 * ups[1]) / (torch.tensor(0.9) + torch.tensor(1 - 0.9))
    torch.testing.assert_close(out["pred"][:, 1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["prior"], out["pred"][:, 1])
    assert out["monitors"]["threshold"].item() == -10.0  # the query's t, not the support's (5.0)
    assert 0 < int((out["pred"].argmax(1) == 1).sum()) < BANK_SIZE ** 2 // 2


def test_alignment_loss_by_hand_and_skipped_without_foreground(bank):
    q = [f[1:2] for f in bank.feats]
    s = [f[:2] for f in bank.feats]  # two support shots (images 0 and 1)
    masks = torch.cat([SUPPORT_MASK[0], _disk(BANK_SIZE, 0.55, 0.45, 0.15)[None]])
    w = qn.path_weights(0.9, masks)
    assert qn.alignment_loss(q, torch.zeros(1, BANK_SIZE, BANK_SIZE), s, masks, bank.t[1:2], w).item() == 0.0
    query_prob = 0.8 * _disk(BANK_SIZE, 0.55, 0.45, 0.2)[None]  # foreground where > 0.5
    loss = qn.alignment_loss(q, query_prob, s, masks, bank.t[1:2], w)
    fg = (query_prob > 0.5).float()
    ups = []
    for f_q, f_s in zip(q, s):
        up = F.interpolate(f_q, size=(BANK_SIZE,) * 2, mode="bilinear", align_corners=False)
        proto = (up * fg[:, None]).sum(dim=(0, 2, 3)) / (fg.sum() + 1e-5)
        p = 1 - torch.sigmoid(0.5 * (-20 * F.cosine_similarity(f_s, proto[None, :, None, None], dim=1) - bank.t[1]))
        ups.append(F.interpolate(p[:, None], size=(BANK_SIZE,) * 2, mode="bilinear", align_corners=True)[:, 0])
    prob = (0.9 * ups[0] + 0.1 * ups[1]) / (torch.tensor(0.9) + torch.tensor(1 - 0.9))
    logp = torch.log(torch.stack([1 - prob, prob], dim=1).clamp(1.1920929e-07, 1 - 1.1920929e-07))
    expected = sum(F.nll_loss(logp[i:i + 1], masks[i:i + 1].long()) for i in range(2)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---- the model -----------------------------------------------------------------------------------
def test_outputs_losses_and_gradients():
    model = _build().train()
    supp, masks, qry, labels = _episode()
    out = model(supp, masks, qry, labels)
    assert out["pred"].shape == (1, 2, SIZE, SIZE) and out["prior"].shape == (1, SIZE, SIZE)
    torch.testing.assert_close(out["pred"].sum(dim=1), torch.ones(1, SIZE, SIZE))
    assert set(out["losses"]) == {"query", "align"} and set(out["monitors"]) == {"threshold"}
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in out["losses"].values())
    torch.testing.assert_close(out["loss"], out["losses"]["query"] + out["losses"]["align"])
    out["loss"].backward()
    for name in ("encoder.reduce2.weight", "encoder.reduce1d.weight", "encoder.backbone.fc.weight",
                 "encoder.backbone.layer4.0.conv1.weight"):  # layer4 path and the query's threshold train
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_sgd_steps_lower_the_loss():
    model = _build().train()
    supp, masks, qry, labels = _episode()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(10):
        out = model(supp, masks, qry, labels)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_refinement_changes_the_prediction_and_leaves_the_weights(bank, mode):
    """Eval mode refines (in every grad mode the evaluation may use) and touches no weight; train
    mode and qnet_refine_iters=0 do not refine."""
    model = _banked(bank)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with context():
        state = model.encode_support(bank.images(0)[None], SUPPORT_MASK)
        refined = model.segment(state, bank.images(1, 2, 3))["pred"]
        model.config = dataclasses.replace(model.config, qnet_refine_iters=0)
        plain = model.segment(state, bank.images(1, 2, 3))["pred"]
        model.config = dataclasses.replace(model.config, qnet_refine_iters=7)
        model.train()
        train_mode = model(bank.images(0)[None], SUPPORT_MASK, bank.images(1))["pred"]
    assert (refined - plain).abs().max() > 1e-3
    assert bool(((refined.argmax(1) == 1) != (plain.argmax(1) == 1)).any())
    torch.testing.assert_close(train_mode, plain[:1], rtol=0, atol=1e-6)  # no refinement in training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_forward_equals_encode_support_then_segment_one_or_many_slices(bank):
    model = _banked(bank)
    with torch.inference_mode():
        whole = model(bank.images(0)[None], SUPPORT_MASK, bank.images(2))["pred"]
        state = model.encode_support(bank.images(0)[None], SUPPORT_MASK)
        batched = model.segment(state, bank.images(1, 2, 3))["pred"]
        cached = model.segment(model.encode_support(bank.images(0)[None], SUPPORT_MASK, feats=state.feats), bank.images(2))
        single = torch.cat([model.segment(state, bank.images(i))["pred"] for i in (1, 2, 3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1:2], whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached["pred"], whole, rtol=0, atol=1e-5)


def test_step_and_refinement_through_the_cuda_formulations(monkeypatch, bank):
    """The formulations used on CUDA (matmul up-sampling, weighted NLL) forced onto the CPU: a training
    step and a refined prediction run no op torch lists as non-deterministic on CUDA, and agree with
    the CPU kernels up to float rounding."""
    from test_devices import NONDETERMINISTIC_ON_CUDA, OpNames

    model = _build().train()
    supp, masks, qry, labels = _episode()

    def run():
        model.zero_grad(set_to_none=True)
        with OpNames() as ops:
            loss = model(supp, masks, qry, labels)["loss"]
            loss.backward()
            banked = _banked(bank)
            with torch.inference_mode():
                pred = banked.segment(banked.encode_support(bank.images(0)[None], SUPPORT_MASK), bank.images(1, 2))["pred"]
        return loss.detach(), model.encoder.reduce2.weight.grad.clone(), pred, ops.names

    loss_cpu, grad_cpu, pred_cpu, ops_cpu = run()
    assert "upsample_bilinear2d_backward" in ops_cpu
    monkeypatch.setattr(sampling, "torch_kernels", lambda device: False)
    loss, grad, pred, ops = run()
    assert not ops & NONDETERMINISTIC_ON_CUDA, ops & NONDETERMINISTIC_ON_CUDA
    torch.testing.assert_close(loss, loss_cpu, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, grad_cpu, rtol=1e-3, atol=1e-5 * grad_cpu.abs().max().item())
    torch.testing.assert_close(pred, pred_cpu, rtol=0, atol=1e-5)


def test_state_dict_is_the_encoders_and_round_trips(tmp_path):
    model = _build().eval()
    assert all(k.startswith("encoder.") for k in model.state_dict())
    supp, masks, qry, _ = _episode()
    torch.save(model.state_dict(), tmp_path / "qnet.pth")
    fresh = _build(seed=1).eval()
    state = torch.load(tmp_path / "qnet.pth", weights_only=True)
    check_state_dict(fresh, state)
    fresh.load_state_dict(state)
    with torch.inference_mode():
        assert torch.equal(fresh(supp, masks, qry)["pred"], model(supp, masks, qry)["pred"])
    adnet = build_model({**SMALL, "model": "adnet"}, SIZE)
    with pytest.raises(ValueError, match=r"(?s)unexpected \(1\): threshold"):
        check_state_dict(model, adnet.state_dict())


# ---- train.py / test.py --------------------------------------------------------------------------
def _train_config(phantoms48, folder, **updates):
    from helpers import TINY_HEAD, tiny_train_config

    base = tiny_train_config(phantoms48, folder, **{"model": "qnet", "feature_dim": 64, "val_interval": 0,
                                                    "test_label": [1], **updates})
    return {k: v for k, v in base.items() if k not in TINY_HEAD or k == "feature_dim"}


def test_resume_through_train_py_is_bit_exact(phantoms48, tmp_path):
    """train.py with model=qnet: 2 steps, then resumed to 4, gives the losses and weights of 4 steps straight."""
    from helpers import experiment
    from engine.snapshot import load_snapshot

    ex = experiment()
    straight = ex.run("train", config_updates=_train_config(phantoms48, tmp_path / "straight")).result
    half = ex.run("train", config_updates=_train_config(phantoms48, tmp_path / "resumed", n_steps=2)).result
    resumed = ex.run("train", config_updates=_train_config(phantoms48, tmp_path / "resumed",
                                                          resume=half["run_dir"])).result
    a, b = load_snapshot(straight["snapshot"]), load_snapshot(resumed["snapshot"])
    assert b["step"] == 4 and b["history"]["loss"] == a["history"]["loss"]
    assert a["meta"]["model_keys"]["model"] == "qnet" and a["meta"]["model_keys"]["qnet_refine_iters"] == 7
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)


def test_validation_test_py_and_predict_py_refine(phantoms48, tmp_path, monkeypatch):
    """The validation curve during training, test.py and predict.py all refine (the refinement is
    counted); test.py may change qnet_refine_iters (a test-time key: 0 refines nothing), not the
    other model keys."""
    import predict
    from helpers import experiment, for_test

    calls = []
    original = qn.refine_prototype
    monkeypatch.setattr(qn, "refine_prototype", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    ex = experiment()
    trained = ex.run("train", config_updates=_train_config(phantoms48, tmp_path / "train", n_steps=2,
                                                          val_interval=2)).result
    assert trained["val"]["step"] == 2 and calls and set(calls) == {7}  # validated with refinement
    test = {k: v for k, v in for_test(_train_config(phantoms48, tmp_path / "tests")).items()
            if k not in ("model", "feature_dim", "backbone", "image_size")}
    test.update(reload_model_path=trained["run_dir"], supp_idx=0)
    for iters in (7, 0):
        calls.clear()
        run = ex.run("test", config_updates={**test, **({} if iters == 7 else {"qnet_refine_iters": iters})})
        assert run.config["qnet_refine_iters"] == iters and math.isfinite(run.result["mean_dice"])
        assert bool(calls) == (iters > 0)
    with pytest.raises(ValueError, match=r"qnet_alpha: the snapshot has 0.9, requested 0.5"):
        ex.run("test", config_updates={**test, "qnet_alpha": 0.5})
    calls.clear()
    argv = ["--snapshot", trained["run_dir"], "--support-image", str(phantoms48 / "image_1.nii.gz"),
            "--support-label", str(phantoms48 / "label_1.nii.gz"), "--query", str(phantoms48 / "image_2.nii.gz"),
            "--out", str(tmp_path / "predict"), "--device", "cpu", "--classes", "1"]
    assert predict.main(argv) == 0 and calls and set(calls) == {7}
