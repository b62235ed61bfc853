"""Mixed precision (engine/amp.py): bf16 autocast on a CPU against float32, the float32 head,
GradScaler passthrough when off, refusals, TF32 off for CUDA runs, fp16 overflows skipping the step
and the lr schedule (the CPU's GradScaler standing in for CUDA's), and train.py with amp=bf16.

Tolerance: the bf16 loss of one episode is within 3 % (relative) of the float32 loss of the same
weights, episode and generator seed. Measured here (32 px, random ResNet-50, seeds 0-2): 0.03 %,
0.03 % and 1.3 %. The encoder features themselves differ more (24 % relative L2 at 32 px: with
random weights, train-mode batch norm over 4 x 4 maps amplifies bf16's 2^-9 rounding), but the
float32 head and losses see the features only through cosine similarities and masked means.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import SIZE, make_phantoms, tiny_config  # noqa: E402
from models import build_model, make_generator  # noqa: E402
from engine.amp import MAX_SKIPPED_IN_A_ROW, Amp, check_amp  # noqa: E402

LOSS_RTOL = 3e-2


def tiny_model() -> torch.nn.Module:
    cfg = {"model": "qamp", "backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64,
           "n_mlp_fg": 8, "n_keep_fg": 4, "n_query_fg": 4, "n_edge": 4, "n_mlp_bg": 16, "n_keep_bg": 8,
           "n_query_bg": 4}
    torch.manual_seed(0)
    return build_model(cfg, SIZE).train()


def episode():
    g = torch.Generator().manual_seed(1)
    supp = torch.randn(1, 1, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(1, 1, SIZE, SIZE)
    masks[..., 8:20, 10:22] = 1
    qry = torch.randn(1, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    labels[:, 10:22, 10:22] = 1
    return supp, masks, qry, labels


def test_bf16_step_matches_float32_within_tolerance() -> None:
    model32 = tiny_model()
    model16 = copy.deepcopy(model32)
    amp = Amp("bf16", "cpu").apply(model16)
    dtypes = {}
    model16.encoder.backbone["layer1"].register_forward_hook(lambda m, i, o: dtypes.__setitem__("encoder", o.dtype))
    model16.fg_decoder.register_forward_hook(lambda m, i, o: dtypes.__setitem__("decoder", o.dtype))
    inputs = episode()
    out32 = model32(*inputs, generator=make_generator(7))
    out16 = model16(*inputs, generator=make_generator(7))
    assert dtypes == {"encoder": torch.bfloat16, "decoder": torch.float32}  # head, prior, losses: float32
    assert out16["loss"].dtype == torch.float32 and out16["prior"].dtype == torch.float32
    assert torch.isfinite(out16["loss"])
    rel = abs(out16["loss"].item() - out32["loss"].item()) / abs(out32["loss"].item())
    assert rel < LOSS_RTOL, (out16["loss"].item(), out32["loss"].item())
    # one optimizer step through the policy: finite float32 gradients, parameters stay float32
    optimizer = torch.optim.SGD(model16.parameters(), lr=1e-3, momentum=0.9)
    amp.backward_step(out16["loss"], optimizer)
    grads = [p.grad for p in model16.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    # parameters and state_dict keys are those of the float32 model (snapshots are unchanged)
    assert list(model16.state_dict()) == list(model32.state_dict())


def test_off_is_exactly_backward_and_step() -> None:
    a, b = tiny_model(), tiny_model()
    amp = Amp("off", "cpu").apply(b)
    assert not amp.enabled and amp.state_dict() == {}
    opt_a = torch.optim.SGD(a.parameters(), lr=1e-2, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=1e-2, momentum=0.9)
    inputs = episode()
    loss_a = a(*inputs, generator=make_generator(3))["loss"]
    loss_a.backward()
    opt_a.step()
    amp.backward_step(b(*inputs, generator=make_generator(3))["loss"], opt_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="amp='fp16' needs CUDA"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="amp='fp8' is unknown"):
        check_amp("fp8", torch.device("cpu"))


def test_cuda_runs_turn_tf32_off() -> None:
    """Amp on a CUDA device sets cuDNN's and cuBLAS's TF32 switches off (constructing the policy needs
    no GPU with the scaler off); on a CPU it leaves them."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        Amp("bf16", "cpu")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        Amp("off", torch.device("cuda"))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class ScalarLoss(torch.nn.Module):
    """A stand-in for the model in ``train.train_step``: loss ``w.sum() + offset`` (an inf offset is a
    forward overflow; a NaN offset a NaN loss whose gradients are finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.offset = 0.0

    def forward(self, supp_imgs, supp_masks, qry_imgs, qry_labels, generator=None) -> dict:
        loss = self.w.sum() + self.offset
        return {"loss": loss, "losses": {"query": loss}, "pred": torch.zeros(1, 2, 2, 2)}


def test_fp16_overflow_skips_the_step_and_the_schedule() -> None:
    """With fp16's GradScaler a non-finite loss skips the SGD step (the parameters stay, the scale
    halves) and the lr schedule (it follows the steps taken); a finite one steps both; without a
    scaler a non-finite loss raises; MAX_SKIPPED_IN_A_ROW skipped steps in a row raise."""
    import train

    batch = {"support_images": torch.zeros(1, 1, 3, 2, 2), "support_masks": torch.zeros(1, 1, 2, 2),
             "query_images": torch.zeros(1, 1, 3, 2, 2), "query_labels": torch.zeros(1, 1, 2, 2, dtype=torch.long)}
    model = ScalarLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    amp = Amp("off", "cpu")
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # fp16's policy, as on CUDA
    step = lambda: train.train_step(model, optimizer, scheduler, batch, torch.device("cpu"), make_generator(0), amp)

    for n, offset in enumerate([float("nan"), float("inf")], start=1):
        model.offset = offset
        values = step()
        assert values["loss"] != values["loss"] or values["loss"] == float("inf")
        assert torch.equal(model.w.detach(), torch.ones(3)) and scheduler.last_epoch == 0
        assert amp.skipped_steps == amp.skipped_in_a_row == n and amp.scaler.get_scale() == 2.0 ** (16 - n)
    model.offset = 0.0
    step()
    assert not torch.equal(model.w.detach(), torch.ones(3)) and scheduler.last_epoch == 1
    assert amp.skipped_steps == 2 and amp.skipped_in_a_row == 0

    model.offset = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train.train_step(model, optimizer, scheduler, batch, torch.device("cpu"), make_generator(0), Amp("off", "cpu"))
    with pytest.raises(FloatingPointError, match=f"{MAX_SKIPPED_IN_A_ROW} steps in a row skipped by the GradScaler"):
        for _ in range(MAX_SKIPPED_IN_A_ROW):
            step()
    assert scheduler.last_epoch == 1


def test_train_with_bf16(tmp_path_factory) -> None:
    from config import ex
    import train  # noqa: F401  (registers the 'train' command)
    from engine.snapshot import load_snapshot

    data = make_phantoms(tmp_path_factory.mktemp("phantoms32"))
    log_dir = tmp_path_factory.mktemp("runs")
    with pytest.raises(ValueError, match="amp='half' is unknown"):
        ex.run("train", config_updates=tiny_config(data, log_dir, amp="half", n_steps=1))
    result = ex.run("train", config_updates=tiny_config(data, log_dir, amp="bf16", n_steps=2)).result
    snap = load_snapshot(result["snapshot"])
    assert snap["config"]["amp"] == "bf16" and len(snap["history"]["loss"]) == 2
    assert all(torch.isfinite(torch.tensor(snap["history"]["loss"])))
    assert "amp_scaler" not in snap  # the GradScaler is fp16-only
