"""The checks to run on your own GPU before a long grid: ``bash scripts/gpu_check.sh`` (or
``python -m pytest -m cuda tests/test_gpu.py``). Every test is marked ``cuda`` and skips without
CUDA; the two-GPU ones skip with fewer than two. Their CPU halves run everywhere
(tests/test_devices.py, test_amp.py, test_distributed.py, test_sweep.py).

None of these has run on a GPU in this project (no GPU was lent to its sessions; docs/SCALING.md):
a failure here is a finding to report, not a known state.

1. One training step in fp32, bf16 and fp16: finite, bf16 / fp16 losses within ``LOSS_RTOL`` of fp32.
2. ``deterministic=True`` on CUDA: a step under ``torch.use_deterministic_algorithms(True)`` (errors,
   not warnings) runs no op without a deterministic kernel (QAMP, SSL-ALPNet, Q-Net with its test-time refinement);
   train.py repeats and resumes bit for bit.
3. TF32 off: a float32 convolution on cuDNN within 1e-5 of float64; the decoder on cuDNN within
   ``DECODER_ATOL`` of the CPU's Winograd branch on the same weights.
4. Two NCCL ranks under torchrun against one GPU process averaging the same episodes.
5. ``bench/gpu_step.py`` at 256 px, ResNet-101 (numbers printed; ``QAMP_GPU_CHECK_OUT`` keeps them).
6. The sweep's local executor: every cell sees its own GPU(s), among those this process was given.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import SIZE, TINY_HEAD, experiment, make_phantoms, tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 3e-2  # bf16 / fp16 loss of one episode against fp32 (the CPU measured 0.03-1.3 % for bf16)
DECODER_ATOL = 1e-4  # cuDNN against the CPU Winograd decoder, outputs of magnitude ~1
GPU_SIZE = 64  # a small image, so that the checks take seconds


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms32"))


@pytest.fixture(autouse=True)
def float32_policy():
    """Each test starts from train.py's settings: TF32 off, deterministic kernels (restored after)."""
    from engine.amp import disable_tf32
    from engine.runtime import set_determinism

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    disable_tf32()
    set_determinism(True)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    set_determinism(False)


def tiny_model(device: str = "cuda", size: int = GPU_SIZE) -> torch.nn.Module:
    from models import build_model

    torch.manual_seed(0)
    return build_model({"backbone": "resnet50", "pretrained_weights": "none", **TINY_HEAD}, size).to(device).train()


