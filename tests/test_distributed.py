"""torchrun data parallelism on a CPU (2 gloo ranks): identical parameters, the averaged-gradient
step of a single process, rank 0 alone writing the run folder, exact resume and its world-size rule.

The runs are a ResNet-50 QAMP at 32 x 32 on the synthetic phantoms (tests/tiny_phantoms.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_phantoms import TINY_ARGS, make_phantoms  # noqa: E402
from utils import distributed as ddp  # noqa: E402
from utils.snapshot import load_snapshot  # noqa: E402

N_STEPS = 3


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms32"))


# ----------------------------------------------------------------------------------------------
def test_episode_mapping_and_rank_view() -> None:
    assert [ddp.episode_index(k, r, 2) for k in range(3) for r in range(2)] == [0, 1, 2, 3, 4, 5]
    view = ddp.RankEpisodes(list(range(100)), rank=1, world_size=4)
    assert [view[k] for k in range(3)] == [1, 5, 9]
    single = ddp.Distributed()
    data = list(range(5))
    assert ddp.rank_episodes(data, single) is data and single.generator_keys == ()
    assert ddp.Distributed(rank=1, world_size=2).generator_keys == (1,)


def test_non_zero_ranks_run_unobserved(monkeypatch) -> None:
    argv = ["train.py", "train", "-s", "sqlite:///x.db", "with", "seed=1"]
    monkeypatch.setenv("RANK", "0")
    assert ddp.rank_argv(argv) == argv
    monkeypatch.setenv("RANK", "1")
    assert ddp.rank_argv(argv) == [*argv, "--unobserved"]


def test_other_world_size_is_refused() -> None:
    with pytest.raises(ValueError, match="written by 2 process"):
        ddp.check_world_size({"world_size": 2}, ddp.Distributed())
    ddp.check_world_size({}, ddp.Distributed())  # single-process snapshots: W = 1
    with pytest.raises(ValueError, match="written by 1 process"):
        ddp.check_world_size({}, ddp.Distributed(rank=0, world_size=2))


def test_two_ranks_equal_the_averaged_gradient_step(phantoms: Path, tmp_path: Path) -> None:
    """Both ranks hold identical parameters after each step, and those equal one process that
    averages the gradients of the same two episodes (2k with generator (seed, 0), 2k + 1 with
    (seed, 1)) up to float rounding."""
    from ddp_worker import build, collate
    from models import make_generator

    out = tmp_path / "ddp.pt"
    result = torchrun(str(REPO / "tests" / "ddp_worker.py"), str(phantoms), str(out), str(N_STEPS))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp_run = torch.load(out, weights_only=True)
    assert ddp_run["world_size"] == 2
    assert ddp_run["same"] == [True] * (N_STEPS + 1)  # before the first step and after each one

    config, dataset, model, optimizer, scheduler = build(str(phantoms), str(tmp_path), N_STEPS)
    generators = [make_generator(config["seed"], r) for r in range(2)]
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the thread count changes float rounding
    for step in range(N_STEPS):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rank in range(2):
            batch = collate(dataset[ddp.episode_index(step, rank, 2)])
            out_ = model(batch["support_images"], batch["support_masks"], batch["query_images"][:, 0],
                         batch["query_labels"][:, 0], generator=generators[rank])
            (out_["loss"] / 2).backward()
            total += out_["loss"].item() / 2
        optimizer.step()
        scheduler.step()
        losses.append(total)
    torch.set_num_threads(threads)
    assert ddp_run["losses"] == pytest.approx(losses, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp_run["params"][name], param.detach(), rtol=1e-4, atol=1e-6, msg=name)
    # the two ranks' episodes differ (otherwise the test would prove little)
    assert not torch.equal(dataset[0]["query_images"], dataset[1]["query_images"])


def test_torchrun_train_rank0_folder_and_exact_resume(phantoms: Path, tmp_path: Path) -> None:
    args = [*TINY_ARGS, f"data_dir={phantoms}", "save_snapshot_every=2", "keep_snapshots=2"]
    full = torchrun("train.py", "with", *args, "n_steps=4", f"path.log_dir={tmp_path / 'a'}")
    assert full.returncode == 0, full.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("train_"))
    assert folders == ["train_custom_setting1_fold0"]  # rank 1 made no run folder
    run = tmp_path / "a" / folders[0]
    final = load_snapshot(run / "snapshots" / "final.pth")
    assert final["world_size"] == 2 and len(final["rank_states"]) == 2
    assert not torch.equal(final["rank_states"][0]["generator"], final["rank_states"][1]["generator"])
    assert len(final["history"]["loss"]) == 4

    step2 = run / "snapshots" / "step_0000002.pth"
    resumed = torchrun("train.py", "with", *args, "n_steps=4", f"resume={step2}", f"path.log_dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_snapshot(tmp_path / "b" / "train_custom_setting1_fold0" / "snapshots" / "final.pth")
    assert again["history"]["loss"] == final["history"]["loss"]  # exact, step by step
    for key, value in final["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=0, atol=0, msg=key)

    single = subprocess.run([sys.executable, "train.py", "with", *args, "n_steps=4", f"resume={step2}",
                             f"path.log_dir={tmp_path / 'c'}"], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode != 0 and "written by 2 process(es) and this run has 1" in single.stderr


def test_gpu_step_bench_runs_tiny_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_step.py at its CI setting (CPU, 2 gloo ranks, bf16): one row with finite numbers."""
    out = tmp_path / "gpu_step.json"
    result = subprocess.run([sys.executable, "bench/gpu_step.py", "--tiny", "--world-sizes", "2", "--amp", "bf16",
                             "--out", str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ran_on_gpu"] is False and data["tiny"] is True and "not a GPU measurement" in data["note"]
    (run,) = data["runs"]
    assert (run["world_size"], run["amp"], run["backend"], run["peak_mem_kind"]) == (2, "bf16", "gloo", "cpu_max_rss")
    assert run["loss_finite"] and run["step_s"] > 0
    assert run["episodes_per_s"] == pytest.approx(2 / run["step_s"], rel=1e-2)  # W episodes per global step
