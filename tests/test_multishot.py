"""Multi-shot choices of the model (README "Where this differs from the reference code"):
``proto_loss_shots`` (prototype-consistency loss averaged or summed over shots) and
``empty_support_rule`` (ADNet fallback when any shot's mask is empty, or only shot 0's)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models import build_model, make_generator
from models.qamp import ModelConfig

SIZE = 32
SMALL = {"backbone": "resnet50", "pretrained_weights": "none"}
SMALL_FIELDS = {"backbone": "resnet50"}  # the ModelConfig of build_model(SMALL)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SMALL, SIZE).eval()


def _episode(n_shots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    supp = torch.randn(1, n_shots, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(1, n_shots, SIZE, SIZE)
    masks[..., 8:19, 9:24] = 1
    qry = torch.randn(1, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    labels[:, 10:21, 8:22] = 1
    return supp, masks, qry, labels


def _losses(model, choice: dict, episode, seed: int = 0):
    model.config = dataclasses.replace(ModelConfig(**SMALL_FIELDS), **choice)
    with torch.no_grad():
        return model(*episode, generator=make_generator(seed))


def test_defaults_and_validation():
    cfg = ModelConfig()
    assert (cfg.proto_loss_shots, cfg.empty_support_rule) == ("mean", "any")
    with pytest.raises(ValueError, match=r"proto_loss_shots: expected one of \['mean', 'sum'\], got 'avg'"):
        ModelConfig.from_config({"proto_loss_shots": "avg"})
    with pytest.raises(ValueError, match=r"empty_support_rule: expected one of \['any', 'first'\], got 'all'"):
        ModelConfig.from_config({"empty_support_rule": "all"})


def test_proto_loss_sum_is_exactly_twice_the_mean_with_two_shots(model):
    for seed in range(20):  # an episode whose prediction has foreground (else the term is 0)
        episode = _episode(2, seed)
        mean = _losses(model, {"proto_loss_shots": "mean"}, episode)
        if mean["losses"]["proto"].item() > 0:
            break
    else:
        pytest.fail("no episode with a non-empty predicted mask among 20 seeds")
    total = _losses(model, {"proto_loss_shots": "sum"}, episode)
    assert total["losses"]["proto"].item() == pytest.approx(2 * mean["losses"]["proto"].item(), rel=1e-6)
    for key in ("query", "align", "boundary"):  # nothing else changes
        assert torch.equal(total["losses"][key], mean["losses"][key])
    assert torch.equal(total["pred"], mean["pred"])


def test_one_shot_is_identical_under_every_choice(model):
    episode = _episode(1, 3)
    ref = _losses(model, {}, episode)
    for choice in ({"proto_loss_shots": "sum"}, {"empty_support_rule": "first"}):
        out = _losses(model, choice, episode)
        assert torch.equal(out["pred"], ref["pred"])
        for key, value in ref["losses"].items():
            assert torch.equal(out["losses"][key], value)


def test_empty_support_rule_any_versus_first(model):
    supp, masks, qry, labels = _episode(2, 5)
    masks[0, 1] = 0  # shot 1 empty, shot 0 not
    with torch.no_grad():
        model.config = dataclasses.replace(ModelConfig(**SMALL_FIELDS), empty_support_rule="any")
        state_any = model.encode_support(supp, masks, generator=make_generator(0))
        model.config = dataclasses.replace(ModelConfig(**SMALL_FIELDS), empty_support_rule="first")
        state_first = model.encode_support(supp, masks, generator=make_generator(0))
        out_first = model(supp, masks, qry, labels, generator=make_generator(0))
    assert state_any.empty and not state_first.empty  # ours falls back, the reference does not
    assert state_first.fg is not None and bool(torch.isfinite(out_first["pred"]).all())
    assert bool(torch.isfinite(out_first["loss"]))
    masks = masks.flip(1)  # shot 0 empty: both rules fall back
    with torch.no_grad():
        for rule in ("any", "first"):
            model.config = dataclasses.replace(ModelConfig(**SMALL_FIELDS), empty_support_rule=rule)
            assert model.encode_support(supp, masks, generator=make_generator(0)).empty
