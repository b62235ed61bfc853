"""Data-parallel training with ``torchrun``: process group, episodes per rank, gradient all-reduce.

    torchrun --standalone --nproc_per_node 4 train.py with abd_mri setting1 eval_fold=0   # 4 GPUs
    torchrun --standalone --nproc_per_node 2 train.py with ... device=cpu                  # 2 CPU ranks

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``; :func:`setup` joins
the process group (NCCL on CUDA, rank ``r`` on ``cuda:<LOCAL_RANK>``; gloo on a CPU). Without
``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op and training is unchanged.

Semantics (``W`` = world size, ``r`` = rank):

* **Episodes**: at global step ``k`` rank ``r`` trains on ``TrainDataset.episode(k * W + r)``
  (:class:`RankEpisodes`): the ranks together see episodes ``0 .. W * n_steps - 1`` of the seeded
  stream once each, and ``W = 1`` is the single-process run. ``n_steps`` counts global steps: a
  run on W ranks sees W times as many episodes (the batch is W episodes; the learning rate is not
  scaled automatically).
* **Randomness**: every rank seeds torch's global stream with ``seed`` (identical initial
  parameters; rank 0's are broadcast anyway); the prototype-sampling / dropout generator of rank
  ``r`` is ``make_generator(seed, r)`` when ``W > 1`` (``make_generator(seed)`` when ``W = 1``).
* **Gradients**: after backward every rank's gradients are summed with ``all_reduce`` and divided
  by ``W``, so every rank takes the same SGD step: the step of the mean loss of the W episodes,
  exactly what one process averaging the W episodes' gradients does. A parameter without a
  gradient on some ranks (e.g. where the reverse pass was skipped) gets the sum of the others
  divided by ``W`` (those ranks contribute zeros); a parameter without a gradient on every rank
  keeps ``grad=None``, so SGD leaves it alone (no weight decay, no momentum), as in one process.
  This is what ``torch.nn.parallel.DistributedDataParallel(find_unused_parameters=True)`` does
  (its reducer all-reduces a "used" map with the gradients and, for a parameter unused on every
  rank, leaves ``grad`` untouched: ``Reducer::copy_bucket_to_grad`` in torch's
  ``torch/csrc/distributed/c10d/reducer.cpp``). Parameters stay identical on all ranks.
* **Logged loss terms** are the means over ranks.
* **Rank 0 alone** has Sacred observers (``config.run_commandline`` adds ``--unobserved`` on other
  ranks), hence the only run folder, ``logger.log``, ``metrics.json`` and snapshots.
* **Snapshots** hold, besides rank 0's state, ``world_size`` and ``rank_states`` (each rank's
  generator and global RNG states, gathered at the snapshot step). Resume is exact for the same
  world size; a snapshot written with another world size is refused (the episode-to-rank mapping
  and the per-rank generators would differ). Snapshots of single-process runs have no
  ``world_size`` key and mean ``W = 1``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset

from utils.seed import capture_rng_state, restore_generator, restore_rng_state


def env_rank() -> int:
    """The process's rank from the environment (``RANK``, set by torchrun); 0 without torchrun."""
    return int(os.environ.get("RANK", "0") or 0)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on rank 0 and in every single-process run."""
    return env_rank() == 0


@dataclass
class Distributed:
    """The process's place in the world (``world_size == 1``: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None  # the rank's device (None: resolve from the config)
    backend: Optional[str] = None
    owns_group: bool = False  # this module initialised the process group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def generator_keys(self) -> tuple[int, ...]:
        """Extra keys of ``make_generator(seed, *keys)``: the rank when ``W > 1``, none otherwise."""
        return (self.rank,) if self.enabled else ()


def setup(device_name: str = "auto") -> Distributed:
    """Join the torchrun world (or describe the single process when there is none).

    Args:
        device_name: the config's ``device``. Under torchrun, ``'auto'`` / ``'cuda'`` mean
            ``cuda:<LOCAL_RANK>`` with NCCL when CUDA is present, else the CPU with gloo; ``'cpu'``
            forces gloo on the CPU; ``'cuda:<i>'`` is refused (each rank takes its own GPU).

    Raises:
        ValueError: ``device='cuda:<i>'`` with several ranks, or CUDA asked for but absent.
    """
    world = env_world_size()
    if world <= 1:
        return Distributed()
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda:"):
        raise ValueError(f"device={device_name!r} with {world} torchrun ranks: use device='auto' or 'cuda' "
                         f"(rank r uses cuda:<LOCAL_RANK>) or restrict GPUs with CUDA_VISIBLE_DEVICES")
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not use_cuda:
        raise ValueError("device='cuda' but CUDA is not available here: use device='auto' or 'cpu'")
    if use_cuda:
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if rank != 0:  # one copy of the progress log: rank 0's
        logging.getLogger("qamp").setLevel(logging.WARNING)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Distributed(rank, world, local_rank, device, backend, owns)


def teardown(info: Distributed) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------------
def episode_index(step: int, rank: int, world_size: int) -> int:
    """Episode trained by ``rank`` at global step ``step``: ``step * world_size + rank``."""
    return step * world_size + rank


