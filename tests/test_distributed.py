"""torchrun data parallelism on a CPU (2 gloo ranks): train.py against one process averaging the
gradients of the same episodes (parameters without a gradient included), rank 0 alone writing the
run folder, exact resume and its world-size rule; the gradient average's rule for parameters that
have a gradient on some ranks or on none (2 spawned gloo processes).

The runs are a ResNet-50 QAMP at 32 x 32 on the synthetic phantoms (tests/helpers.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import TINY_ARGS, experiment, make_phantoms, tiny_config  # noqa: E402
from engine import distributed as ddp  # noqa: E402
from engine.snapshot import load_snapshot  # noqa: E402

N_STEPS = 4


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=REPO, env=_env(), capture_output=True,
                          timeout=300, encoding="utf-8")


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


def _average_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of a gloo world: parameter 'both' has a gradient on every rank, 'one' on rank 0
    only, 'none' on no rank; writes the gradients after ``average_gradients`` and one SGD step."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.ModuleDict({name: nn.Linear(2, 1, bias=False) for name in ("both", "one", "none")})
    x = torch.tensor([[1.0 + rank, 2.0]])
    loss = model["both"](x).sum() + (model["one"](x).sum() if rank == 0 else 0.0)
    loss.backward()
    ddp.average_gradients(model, ddp.Distributed(rank, world))
    before = {name: m.weight.detach().clone() for name, m in model.items()}
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5).step()
    torch.save({"grads": {name: m.weight.grad for name, m in model.items()},
                "moved": {name: not torch.equal(m.weight, before[name]) for name, m in model.items()}},
               Path(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_average_gradients_follows_ddp_for_missing_gradients(tmp_path: Path) -> None:
    """As DDP(find_unused_parameters=True): a gradient on some ranks is averaged with zeros for the
    others; a parameter with no gradient on any rank keeps grad=None, so SGD's weight decay and
    momentum leave it alone (as in one process)."""
    from bench.gpu_step import free_port

    mp.spawn(_average_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        torch.testing.assert_close(result["grads"]["both"], torch.tensor([[1.5, 2.0]]), rtol=0, atol=0)
        torch.testing.assert_close(result["grads"]["one"], torch.tensor([[0.5, 1.0]]), rtol=0, atol=0)
        assert result["grads"]["none"] is None
        assert result["moved"] == {"both": True, "one": True, "none": False}


def build(data_dir: Path, log_dir: Path, n_steps: int, device: str = "cpu"):
    """Config, dataset, model (initialised from ``seed``), optimizer and scheduler as train.py builds them."""
    import train

    config = experiment().run("print_config", config_updates=tiny_config(data_dir, log_dir, n_steps=n_steps)).config
    data = train.resolve_dataset(config, training=True)
    dataset = train.build_dataset(config, data)
    torch.manual_seed(config["seed"])
    model = train.build_model(config, data.image_size).to(device).train()
    optimizer, scheduler = train.build_optimizer(model, config)
    return config, dataset, model, optimizer, scheduler


def averaged_gradient_steps(data_dir: Path, log_dir: Path, n_steps: int,
                            device: str = "cpu") -> tuple[list[float], torch.nn.Module, set]:
    """One process doing what 2 ranks should: step k averages the gradients of episodes 2k (generator
    (seed, 0)) and 2k + 1 (generator (seed, 1), on the CPU as train.py's). Returns the mean losses, the
    model and the names of the parameters that never had a gradient (SGD never moved them)."""
    import train
    from models import make_generator

    config, dataset, model, optimizer, scheduler = build(data_dir, log_dir, n_steps, device)
    generators = [make_generator(config["seed"], r) for r in range(2)]
    losses, touched = [], set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the thread count changes float rounding
    try:
        for step in range(n_steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for rank in range(2):
                batch = train.to_model_inputs(torch.utils.data.default_collate(
                    [dataset[ddp.episode_index(step, rank, 2)]]), torch.device(device))
                out = model(**batch, generator=generators[rank])
                (out["loss"] / 2).backward()
                total += out["loss"].item() / 2
            touched |= {name for name, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            scheduler.step()
            losses.append(total)
    finally:
        torch.set_num_threads(threads)
    # the two ranks' episodes differ (otherwise the comparison would prove little)
    assert not torch.equal(dataset[0]["query_images"], dataset[1]["query_images"])
    return losses, model, {name for name, _ in model.named_parameters()} - touched


def test_torchrun_train_equals_averaged_gradients_and_resumes_exactly(phantoms: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 train.py``: rank 0 alone writes the run folder; the trained weights
    and losses equal one process averaging the gradients of the same episodes (up to float rounding:
    the ranks' parameters stayed identical, or rank 0's would drift from it), and the parameters that
    had no gradient in any step (``encoder.reduce2`` always) exactly: weight decay on a zero gradient
    would shrink them by lr x weight_decay = 5e-7 (relative) in the first step already, several float32
    ulps; a resume from the step-2 snapshot gives the same losses and weights bit for bit; one process
    refuses that snapshot."""
    args = [*TINY_ARGS, f"data_dir={phantoms}", "save_snapshot_every=2", "keep_snapshots=2"]
    full = torchrun("train.py", "with", *args, f"n_steps={N_STEPS}", f"path.log_dir={tmp_path / 'a'}")
    assert full.returncode == 0, full.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("train_"))
    assert folders == ["train_custom_setting1_fold0"]  # rank 1 made no run folder
    run = tmp_path / "a" / folders[0]
    final = load_snapshot(run / "snapshots" / "final.pth")
    assert final["world_size"] == 2 and len(final["rank_states"]) == 2
    assert not torch.equal(final["rank_states"][0]["generator"], final["rank_states"][1]["generator"])
    assert len(final["history"]["loss"]) == N_STEPS

    losses, model, untouched = averaged_gradient_steps(phantoms, tmp_path / "reference", N_STEPS)
    assert final["history"]["loss"] == pytest.approx(losses, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(final["model"][name], param.detach(), rtol=1e-4, atol=1e-6, msg=name)
    assert {"encoder.reduce2.weight", "encoder.backbone.layer4.0.conv1.weight"} <= untouched
    for name in untouched:
        torch.testing.assert_close(final["model"][name], model.state_dict()[name], rtol=0, atol=0, msg=name)

    step2 = run / "snapshots" / "step_0000002.pth"
    resumed = torchrun("train.py", "with", *args, f"n_steps={N_STEPS}", f"resume={step2}",
                       f"path.log_dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_snapshot(tmp_path / "b" / "train_custom_setting1_fold0" / "snapshots" / "final.pth")
    assert again["history"]["loss"] == final["history"]["loss"]  # exact, step by step
    for key, value in final["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=0, atol=0, msg=key)

    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1"):
        experiment().run(command_name="train", config_updates=tiny_config(
            phantoms, tmp_path / "c", n_steps=N_STEPS, save_snapshot_every=2, keep_snapshots=2, resume=str(step2)))


def test_gpu_step_bench_runs_tiny_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_step.py at its CI setting (CPU, 2 gloo ranks spawned from here, bf16): one row with
    finite numbers."""
    from bench import gpu_step

    out = tmp_path / "gpu_step.json"
    assert gpu_step.main(["--tiny", "--world-sizes", "2", "--amp", "bf16", "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["ran_on_gpu"] is False and data["tiny"] is True and "not a GPU measurement" in data["note"]
    (run,) = data["runs"]
    assert (run["world_size"], run["amp"], run["backend"], run["peak_mem_kind"]) == (2, "bf16", "gloo", "cpu_max_rss")
    assert run["loss_finite"] and run["step_s"] > 0
    assert run["episodes_per_s"] == pytest.approx(2 / run["step_s"], rel=1e-2)  # W episodes per global step
