"""Worker of tests/test_distributed.py, started by ``torchrun --nproc_per_node 2`` (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py DATA_DIR OUT.pt N_STEPS

Each rank trains the tiny QAMP with ``train.train_step`` on its own episodes (``k * W + r``) and,
after every step, checks that all ranks hold bitwise identical parameters. Rank 0 saves the
per-step check results, the mean losses and the final parameters to OUT.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from tiny_phantoms import tiny_config  # noqa: E402


def build(data_dir: str, log_dir: str, n_steps: int):
    """Config, dataset and model exactly as train.py builds them (model init from ``seed``)."""
    from config import ex
    import train

    config = ex.run("print_config", config_updates=tiny_config(Path(data_dir), Path(log_dir), n_steps=n_steps)).config
    dataset, spec = train.build_dataset(config)
    torch.manual_seed(config["seed"])
    model = train.build_model(config, spec.image_size).train()
    optimizer, scheduler = train.build_optimizer(model, config)
    return config, dataset, model, optimizer, scheduler


def collate(episode: dict) -> dict:
    return torch.utils.data.default_collate([episode])


def main() -> None:
    import train
    from models import make_generator
    from utils import distributed as ddp

    data_dir, out, n_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist = ddp.setup("cpu")
    assert dist.enabled and dist.backend == "gloo", dist
    config, dataset, model, optimizer, scheduler = build(data_dir, str(Path(out).parent), n_steps)
    ddp.broadcast_parameters(model, dist)
    generator = make_generator(config["seed"], *dist.generator_keys)
    episodes = ddp.rank_episodes(dataset, dist)
    same, losses = [ddp.all_equal_parameters(model, dist)], []
    for step in range(n_steps):
        values = train.train_step(model, optimizer, scheduler, collate(episodes[step]), torch.device("cpu"),
                                  generator, None, dist)
        same.append(ddp.all_equal_parameters(model, dist))
        losses.append(values["loss"])
    if dist.is_main:
        torch.save({"same": same, "losses": losses, "world_size": dist.world_size,
                    "params": {k: v.detach().clone() for k, v in model.named_parameters()}}, out)
    ddp.teardown(dist)


if __name__ == "__main__":
    main()
