"""What a CUDA run relies on, checked on the CPU with constructed cases (no GPU here; the checks
that need one are tests/test_gpu.py, ``bash scripts/gpu_check.sh``):

- resume across devices: random states saved by a CUDA run (16-byte CUDA RNG states of more GPUs
  than are visible, a CUDA generator's state) restore for what is present, and a run resumed from
  a snapshot of a CUDA run continues exactly on the CPU, saying which streams were not restored;
- the deterministic formulations used off the CPU (bilinear upsampling as matrix products, the
  NLL as weighted sums) equal torch's kernels up to float rounding, and a training step through
  them runs no op that torch lists as non-deterministic on CUDA;
- a ``device=cpu`` run never touches CUDA, even where CUDA is reported present.
"""
from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench.train_step import predict_some_foreground
from helpers import SIZE, TINY_HEAD, experiment, tiny_train_config
from engine.snapshot import load_snapshot, save_snapshot
from models import build_model, make_generator, sampling
from models.losses import cross_entropy, weighted_nll
from models.sampling import UpsampleGrid
from utils.seed import capture_rng_state, restore_generator, restore_rng_state

ex = experiment()

# aten ops that torch.use_deterministic_algorithms documents as having no deterministic CUDA
# implementation (its "will throw a RuntimeError" list), by the names the dispatcher sees.
NONDETERMINISTIC_ON_CUDA = {
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "_upsample_bilinear2d_aa_backward", "upsample_bicubic2d_backward", "upsample_trilinear3d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "nll_loss_forward", "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward", "put_",
    "histc", "bincount", "kthvalue", "median", "grid_sampler_2d_backward", "grid_sampler_3d_backward"}


class OpNames(TorchDispatchMode):
    """Records the aten ops that run (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- RNG states
def test_rng_states_of_other_devices_restore_for_what_is_present(monkeypatch) -> None:
    """CUDA RNG states (16 bytes per GPU) of 2 GPUs restored with 1 visible: cuda:0 only, with a note;
    a run without CUDA ignores them, with a note; the CPU, numpy and python streams continue."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    state = capture_rng_state()
    assert "cuda" not in state  # a run without CUDA captures no CUDA state
    expected = (torch.rand(3), np.random.rand(), random.random())
    gpu_states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    saved = {**state, "cuda": gpu_states, "torch": state["torch"].to(torch.int64)}  # any dtype: made bytes again

    notes = restore_rng_state(saved, cuda=True)
    assert [d for _, d in calls] == [0] and torch.equal(calls[0][0], gpu_states[0])
    assert calls[0][0].dtype == torch.uint8 and calls[0][0].device.type == "cpu"
    assert notes == ["the snapshot holds torch's CUDA random states of 2 GPUs and 1 are visible: restored for "
                     "cuda:0..0, the others dropped"]
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(), random.random()) == expected[1:]

    calls.clear()
    notes = restore_rng_state(saved, cuda=False)
    assert calls == [] and "not restored (this run does not use CUDA)" in notes[0]
    assert "no CUDA random states" in restore_rng_state(state, cuda=True)[0]
    assert restore_rng_state({**saved, "cuda": gpu_states[:1]}, cuda=True) == []  # as many as visible


def test_generator_state_of_another_kind_is_refused_without_a_crash() -> None:
    generator = make_generator(5)
    before = generator.get_state()
    assert before.numel() == 5056  # a CPU generator; a CUDA one has 16 bytes
    assert not restore_generator(generator, torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(generator.get_state(), before)  # left at its seeding
    other = make_generator(6)
    torch.rand(4, generator=other)  # somewhere along its stream
    assert restore_generator(generator, other.get_state().to(torch.int64))  # any dtype, as map_location leaves it
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=other))  # continues alike


# ---------------------------------------------------------------------------------------------- resume
def _interrupted(tiny_run: dict, tmp_path: Path, edit) -> Path:
    """A copy of the shared run stopped after step 2 whose snapshot ``edit`` changed."""
    folder = tmp_path / "interrupted"
    shutil.copytree(tiny_run["run_dir"], folder)
    (folder / "snapshots" / "final.pth").unlink()
    path = folder / "snapshots" / "step_0000002.pth"
    snapshot = load_snapshot(path)
    edit(snapshot)
    save_snapshot(path, snapshot)
    return folder


def _resume(folder: Path, tmp_path: Path) -> tuple[dict, str]:
    result = ex.run(command_name="train", config_updates={"resume": str(folder),
                                                          "path": {"log_dir": str(tmp_path / "resumed")}}).result
    return load_snapshot(result["snapshot"]), (Path(result["run_dir"]) / "logger.log").read_text(encoding="utf-8")