def episode(device: str = "cuda", size: int = GPU_SIZE, empty_support: bool = False):
    g = torch.Generator().manual_seed(1)
    supp, qry = torch.randn(1, 1, 3, size, size, generator=g), torch.randn(1, 3, size, size, generator=g)
    masks = torch.zeros(1, 1, size, size)
    if not empty_support:
        masks[..., size // 4: size // 2 + 3, size // 4: 3 * size // 4] = 1
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, size // 4 + 2: size // 2 + 5, size // 4: 3 * size // 4] = 1
    return tuple(t.to(device) for t in (supp, masks, qry, labels))


def with_foreground(model, inputs):
    """Rescale the foreground head so that the reverse pass runs (bench/train_step.py)."""
    from bench.train_step import predict_some_foreground

    predict_some_foreground(model, *inputs[:3], 0.25, 3)
    return model


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_one_training_step_per_precision(mode: str) -> None:
    from engine.amp import Amp
    from models import make_generator

    inputs = episode()
    reference = with_foreground(tiny_model(), inputs)
    model = copy.deepcopy(reference)
    loss32 = reference(*inputs, generator=make_generator(7))["loss"]
    amp = Amp(mode, torch.device("cuda")).apply(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for attempt in range(10):  # fp16: the scaler may skip the first steps while its scale settles
        optimizer.zero_grad(set_to_none=True)
        loss = model(*inputs, generator=make_generator(7))["loss"]
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        if amp.backward_step(loss, optimizer):
            break
    else:
        pytest.fail(f"amp={mode}: 10 steps skipped by the GradScaler")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    rel = abs(loss.item() - loss32.item()) / abs(loss32.item())
    print(f"amp={mode}: loss {loss.item():.6f}, fp32 {loss32.item():.6f}, relative difference {rel:.2e}")
    assert rel < LOSS_RTOL


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("empty_support", [False, True], ids=["reverse-pass", "empty-support"])
def test_step_has_deterministic_kernels_and_repeats_bit_for_bit(empty_support: bool) -> None:
    """Under use_deterministic_algorithms(True) without warn_only an op lacking a deterministic CUDA
    kernel raises; two steps from the same state give the same loss and gradients bit for bit."""
    from models import make_generator

    inputs = episode(empty_support=empty_support)
    model = tiny_model()
    if not empty_support:
        with_foreground(model, inputs)
    torch.use_deterministic_algorithms(True)
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(*inputs, generator=make_generator(3))
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


@pytest.mark.parametrize("name", ["adnet", "alpnet", "panet", "gmrd"])
def test_baseline_step_has_deterministic_kernels_and_repeats_bit_for_bit(name: str) -> None:
    """The same for the other heads: ADNet (its prototype through the up-sampling's adjoint, no
    F.interpolate), SSL-ALPNet (half-pixel resampling, cross-entropy), PANet, GMRD (QAMP's modules)."""
    from models import build_model, make_generator

    torch.manual_seed(0)
    model = build_model({"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64,
                         "model": name}, GPU_SIZE).cuda().train()
    inputs = episode()
    torch.use_deterministic_algorithms(True)
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(*inputs, generator=make_generator(3))
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_qnet_step_and_refinement_have_deterministic_kernels_and_repeat_bit_for_bit() -> None:
    """The same for the Q-Net head (two paths, the query's threshold), and its test-time refinement
    (Adam on the prototypes under inference mode): errors, not warnings, on an op without a
    deterministic kernel; two runs equal bit for bit; the weights untouched; the CPU close (mean
    absolute difference of the probabilities under 1e-3: cuDNN and the CPU round differently)."""
    from models import build_model

    torch.manual_seed(0)
    model = build_model({"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64,
                         "model": "qnet"}, GPU_SIZE).cuda().train()
    inputs = episode()
    torch.use_deterministic_algorithms(True)
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(*inputs)
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name
    model.eval().zero_grad(set_to_none=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    supp, masks, qry, _ = inputs
    queries = torch.cat([qry, qry.flip(-1), qry.flip(-2)])
    with torch.inference_mode():
        preds = [model.segment(model.encode_support(supp, masks), queries)["pred"] for _ in range(2)]
    assert torch.equal(preds[0], preds[1])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    cpu = copy.deepcopy(model).cpu()
    with torch.inference_mode():
        pred_cpu = cpu.segment(cpu.encode_support(supp.cpu(), masks.cpu()), queries.cpu())["pred"]
    assert (preds[0].cpu() - pred_cpu).abs().mean() < 1e-3


def test_training_repeats_and_resumes_bit_for_bit_on_cuda(phantoms: Path, tmp_path: Path) -> None:
    """train.py with device=cuda: two runs give the same losses and weights, a resume from the step-2
    snapshot continues them exactly, and no op warned that it has no deterministic kernel."""
    from engine.snapshot import load_snapshot

    ex = experiment()
    config = tiny_config(phantoms, tmp_path / "a", device="cuda", n_steps=4, save_snapshot_every=2, keep_snapshots=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ex.run(command_name="train", config_updates=config).result
        second = ex.run(command_name="train", config_updates={**config, "path": {"log_dir": str(tmp_path / "b")}}).result
        step2 = Path(first["run_dir"]) / "snapshots" / "step_0000002.pth"
        resumed = ex.run(command_name="train", config_updates={**config, "resume": str(step2),
                                                               "path": {"log_dir": str(tmp_path / "c")}}).result
    nondeterministic = [str(w.message) for w in caught if "deterministic" in str(w.message)]
    assert not nondeterministic, nondeterministic
    runs = [load_snapshot(r["snapshot"]) for r in (first, second, resumed)]
    assert runs[0]["history"]["loss"] == runs[1]["history"]["loss"] == runs[2]["history"]["loss"]
    for other in runs[1:]:
        for key, value in runs[0]["model"].items():
            torch.testing.assert_close(other["model"][key], value, rtol=0, atol=0, msg=key)
    assert len(runs[0]["rng"]["cuda"]) == torch.cuda.device_count()


# ---------------------------------------------------------------------------------------------- 3
def test_float32_convolution_is_not_tf32() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    gpu = torch.nn.functional.conv2d(x.cuda(), w.cuda(), padding=1).cpu().double()
    rel = ((gpu - exact).abs().max() / exact.abs().max()).item()
    print(f"cuDNN float32 convolution against float64: relative max difference {rel:.2e} (TF32 would be ~1e-3)")
    assert rel < 1e-5


def test_cudnn_decoder_matches_the_cpu_winograd_branch() -> None:
    from models.decoder import SimilarityDecoder

    torch.manual_seed(0)
    cpu = SimilarityDecoder(20, 18, p=0.2).eval()
    gpu = copy.deepcopy(cpu).cuda()
    sim = torch.rand(2, 20, GPU_SIZE // 4, GPU_SIZE // 4) * 2 - 1  # cosine maps
    out_cpu = cpu(sim)
    out_gpu = gpu(sim.cuda()).cpu()
    print(f"decoder: cuDNN against the CPU Winograd branch, max |difference| {(out_gpu - out_cpu).abs().max().item():.2e} "
          f"(outputs up to {out_cpu.abs().max().item():.2f})")
    torch.testing.assert_close(out_gpu, out_cpu, rtol=0, atol=DECODER_ATOL)


# ---------------------------------------------------------------------------------------------- 4
@two_gpus
def test_two_nccl_ranks_equal_one_process_averaging_the_same_episodes(phantoms: Path, tmp_path: Path) -> None:
    from engine.snapshot import load_snapshot
    from test_distributed import N_STEPS, averaged_gradient_steps, torchrun

    from helpers import TINY_ARGS

    args = [a for a in TINY_ARGS if not a.startswith("device=")]
    run = torchrun("train.py", "with", *args, "device=cuda", f"data_dir={phantoms}", f"n_steps={N_STEPS}",
                   f"path.log_dir={tmp_path / 'a'}")
    assert run.returncode == 0, run.stderr[-3000:]
    final = load_snapshot(tmp_path / "a" / "train_custom_setting1_fold0" / "snapshots" / "final.pth")
    assert final["world_size"] == 2
    losses, model, untouched = averaged_gradient_steps(phantoms, tmp_path / "reference", N_STEPS, device="cuda")
    assert final["history"]["loss"] == pytest.approx(losses, rel=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(final["model"][name], param.detach().cpu(), rtol=1e-3, atol=1e-5, msg=name)
    assert "encoder.reduce2.weight" in untouched
    for name in untouched:
        torch.testing.assert_close(final["model"][name], model.state_dict()[name].cpu(), rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- 5
def test_gpu_step_bench_resnet101_at_256(tmp_path: Path) -> None:
    from bench import gpu_step

    out = Path(os.environ.get("QAMP_GPU_CHECK_OUT") or tmp_path) / "gpu_step.json"
    assert gpu_step.main(["--world-sizes", "1", "--amp", "off,bf16", "--steps", "10", "--warmup", "3",
                          "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["ran_on_gpu"] and data["backbone"] == "resnet101" and data["size"] == 256 and data["deterministic"]
    for run in data["runs"]:
        assert run["loss_finite"] and run["step_s"] > 0 and min(run["reverse_steps"]) > 0, run
        print(f"gpu_step: world size {run['world_size']}, amp {run['amp']}: {run['step_s']} s per step, "
              f"peak {run['peak_mem_gib']} GiB on {run['device']}")


# ---------------------------------------------------------------------------------------------- 6
GPU_PROBE = """#!{python}
# Stands in for the interpreter of a sweep cell: notes the GPUs the cell sees and when it ran.
import json, os, sys, time
import torch
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
script = next(a for a in sys.argv[1:] if a.endswith(".py"))
start = time.time()
uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
time.sleep(2.0)
json.dump({{"uuids": uuids, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}},
          open(os.path.join(args["path.log_dir"], "gpus.json"), "w", encoding="utf-8"))
folder = os.path.join(args["path.log_dir"], script[:-3] + "_probe")
os.makedirs(os.path.join(folder, "snapshots"), exist_ok=True)
open(os.path.join(folder, "snapshots/final.pth" if script == "train.py" else "summary.json"), "w", encoding="utf-8").close()
json.dump({{"status": "COMPLETED"}}, open(os.path.join(folder, "run.json"), "w", encoding="utf-8"))
"""


def test_sweep_gives_each_cell_its_own_gpu(tmp_path: Path) -> None:
    """The local executor with the GPUs this process was given: every cell sees one GPU of them
    (a training and its tests; two folds), and cells running at the same time see different GPUs."""
    from tools import sweep

    mine = {str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())}
    probe = tmp_path / "probe_python"
    probe.write_text(GPU_PROBE.format(python=sys.executable))
    probe.chmod(0o755)
    out = tmp_path / "grid"
    assert sweep.main(["--out", str(out), "--folds", "0,1", "--supports", "0", "--python", str(probe)]) == 0
    cells = [json.loads(p.read_text(encoding="utf-8")) for p in (out / "cells").glob("*/gpus.json")]
    assert len(cells) == 4
    for cell in cells:
        assert len(cell["uuids"]) == 1 and set(cell["uuids"]) <= mine, cell
    for i, a in enumerate(cells):
        for b in cells[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["uuids"] != b["uuids"], (a, b)
    if len(mine) > 1:
        assert any(a["start"] < b["end"] and b["start"] < a["end"] for i, a in enumerate(cells) for b in cells[i + 1:])
