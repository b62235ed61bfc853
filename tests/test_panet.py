"""PANet head (``model='panet'``, the pre-training objective of ``pretrain_sabs``): its formulas on
hand-made inputs, a few SGD steps, encode_support + segment, and a run through train.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models import panet

SMALL = {"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64, "model": "panet"}
SIZE = 32


def _episode(size: int = SIZE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    supp_mask = (((y - size / 2) ** 2 + (x - size / 2) ** 2) <= (size / 4) ** 2).float()
    qry_mask = (((y - 0.55 * size) ** 2 + (x - 0.45 * size) ** 2) <= (0.22 * size) ** 2).float()
    supp = torch.randn(1, 1, 3, size, size, generator=g) * 0.3 + 2 * supp_mask
    qry = torch.randn(1, 3, size, size, generator=g) * 0.3 + 2 * qry_mask
    return supp, supp_mask[None, None], qry, qry_mask[None].long()


def test_prototypes_are_masked_averages_of_the_upsampled_features():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 6, 6, generator=g)
    masks = (torch.rand(2, 24, 24, generator=g) > 0.6).float()
    up = F.interpolate(feats, size=(24, 24), mode="bilinear", align_corners=False)  # the authors' getFeatures
    fg = (up * masks[:, None]).sum(dim=(2, 3)) / (masks.sum(dim=(1, 2))[:, None] + 1e-5)
    bg = (up * (1 - masks)[:, None]).sum(dim=(2, 3)) / ((1 - masks).sum(dim=(1, 2))[:, None] + 1e-5)
    torch.testing.assert_close(panet.support_prototypes(feats, masks), torch.stack([bg.mean(0), fg.mean(0)]),
                               rtol=1e-5, atol=1e-6)
    logits = panet.class_logits(feats, torch.stack([bg.mean(0), fg.mean(0)]))
    expected = 20 * F.cosine_similarity(feats, fg.mean(0)[None, :, None, None], dim=1)
    torch.testing.assert_close(logits[:, 1], expected)


def test_alignment_is_zero_without_predicted_foreground_and_positive_with_it():
    g = torch.Generator().manual_seed(2)
    qf, sf = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    masks = torch.zeros(1, 32, 32)
    masks[:, 8:20, 8:20] = 1
    background = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)], dim=1)
    assert panet.alignment_loss(qf, background, sf, masks).item() == 0.0
    some = background.clone()
    some[:, 1, 2:5, 2:5] = 2.0
    loss = panet.alignment_loss(qf, some, sf, masks)
    assert loss.item() > 0 and math.isfinite(loss.item())


def test_outputs_sgd_and_encode_then_segment():
    torch.manual_seed(0)
    model = build_model(SMALL, SIZE).train()
    supp, masks, qry, labels = _episode()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(10):
        out = model(supp, masks, qry, labels)
        assert set(out["losses"]) == {"query", "align"} and out["pred"].shape == (1, 2, SIZE, SIZE)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert model.encoder.reduce1d.weight.grad is None  # no threshold head, no layer4
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    model.eval()
    with torch.no_grad():
        whole = model(supp, masks, qry)["pred"]
        seg = model.segment(model.encode_support(supp, masks), torch.cat([qry, qry]))["pred"]
    torch.testing.assert_close(seg[:1], whole, rtol=1e-4, atol=1e-5)


def test_panet_trains_and_tests_through_the_scripts(phantoms48, tmp_path):
    from helpers import TINY_HEAD, experiment, tiny_train_config

    ex = experiment()
    base = tiny_train_config(phantoms48, tmp_path / "runs", model="panet", feature_dim=64, val_interval=0, n_steps=2)
    config = {k: v for k, v in base.items() if k not in TINY_HEAD or k == "feature_dim"}
    result = ex.run("train", config_updates=config).result
    assert result["snapshot"].endswith("final.pth")
    with pytest.raises(ValueError, match=r"n_mlp_fg=4: model='panet' does not read"):
        ex.run("print_config", config_updates={"model": "panet", "n_mlp_fg": 4, "path": {"log_dir": str(tmp_path)}})
    named = ex.run("print_config", config_updates={"path": {"log_dir": str(tmp_path)}},
                   named_configs=["cpu_budget", "pretrain_sabs"]).config
    assert (named["model"], named["dataset"], named["supervoxel_source"], named["val_interval"]) == \
        ("panet", "SABS", "generate", 0)