def test_resume_of_a_cuda_runs_snapshot_continues_exactly_on_the_cpu(tiny_run: dict, tmp_path: Path) -> None:
    """The snapshot as a 2-GPU CUDA run would write it (CUDA RNG states beside the CPU generator): the
    CPU run says which streams it does not restore and its losses and weights are those of the
    uninterrupted run, bit for bit."""
    def from_cuda(snapshot: dict) -> None:
        snapshot["rng"]["cuda"] = [torch.full((16,), 7, dtype=torch.uint8)] * 2

    continued, log = _resume(_interrupted(tiny_run, tmp_path, from_cuda), tmp_path)
    uninterrupted = load_snapshot(tiny_run["snapshot"])
    assert continued["history"]["loss"] == uninterrupted["history"]["loss"]
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(continued["model"][key], value, rtol=0, atol=0, msg=key)
    assert "written by a run with CUDA and this run does not use it" in log
    assert "CUDA random states of 2 GPU(s) in the snapshot are not restored" in log
    assert "cuda" not in continued["rng"]  # a CPU run saves no CUDA state


def test_resume_with_a_cuda_generator_state_restarts_that_generator(tiny_run: dict, tmp_path: Path) -> None:
    """A snapshot whose sampling generator is a CUDA generator (16 bytes; written before it lived on
    the CPU) resumes on the CPU with a warning instead of set_state's TypeError / RuntimeError."""
    def cuda_generator(snapshot: dict) -> None:
        snapshot["generator"] = torch.zeros(16, dtype=torch.uint8)

    continued, log = _resume(_interrupted(tiny_run, tmp_path, cuda_generator), tmp_path)
    assert continued["step"] == 4 and len(continued["history"]["loss"]) == 4
    assert "generator is a CUDA generator" in log and "restarts from the run's seed" in log


def test_cpu_run_never_touches_cuda(phantoms48: Path, tmp_path: Path, monkeypatch) -> None:
    """device=cpu where CUDA is reported present: no CUDA call (RNG capture and restore, pinned
    memory), in a run and in its resume."""
    import train

    def touched(*args, **kwargs):
        raise AssertionError("a device=cpu run initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", touched)
    pinned = []
    loader = train.DataLoader
    monkeypatch.setattr(train, "DataLoader", lambda *a, **k: pinned.append(k["pin_memory"]) or loader(*a, **k))
    config = tiny_train_config(phantoms48, tmp_path, n_steps=2, save_snapshot_every=1, val_interval=0)
    first = ex.run(command_name="train", config_updates={**config, "n_steps": 1}).result
    resumed = ex.run(command_name="train", config_updates={**config, "resume": first["run_dir"]}).result
    assert resumed["steps"] == 2 and pinned == [False, False]
    assert "cuda" not in load_snapshot(resumed["snapshot"])["rng"]


# ---------------------------------------------------------------------------------------------- kernels
def test_upsampling_as_matrix_products_equals_interpolate() -> None:
    grid = UpsampleGrid((8, 11), (32, 41), torch.device("cpu"))
    x = torch.randn(2, 5, 8, 11, requires_grad=True)
    weights = torch.randn(2, 5, 32, 41)
    reference = F.interpolate(x, size=(32, 41), mode="bilinear", align_corners=True)
    matmul = grid.up_matmul(x)
    torch.testing.assert_close(matmul, reference, rtol=1e-6, atol=1e-6)
    (g_ref,) = torch.autograd.grad((reference * weights).sum(), x)
    (g_mat,) = torch.autograd.grad((matmul * weights).sum(), x)
    torch.testing.assert_close(g_mat, g_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(grid.up(x), reference)  # the CPU keeps torch's kernel: bit for bit


@pytest.mark.parametrize("size_in, size_out", [((8, 11), (32, 41)), ((64, 64), (8, 8)), ((48, 40), (12, 10))],
                         ids=["up", "down", "down-uneven"])
def test_half_pixel_resampling_as_matrix_products_equals_interpolate(size_in, size_out) -> None:
    """align_corners=False (SSL-ALPNet's mode), up and down: the CUDA formulation equals torch's kernel."""
    grid = UpsampleGrid(size_in, size_out, torch.device("cpu"), align_corners=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size_in, generator=g).requires_grad_()
    weights = torch.randn(2, 3, *size_out, generator=g)
    reference = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    matmul = grid.up_matmul(x)
    torch.testing.assert_close(matmul, reference, rtol=1e-5, atol=1e-5)  # float rounding: <= 2.4e-6 in 600 draws
    (g_ref,) = torch.autograd.grad((reference * weights).sum(), x)
    (g_mat,) = torch.autograd.grad((matmul * weights).sum(), x)
    torch.testing.assert_close(g_mat, g_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(grid.up(x), reference)


def test_cross_entropy_off_the_cpu_equals_torchs(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 16, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (1, 16, 16), generator=g)
    labels[0, :2] = 255
    weight = torch.tensor([0.05, 1.0])
    reference = F.cross_entropy(logits, labels, weight=weight, ignore_index=255)
    assert torch.equal(cross_entropy(logits, labels, weight), reference)  # the CPU: torch's kernel
    monkeypatch.setattr(sampling, "torch_kernels", lambda device: False)
    sums = cross_entropy(logits, labels, weight)
    torch.testing.assert_close(sums, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(sums, logits)[0], torch.autograd.grad(reference, logits)[0],
                               rtol=1e-5, atol=1e-8)


def test_weighted_nll_equals_nll_loss() -> None:
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 2, 16, 16, generator=g), dim=1).requires_grad_()
    labels = torch.randint(0, 2, (2, 16, 16), generator=g)
    labels[0, :3] = 255  # ignored
    for weight in (torch.tensor([0.1, 1.0]), None):
        reference = F.nll_loss(log_probs, labels, weight=weight, ignore_index=255)
        sums = weighted_nll(log_probs, labels, weight, 255)
        torch.testing.assert_close(sums, reference, rtol=1e-6, atol=0)
        (g_ref,) = torch.autograd.grad(reference, log_probs)
        (g_sum,) = torch.autograd.grad(sums, log_probs)
        torch.testing.assert_close(g_sum, g_ref, rtol=1e-6, atol=1e-9)
    labels[1, 0, 0] = 3
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\) or 255, got values \[3\]"):
        weighted_nll(log_probs, labels, None, 255)


