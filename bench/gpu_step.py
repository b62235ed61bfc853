"""Training-step throughput and peak memory for amp=off|bf16 on 1..N GPUs (data parallel).

    python bench/gpu_step.py                          # ResNet-101, 256 px, amp off,bf16, 1..all GPUs
    python bench/gpu_step.py --world-sizes 1,2,4,8 --amp off,bf16,fp16 --steps 30
    python bench/gpu_step.py --tiny                   # CPU, ResNet-50 at 32 px, 1 and 2 gloo ranks (CI)

One step is what ``train.py`` does per global step: every rank runs forward + backward of a 1-shot
episode (its own synthetic episode: random images, rectangular masks), the gradients are averaged
over the ranks (``engine.distributed``, NCCL on GPUs, gloo on a CPU), and SGD steps. It runs as
``train.py`` does: deterministic kernels by default (``set_determinism``, train.py's default
``deterministic=True``; ``--nondeterministic`` for the other setting), mixed precision through
``engine.amp`` (encoder under autocast, the head and losses float32, TF32 off on CUDA), the
prototype-sampling generator on the CPU, rank 0's parameters broadcast before anything is decided.
As in bench/train_step.py the weights are random (no download), the foreground decoder is rescaled
once so that the reverse (alignment) pass runs (rank 0 decides on its episode after the broadcast,
the rescaled head is broadcast again, so every rank has the same parameters and decides about its
own reverse pass as in training: ``reverse_steps`` counts, per rank, the timed steps that ran it),
and the learning rate is 0, so each step does the same work.

Every configuration (world size, amp) runs in processes of its own (spawned; also for one rank),
so none inherits another's CUDA context or allocator; this process itself never initialises CUDA.
``--device``: ``auto`` / ``cuda`` / ``cpu``, or ``cuda:<i>`` for world size 1 (ranks of a larger
world take ``cuda:<LOCAL_RANK>``, as under torchrun; choose GPUs with ``CUDA_VISIBLE_DEVICES``).

Reported per (world size, amp): median step time over ``--steps`` timed steps after ``--warmup``
(CUDA synchronised), global steps/s, episodes/s (= steps/s x world size), and peak memory: the
largest ``torch.cuda.max_memory_allocated`` over the ranks on GPUs, the largest process RSS on a CPU.
Writes ``bench/results/gpu_step.json`` (``--out``) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.train_step import episode, predict_some_foreground  # noqa: E402
from models import build_model, make_generator  # noqa: E402
from engine import distributed as ddp  # noqa: E402
from engine.amp import Amp  # noqa: E402
from engine.runtime import resolve_device, set_determinism  # noqa: E402
from bench.report import emit, machine  # noqa: E402

TINY = {"n_mlp_fg": 8, "n_keep_fg": 4, "n_query_fg": 4, "n_edge": 4, "n_mlp_bg": 16, "n_keep_bg": 8,
        "n_query_bg": 4, "feature_dim": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, amp_mode: str, out_dir: str) -> None:
    """One rank: build, warm up, time ``args.steps`` data-parallel steps, write its numbers."""
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist = ddp.setup(args.device)
    device = dist.device or resolve_device(args.device)  # as train.py; cuda:<i> honoured on one rank
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    set_determinism(args.deterministic)
    cfg = {"backbone": args.backbone, "pretrained_weights": "none", **(TINY if args.tiny else {})}
    torch.manual_seed(args.seed)
    model = build_model(cfg, args.size).to(device).train()
    ddp.broadcast_parameters(model, dist)
    supp, masks, qry, labels = (t.to(device) for t in episode(args.size, args.seed + rank))
    if dist.is_main:  # rank 0 decides on its episode, every rank gets its parameters
        predict_some_foreground(model, supp, masks, qry, args.fg_fraction, args.seed)
    ddp.broadcast_parameters(model, dist)
    amp = Amp(amp_mode, device).apply(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, reverse = [], 0
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(supp, masks, qry, labels, generator=make_generator(args.seed, *dist.generator_keys))
        ddp.backward_step(out["loss"], model, optimizer, amp, dist)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            reverse += bool((out["pred"].detach().argmax(dim=1) == 1).any())  # train.py's reverse_ran
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    record = {"rank": rank, "times": times, "peak_bytes": int(peak), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "backend": dist.backend, "loss_finite": bool(torch.isfinite(out["loss"])), "reverse_steps": reverse}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    ddp.teardown(dist)


def measure(world: int, amp_mode: str, args: argparse.Namespace) -> dict:
    """One configuration in ``world`` spawned processes (one for world size 1 too)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, free_port(), args, amp_mode, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
    step = statistics.median(max(ts) for ts in zip(*(r["times"] for r in ranks)))  # slowest rank per step
    return {"world_size": world, "amp": amp_mode, "step_s": round(step, 4), "steps_per_s": round(1 / step, 3),
            "episodes_per_s": round(world / step, 3),
            "peak_mem_gib": round(max(r["peak_bytes"] for r in ranks) / 2**30, 3),
            "peak_mem_kind": "cuda_max_allocated" if ranks[0]["device"].startswith("cuda") else "cpu_max_rss",
            "device": ranks[0]["device_name"], "devices": [r["device"] for r in ranks], "backend": ranks[0]["backend"],
            "loss_finite": all(r["loss_finite"] for r in ranks), "reverse_steps": [r["reverse_steps"] for r in ranks]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "resnet50"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--amp", default="off,bf16", help="modes, comma separated (off, bf16, fp16)")
    parser.add_argument("--world-sizes", default=None, help="e.g. 1,2,4 [1..number of GPUs; 1,2 on a CPU]")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank [cores / ranks]")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i> (world size 1)")
    parser.add_argument("--nondeterministic", dest="deterministic", action="store_false",
                        help="deterministic=False (train.py's default is deterministic kernels)")
    parser.add_argument("--tiny", action="store_true",
                        help="CI setting: CPU, ResNet-50 at 32 px, few prototypes, 2 steps, 1 and 2 ranks")
    parser.add_argument("--fg-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_step.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.size, args.steps, args.warmup, args.device = "resnet50", 32, 2, 1, "cpu"
        args.threads = args.threads or 1  # CI machines are small and shared
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.world_sizes:
        worlds = [int(w) for w in args.world_sizes.split(",")]
    else:
        worlds = list(range(1, torch.cuda.device_count() + 1)) if use_cuda else [1, 2]
    if use_cuda and max(worlds) > torch.cuda.device_count():
        parser.error(f"--world-sizes {worlds}: only {torch.cuda.device_count()} GPU(s) here")
    if args.device.startswith("cuda:") and max(worlds) > 1:
        parser.error(f"--device {args.device} with world sizes {worlds}: rank r uses cuda:r; choose the GPUs "
                     "with CUDA_VISIBLE_DEVICES and --device cuda")
    cores = len(os.sched_getaffinity(0))
    runs = []
    for world in worlds:
        for amp_mode in args.amp.split(","):
            threads = args.threads or max(1, cores // world)
            run = measure(world, amp_mode, argparse.Namespace(**{**vars(args), "threads": threads}))
            run["threads_per_rank"] = threads
            print(json.dumps(run), flush=True)
            runs.append(run)
    result = {"bench": "gpu_step", "ran_on_gpu": use_cuda, "backbone": args.backbone, "size": args.size,
              "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny, "deterministic": args.deterministic,
              "runs": runs,
              **machine()}
    if not use_cuda:
        result["note"] = ("CPU run (not a GPU measurement): checks the code path; times on a shared CPU are "
                          "noisy and peak memory is the process RSS")
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
