"""bench/encoder_probe.py: the batch-norm re-estimation it offers, and its refusals."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import config_with
from models import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("encoder_probe", REPO / "bench" / "encoder_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reestimated_statistics_are_the_average_over_batches(probe) -> None:
    torch.manual_seed(0)
    config = config_with(model="panet", backbone="resnet50", pretrained_weights="none", image_size=32)
    model = build_model(config, 32)
    slices = torch.randn(20, 3, 32, 32) * 2 + 1  # two batches: 16 and 4
    probe.reestimate_bn(model, slices)
    bn1, conv1 = model.encoder.backbone["bn1"], model.encoder.backbone["conv1"]
    with torch.no_grad():
        means = [conv1(slices[a:b]).mean(dim=(0, 2, 3)) for a, b in ((0, 16), (16, 20))]
    assert int(bn1.num_batches_tracked) == 2
    torch.testing.assert_close(bn1.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5)
    assert model.training  # probe() sets eval mode itself after this


def test_bn_scans_overlapping_the_probe_scans_are_refused(probe, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        probe.main(["--data-dir", str(tmp_path), "--scans", "36,37", "--bn-scans", "1,37",
                    "--out", str(tmp_path / "out.json")])
    assert "overlap --scans" in capsys.readouterr().err and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("argv,expected", [(["--scans", "36,x"], "expected comma-separated scan ids"),
                                           (["--encoder", "nopath"], "expected NAME=PATH")])
def test_bad_arguments_are_refused_before_anything_is_read(probe, tmp_path: Path, capsys, argv, expected) -> None:
    with pytest.raises(SystemExit):
        probe.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out.json"), *argv])
    assert expected in capsys.readouterr().err and not (tmp_path / "out.json").exists()
