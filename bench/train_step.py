"""Training-step speed: QAMP versus the encoder alone at the same settings.

    .venv/bin/python bench/train_step.py [--backbone resnet101] [--size 256] [--steps 3] [--threads 2]
                                         [--reference-mlp] [--direct-conv]

One step = zero grads, forward of a 1-shot episode (support + query through the encoder as one
batch), backward of the loss, SGD update. ``encoder`` does the same with the encoder alone (loss =
mean of its features plus the threshold), so ``ratio = qamp / encoder`` is QAMP's overhead.
``--reference-mlp`` also times QAMP with ``fast_mlp=False`` (the MLPs over the 512 x (H*W) map);
``--direct-conv`` with ``decoder_winograd=False`` (the decoders' 3x3 convolutions by ``nn.Conv2d``).
The episode is synthetic (random images, rectangular masks; speed does not depend on the content)
and the weights random (no download). Real training runs the reverse (alignment) pass whenever the
predicted query mask is not empty; so that every timed step does too, the foreground decoder's
output layer is rescaled once so that about ``--fg-fraction`` of the query is predicted foreground,
the learning rate is 0 (the SGD update is computed all the same, the weights stay put) and every
step draws from a generator seeded alike (so the prediction, hence the work, is the same each step).
``reverse_steps`` counts the timed steps in which the reverse pass ran.
Prints one JSON line and writes ``bench/results/train_step.json`` (atomically).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from models import BACKBONES, build_model, make_generator  # noqa: E402
from bench.report import emit, machine  # noqa: E402
from engine.malloc import keep_freed_memory  # noqa: E402


def episode(size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    supp = torch.randn(1, 1, 3, size, size, generator=g)
    masks = torch.zeros(1, 1, size, size)
    masks[..., size // 4: size // 2, size // 3: 2 * size // 3] = 1
    qry = torch.randn(1, 3, size, size, generator=g)
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, size // 4 + size // 16: size // 2 + size // 16, size // 3: 2 * size // 3] = 1
    return supp, masks, qry, labels


def time_steps(step_fn, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step_fn()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return wall, cpu


@torch.no_grad()
def predict_some_foreground(model, supp, masks, qry, fraction: float, seed: int) -> None:
    """Rescale ``fg_decoder.head`` so that ``fraction`` of the query positions have fg logit > bg logit
    (the reverse pass then runs in every step). The generator lives on the query's device."""
    logits = {}
    hooks = [getattr(model, name).head.register_forward_hook(lambda m, i, o, name=name: logits.__setitem__(name, o))
             for name in ("fg_decoder", "bg_decoder")]
    model(supp, masks, qry, generator=make_generator(seed, device=qry.device))
    for hook in hooks:
        hook.remove()
    fg, bg = logits["fg_decoder"].flatten(), logits["bg_decoder"].flatten()
    if (fg > 0).sum() < (fg < 0).sum():
        fg = -fg
        model.fg_decoder.head.weight.neg_()
    ratio = (bg[fg > 0] / fg[fg > 0]).sort().values  # alpha * fg > bg  <=>  alpha > bg / fg
    alpha = float(ratio[min(len(ratio) - 1, int(fraction * len(fg)))].clamp(min=1e-3)) * 1.01
    model.fg_decoder.head.weight.mul_(alpha)