def _step(model, episode, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
    """Forward + backward of one episode: loss, gradients, the aten ops that ran."""
    model.zero_grad(set_to_none=True)
    with OpNames() as ops:
        out = model(*episode, generator=make_generator(seed))
        out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, ops.names


def _through_the_cuda_formulations(monkeypatch, model, episode) -> dict[str, torch.Tensor]:
    """One training step of ``model`` on the CPU path, then through the formulations used on CUDA
    forced onto the CPU: no op of torch's non-deterministic-on-CUDA list runs in the second (torch's
    CPU kernels do run two of them in the first), and loss and gradients agree up to float rounding.
    Returns the second step's gradients."""
    loss_cpu, grads_cpu, ops_cpu = _step(copy.deepcopy(model), episode, 3)
    assert {"upsample_bilinear2d_backward", "nll_loss2d_forward"} <= ops_cpu  # what the CUDA path replaces
    monkeypatch.setattr(sampling, "torch_kernels", lambda device: False)
    loss, grads, ops = _step(model, episode, 3)
    assert not ops & NONDETERMINISTIC_ON_CUDA, ops & NONDETERMINISTIC_ON_CUDA
    torch.testing.assert_close(loss, loss_cpu, rtol=1e-5, atol=0)
    assert grads.keys() == grads_cpu.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_cpu[name], rtol=1e-3, atol=1e-5 * grads_cpu[name].abs().max().item(),
                                   msg=name)
    return grads


@pytest.mark.parametrize("empty_support", [False, True], ids=["reverse-pass", "empty-support"])
def test_training_step_through_the_cuda_formulations(monkeypatch, empty_support: bool) -> None:
    """A QAMP training step (the reverse pass running, or the empty-support fallback) through the
    formulations used on CUDA (:func:`_through_the_cuda_formulations`)."""
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet50", "pretrained_weights": "none", **TINY_HEAD}, SIZE).train()
    g = torch.Generator().manual_seed(1)
    supp, qry = torch.randn(1, 1, 3, SIZE, SIZE, generator=g), torch.randn(1, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(1, 1, SIZE, SIZE)
    if not empty_support:
        masks[..., 8:20, 10:22] = 1
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    labels[:, 10:22, 10:22] = 1
    if not empty_support:
        predict_some_foreground(model, supp, masks, qry, 0.25, 3)
    grads = _through_the_cuda_formulations(monkeypatch, model, (supp, masks, qry, labels))
    assert ("fg_decoder.head.weight" in grads) != empty_support  # the decoders ran, or the fallback did


def test_alpnet_step_through_the_cuda_formulations(monkeypatch) -> None:
    """An SSL-ALPNet training step (half-pixel resampling up and down, cross-entropy) through the
    formulations used on CUDA (:func:`_through_the_cuda_formulations`)."""
    size = 48
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet50", "pretrained_weights": "none", "feature_dim": 64,
                         "model": "alpnet"}, size).train()
    g = torch.Generator().manual_seed(1)
    supp, qry = torch.randn(1, 1, 3, size, size, generator=g), torch.randn(1, 3, size, size, generator=g)
    masks = torch.zeros(1, 1, size, size)
    masks[..., 8:40, 8:40] = 1
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, 10:38, 12:40] = 1
    _through_the_cuda_formulations(monkeypatch, model, (supp, masks, qry, labels))