class RankEpisodes(Dataset):
    """View of a step-indexed dataset for one rank: item ``k`` is ``dataset[k * W + r]``."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, step: int):
        return self.dataset[episode_index(int(step), self.rank, self.world_size)]


def rank_episodes(dataset: Dataset, info: Distributed) -> Dataset:
    """``dataset`` itself for one process, else its :class:`RankEpisodes` view."""
    return RankEpisodes(dataset, info.rank, info.world_size) if info.enabled else dataset


# ----------------------------------------------------------------------------------------------
# Parameters, gradients, logged values
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def broadcast_parameters(model: nn.Module, info: Distributed) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.enabled:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def average_gradients(model: nn.Module, info: Distributed) -> None:
    """Mean of every parameter's gradient over the ranks, as DDP with ``find_unused_parameters``.

    A rank without a gradient for a parameter contributes zeros; a parameter without a gradient on
    every rank keeps ``grad=None`` (see the module docstring). One flat buffer and one
    ``all_reduce`` per step: the gradients followed by one "has a gradient" flag per parameter.
    After it every rank holds the same gradients, so the SGD step keeps the parameters identical.
    """
    if not info.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1) for g in grads), present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    used = flat[-len(params):].tolist()  # how many ranks had a gradient, per parameter
    flat.div_(info.world_size)
    offset = 0
    for p, ranks in zip(params, used):
        averaged = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if ranks == 0:
            continue  # no rank has a gradient: grad stays None, as in one process
        if p.grad is None:
            p.grad = averaged.clone()
        else:
            p.grad.copy_(averaged)


def mean_values(values: Mapping[str, float], info: Distributed) -> dict[str, float]:
    """Mean of each logged value over the ranks (the values themselves for one process)."""
    if not info.enabled:
        return dict(values)
    keys = list(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist())}


def backward_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, amp=None,
                  info: Optional[Distributed] = None) -> bool:
    """Backward, gradient all-reduce (several ranks), optimizer step; through ``amp``'s GradScaler.

    Replaces ``loss.backward(); optimizer.step()`` in ``train.train_step``. With ``amp=None`` and
    one process it is exactly that. Returns whether the optimizer stepped (False only when the fp16
    GradScaler skipped the step: ``engine.amp.Amp.backward_step``; the same on every rank).
    """
    def reduce() -> None:
        if info is not None:
            average_gradients(model, info)

    if amp is None:
        loss.backward()
        reduce()
        optimizer.step()
        return True
    return amp.backward_step(loss, optimizer, before_step=reduce)


# ----------------------------------------------------------------------------------------------
# Snapshots
# ----------------------------------------------------------------------------------------------
def snapshot_extras(info: Distributed, generator: torch.Generator, amp=None) -> dict[str, Any]:
    """Keys added to a training snapshot. Collective under torchrun: every rank must call it.

    ``world_size`` and ``rank_states`` (one ``{'generator', 'rng'}`` per rank) when ``W > 1``;
    ``amp_scaler`` (the GradScaler state) for fp16.
    """
    extras: dict[str, Any] = {}
    if amp is not None and amp.state_dict():
        extras["amp_scaler"] = amp.state_dict()
    if info.enabled:
        mine = {"generator": generator.get_state(),
                "rng": capture_rng_state(cuda=info.device is not None and info.device.type == "cuda")}
        states: list[Any] = [None] * info.world_size
        dist.all_gather_object(states, mine)
        extras["world_size"] = info.world_size
        extras["rank_states"] = states
    return extras


def check_world_size(snapshot: Mapping[str, Any], info: Distributed, source: str = "the snapshot") -> None:
    """Refuse to resume a snapshot written with another world size.

    Raises:
        ValueError: naming both world sizes.
    """
    saved = int(snapshot.get("world_size", 1))
    if saved != info.world_size:
        raise ValueError(f"resume: {source} was written by {saved} process(es) and this run has "
                         f"{info.world_size}: resume with the same torchrun --nproc_per_node ({saved}); "
                         f"exact resume needs the same episode-to-rank mapping and per-rank generators")


def restore_extras(snapshot: Mapping[str, Any], info: Distributed, generator: torch.Generator, amp=None,
                   source: str = "the snapshot", log: Optional[logging.Logger] = None) -> None:
    """After ``train.restore``: this rank's generator / RNG states and the GradScaler state.

    As ``train.restore`` does for rank 0's states: a generator state of another kind (a CUDA
    generator's, from a snapshot written before the training generator lived on the CPU) leaves
    this rank's generator at its seeding, with a warning; CUDA states are restored only when this
    rank uses CUDA (``utils.seed.restore_rng_state``; ``train.restore`` logged its notes).
    """
    check_world_size(snapshot, info, source)
    if info.enabled:
        mine = snapshot["rank_states"][info.rank]
        if not restore_generator(generator, mine["generator"]):
            (log or logging.getLogger("qamp")).warning(
                f"resume: rank {info.rank}'s prototype-sampling / dropout generator in {source} is another kind of "
                "generator (CUDA): it restarts from its seed")
        restore_rng_state(mine["rng"], cuda=info.device is not None and info.device.type == "cuda")
    if amp is not None:
        amp.load_state_dict(snapshot.get("amp_scaler"))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def rank_argv(argv: Sequence[str]) -> list[str]:
    """Sacred argv for this rank: non-zero ranks run ``--unobserved`` (no run folder, no observer)."""
    argv = list(argv)
    if not is_main_process() and "-u" not in argv and "--unobserved" not in argv:
        argv.append("--unobserved")
    return argv


def print_rank0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)