def bench_qamp(cfg: dict, size: int, steps: int, warmup: int, seed: int, fg_fraction: float) -> dict:
    torch.manual_seed(seed)  # parameter init only
    model = build_model(cfg, size).train()
    supp, masks, qry, labels = episode(size, seed)
    predict_some_foreground(model, supp, masks, qry, fg_fraction, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    reverse, fg_share = [], []

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(supp, masks, qry, labels, generator=make_generator(seed))
        out["loss"].backward()
        optimizer.step()
        reverse.append(bool(out["losses"]["align"].item() > 0))
        fg_share.append(float((out["pred"].argmax(dim=1) == 1).float().mean()))

    wall, cpu = time_steps(step, steps, warmup)
    return {"wall": wall, "cpu": cpu, "reverse_steps": sum(reverse[warmup:]),
            "fg_share": round(statistics.median(fg_share[warmup:]), 3)}


def bench_encoder(cfg: dict, size: int, steps: int, warmup: int, seed: int) -> dict:
    torch.manual_seed(seed)
    encoder = build_model(cfg, size).encoder.train()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    supp, _, qry, _ = episode(size, seed)
    images = torch.cat([supp[0], qry])

    def step():
        optimizer.zero_grad(set_to_none=True)
        feats, thresholds = encoder(images)
        (feats.mean() + thresholds.mean()).backward()
        optimizer.step()

    wall, cpu = time_steps(step, steps, warmup)
    return {"wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=BACKBONES)
    parser.add_argument("--size", type=int, default=256, help="image size H = W")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (the heap grows to its steady size in the first two)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--reference-mlp", action="store_true", help="also time QAMP with fast_mlp=False")
    parser.add_argument("--direct-conv", action="store_true", help="also time QAMP with decoder_winograd=False")
    parser.add_argument("--fg-fraction", type=float, default=0.25, help="share of the query predicted foreground")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave glibc malloc as it is (config key keep_freed_memory=False)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_keep_freed_memory:
        keep_freed_memory()
    cfg = {"backbone": args.backbone, "pretrained_weights": "none"}

    runs = {"encoder": bench_encoder(cfg, args.size, args.steps, args.warmup, args.seed),
            "qamp": bench_qamp(cfg, args.size, args.steps, args.warmup, args.seed, args.fg_fraction)}
    if args.reference_mlp:
        runs["qamp_reference_mlp"] = bench_qamp({**cfg, "fast_mlp": False}, args.size, args.steps, args.warmup,
                                                args.seed, args.fg_fraction)
    if args.direct_conv:
        runs["qamp_direct_conv"] = bench_qamp({**cfg, "decoder_winograd": False}, args.size, args.steps, args.warmup,
                                              args.seed, args.fg_fraction)
    median = {name: {k: statistics.median(run[k]) for k in ("wall", "cpu")} for name, run in runs.items()}
    result = {
        "bench": "train_step",
        "backbone": args.backbone,
        "size": args.size,
        "threads": args.threads,
        "steps": args.steps,
        "encoder_s": round(median["encoder"]["wall"], 3),
        "qamp_s": round(median["qamp"]["wall"], 3),
        "ratio": round(median["qamp"]["wall"] / median["encoder"]["wall"], 3),
        "encoder_cpu_s": round(median["encoder"]["cpu"], 3),
        "qamp_cpu_s": round(median["qamp"]["cpu"], 3),
        "ratio_cpu": round(median["qamp"]["cpu"] / median["encoder"]["cpu"], 3),
        "ratio_target": 1.35,
        "keep_freed_memory": not args.no_keep_freed_memory,
        "reverse_steps": runs["qamp"]["reverse_steps"],
        "predicted_fg_share": runs["qamp"]["fg_share"],
    }
    if args.reference_mlp:
        result["qamp_reference_mlp_s"] = round(median["qamp_reference_mlp"]["wall"], 3)
        result["qamp_reference_mlp_cpu_s"] = round(median["qamp_reference_mlp"]["cpu"], 3)
        result["ratio_reference_mlp"] = round(median["qamp_reference_mlp"]["wall"] / median["encoder"]["wall"], 3)
    if args.direct_conv:
        result["qamp_direct_conv_s"] = round(median["qamp_direct_conv"]["wall"], 3)
        result["qamp_direct_conv_cpu_s"] = round(median["qamp_direct_conv"]["cpu"], 3)
        result["ratio_direct_conv"] = round(median["qamp_direct_conv"]["wall"] / median["encoder"]["wall"], 3)
    result.update({
        **machine(),
        "note": "wall-clock times are noisy when the CPU is shared (see load_average_1min); cpu_s = process CPU time",
    })
    emit(result, args.out)


if __name__ == "__main__":
    main()
