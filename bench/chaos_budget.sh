#!/usr/bin/env bash
# CPU-budget comparison on real data: QAMP vs the ADNet head vs the copy-support baseline.
#
#   bash bench/chaos_budget.sh [--overwrite]       # the full run: ~45 min per model (both at once: ~1 h)
#   bash bench/chaos_budget.sh --tiny              # end-to-end check in a few minutes (no results file)
#
# What it does: trains QAMP (model=qamp) and the ADNet head (model=adnet) with the SAME encoder,
# number of steps, learning rate and seed on CHAOST2 fold 0, Setting 1 (self-supervised on the
# published 3D supervoxels, n_sv 5000), tests both and the copy-support baseline with the standard
# protocol (supp_idx 2, 3 chunks, query slices holding the class), and writes
# bench/results/chaos_budget.md (per-organ Dice, mean, training and test time) and
# bench/results/chaos_budget.json, and prints one JSON line.
#
# Reduced configuration (the paper: ResNet-101 with DeepLabV3 weights, 40 000 steps, lr 1e-3):
#   - encoder: dilated ResNet-50, no pretrained weights (none ship offline; export
#     QAMP_PRETRAINED_PATH and set BENCH_PRETRAINED=imagenet to use ImageNet ResNet-50 weights);
#   - native 256 x 256 CHAOST2 slices; SGD momentum 0.9, weight decay 5e-4, lr BENCH_LR (2e-2:
#     training from scratch in few steps; 0.02 is the rate the synthetic demo learns with), one lr
#     step (x0.98) at the end;
#   - QAMP head with the CPU-sized prototype counts of the demo (fg 20 MLP + 10 query + 10 edge + 2,
#     bg 100 MLP + 20 query + 10 edge + 2; BENCH_PROTOTYPES=reference for 50+50+50+2 / 500+100+50+2);
#   - steps: BENCH_STEPS, or else sized for BENCH_MINUTES (45) of training per model on this machine
#     from a timing of a few forward/backward passes of each model at the start (the slower of the
#     two heads sets the number), the same number for both models. The result file states the steps.
#   - BENCH_PARALLEL=1 (default): the two models train (and test) at the same time, each with
#     BENCH_THREADS torch threads (default: half the CPUs; one core each on this 2-core machine), which
#     wastes nothing to thread oversubscription; BENCH_PARALLEL=0 runs them one after the other with
#     all cores each. The step timing uses the same thread count.
# Environment knobs [default]: DATA_DIR [../shared/data]  BENCH_DIR [runs/bench_chaos_budget]
#   BENCH_STEPS [auto]  BENCH_MINUTES [45]  BENCH_LR [0.02]  BENCH_SEED [2025]  BENCH_PARALLEL [1]
#   BENCH_THREADS [nproc / 2 when parallel, else nproc]
#   BENCH_BACKBONE [resnet50]  BENCH_PRETRAINED [none]  BENCH_PROTOTYPES [cpu]
# --tiny: 3 steps, test on the right kidney only, results kept in the run folder only.
# Timings on a shared CPU are noisy: the result file records the load average before and after.
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=0
OVERWRITE=0
for arg in "$@"; do
    case $arg in
        --tiny) TINY=1 ;;
        --overwrite) OVERWRITE=1 ;;
        *) echo "usage: bash bench/chaos_budget.sh [--tiny] [--overwrite]" >&2; exit 2 ;;
    esac
done

DATA_DIR=${DATA_DIR:-../shared/data}
BENCH_DIR=${BENCH_DIR:-runs/bench_chaos_budget}
MINUTES=${BENCH_MINUTES:-45}
LR=${BENCH_LR:-0.02}
SEED=${BENCH_SEED:-2025}
BACKBONE=${BENCH_BACKBONE:-resnet50}
PRETRAINED=${BENCH_PRETRAINED:-none}
PARALLEL=${BENCH_PARALLEL:-1}
NPROC=$(nproc)
THREADS=${BENCH_THREADS:-$([ "$PARALLEL" = 1 ] && echo $(( NPROC > 1 ? NPROC / 2 : 1 )) || echo "$NPROC")}
case ${BENCH_PROTOTYPES:-cpu} in
    cpu) PROTOTYPES="n_mlp_fg=40 n_keep_fg=20 n_query_fg=10 n_edge=10 n_mlp_bg=120 n_keep_bg=100 n_query_bg=20" ;;
    reference) PROTOTYPES="" ;;
    *) echo "BENCH_PROTOTYPES must be 'cpu' or 'reference', got '${BENCH_PROTOTYPES}'" >&2; exit 2 ;;
esac
RESULTS_MD=bench/results/chaos_budget.md
RESULTS_JSON=bench/results/chaos_budget.json
if [ "$TINY" = 0 ] && [ "$OVERWRITE" = 0 ] && { [ -e "$RESULTS_MD" ] || [ -e "$RESULTS_JSON" ]; }; then
    echo "$RESULTS_MD or $RESULTS_JSON exists: pass --overwrite to replace them" >&2
    exit 2
fi

PY=.venv/bin/python
[ -x "$PY" ] || bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUN_ROOT=$BENCH_DIR/$(date -u +%Y%m%d-%H%M%S)$([ "$TINY" = 1 ] && echo _tiny || true)
mkdir -p "$RUN_ROOT"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
COMMON=(abd_mri setting1 "data_dir=$DATA_DIR" seed="$SEED" eval_fold=0 backbone="$BACKBONE"
        pretrained_weights="$PRETRAINED" device=cpu $PROTOTYPES)
TEST_ARGS=(supp_idx=2 n_overlay_slices=1)
if [ "$TINY" = 1 ]; then
    STEPS=${BENCH_STEPS:-3}
    TEST_ARGS+=("test_label=[2]")
elif [ -n "${BENCH_STEPS:-}" ]; then
    STEPS=$BENCH_STEPS
else
    echo "[bench] timing the QAMP and ADNet training steps to size the budget ($MINUTES min)"
    STEPS=$($PY - "$MINUTES" "$BACKBONE" "$PROTOTYPES" "$THREADS" <<'EOF'
import sys, time, torch
from config import ex
from models import build_model, make_generator
minutes, backbone, protos = float(sys.argv[1]), sys.argv[2], sys.argv[3].split()
torch.set_num_threads(int(sys.argv[4]))
base = dict(ex.configurations[0]())  # the config.py defaults
base.update(backbone=backbone, pretrained_weights="none")
base.update({k: int(v) for k, v in (p.split("=") for p in protos)})
size, slowest = 256, 0.0
for name in ("qamp", "adnet"):
    model = build_model({**base, "model": name}, size).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = make_generator(0)
    s_img, q_img = torch.randn(1, 1, 3, size, size), torch.randn(1, 3, size, size)
    s_mask = torch.zeros(1, 1, size, size); s_mask[..., 96:160, 80:150] = 1
    q_lab = torch.zeros(1, size, size, dtype=torch.long); q_lab[..., 100:164, 84:150] = 1
    times = []
    for _ in range(4):  # the first pass warms up the allocator: dropped
        t = time.perf_counter()
        model(s_img, s_mask, q_img, q_lab, generator=gen)["loss"].backward()
        opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t)
    per_step = sum(times[1:]) / 3
    print(f"[bench] {name}: {per_step:.2f} s per step", file=sys.stderr)
    slowest = max(slowest, per_step)
print(max(10, int(minutes * 60 / (slowest * 1.1))))  # 10 % for data loading and augmentation
EOF
)
fi
echo "[bench] $STEPS steps per model, $THREADS thread(s) each, parallel=$PARALLEL; runs in $RUN_ROOT"

train_model() {  # $1 = qamp | adnet; writes the training seconds to $RUN_ROOT/train_$1.seconds
    local t0=$SECONDS
    OMP_NUM_THREADS=$THREADS $PY train.py with "${COMMON[@]}" model="$1" n_steps="$STEPS" optim.lr="$LR" max_iters_per_load="$STEPS" \
        save_snapshot_every="$STEPS" print_interval=$(( STEPS < 50 ? 1 : 50 )) num_workers=0 \
        "path.log_dir=$RUN_ROOT/train_$1" > "$RUN_ROOT/train_$1.log" 2>&1 \
        || { tail -20 "$RUN_ROOT/train_$1.log" >&2; echo "[bench] training $1 failed" >&2; return 1; }
    echo $(( SECONDS - t0 )) > "$RUN_ROOT/train_$1.seconds"
}
test_model() {  # $1 = qamp | adnet | copy_support; writes the test seconds to $RUN_ROOT/test_$1.seconds
    local t0=$SECONDS extra=()
    [ "$1" != copy_support ] && extra=("reload_model_path=$(ls -d "$RUN_ROOT/train_$1"/train_* | head -1)")
    OMP_NUM_THREADS=$THREADS $PY test.py with "${COMMON[@]}" model="$1" "${TEST_ARGS[@]}" "${extra[@]}" \
        "path.log_dir=$RUN_ROOT/test_$1" > "$RUN_ROOT/test_$1.log" 2>&1 \
        || { tail -20 "$RUN_ROOT/test_$1.log" >&2; echo "[bench] test of $1 failed" >&2; return 1; }
    echo $(( SECONDS - t0 )) > "$RUN_ROOT/test_$1.seconds"
}
both() {  # $1 = train_model | test_model: QAMP and ADNet, at the same time when PARALLEL=1
    if [ "$PARALLEL" = 1 ]; then
        "$1" qamp & local first=$!
        "$1" adnet & local second=$!
        local status=0
        wait "$first" || status=1
        wait "$second" || status=1
        return $status
    fi
    "$1" qamp && "$1" adnet
}

echo "[bench] training QAMP and ADNet"; both train_model
echo "[bench] testing";                 both test_model; test_model copy_support
TRAIN_QAMP=$(cat "$RUN_ROOT/train_qamp.seconds"); TRAIN_ADNET=$(cat "$RUN_ROOT/train_adnet.seconds")
TEST_QAMP=$(cat "$RUN_ROOT/test_qamp.seconds"); TEST_ADNET=$(cat "$RUN_ROOT/test_adnet.seconds")
TEST_COPY=$(cat "$RUN_ROOT/test_copy_support.seconds")
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
$PY -m utils.summarize "QAMP=$RUN_ROOT/test_qamp" "ADNet=$RUN_ROOT/test_adnet" \
    "copy_support=$RUN_ROOT/test_copy_support" --out "$RUN_ROOT/summary" > /dev/null

OUT_MD=$RUN_ROOT/chaos_budget.md
OUT_JSON=$RUN_ROOT/chaos_budget.json
$PY - "$RUN_ROOT" "$OUT_MD" "$OUT_JSON" <<EOF
import csv, json, sys, platform, os
from utils.io import write_json, write_text
root, out_md, out_json = sys.argv[1:]
rows = list(csv.DictReader(open(f"{root}/summary/summary.csv")))
dice = {}
for r in rows:
    dice.setdefault(r["method"], {})[r["class_name"]] = round(100 * float(r["mean"]), 2)
times = {"QAMP": {"train_s": $TRAIN_QAMP, "test_s": $TEST_QAMP},
         "ADNet": {"train_s": $TRAIN_ADNET, "test_s": $TEST_ADNET},
         "copy_support": {"train_s": 0, "test_s": $TEST_COPY}}
config = {"dataset": "CHAOST2", "fold": 0, "setting": 1, "supp_idx": 2, "steps": $STEPS, "lr": $LR,
          "seed": $SEED, "backbone": "$BACKBONE", "pretrained": "$PRETRAINED",
          "prototypes": "${BENCH_PROTOTYPES:-cpu}", "tiny": bool($TINY), "threads_per_model": $THREADS,
          "parallel": bool($PARALLEL)}
result = {"name": "chaos_budget", "config": config, "dice_percent": dice, "times_s": times,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
          "load_average_before": "$LOAD_BEFORE", "load_average_after": "$LOAD_AFTER", "runs": root}
table = open(f"{root}/summary/summary.md").read().split("\n\n")[1]
lines = [
    "# CPU-budget comparison on CHAOST2 (fold 0, Setting 1, supervoxels)", "",
    f"Command: \`bash bench/chaos_budget.sh\`; machine: {result['machine']}; load average before "
    f"{result['load_average_before']}, after {result['load_average_after']} (timings are noisy).", "",
    f"Configuration: {config['backbone']} dilated encoder, pretrained weights: {config['pretrained']}, "
    f"{config['steps']} steps for each model (same seed {config['seed']}, SGD lr {config['lr']}), "
    f"prototype counts: {config['prototypes']}; test: supp_idx 2, 3 chunks, protocol slices; "
    f"{config['threads_per_model']} torch thread(s) per model, the two models "
    f"{'trained and tested at the same time' if config['parallel'] else 'one after the other'}.", "",
    "Dice (%) per organ (mean over the fold's query scans; std over scans):", "", table, "",
    "| Method | training (s) | test (s) |", "|---|---:|---:|",
    *[f"| {m} | {t['train_s']} | {t['test_s']} |" for m, t in times.items()], "",
    f"Run folders: {root}", ""]
write_text(out_md, "\n".join(lines))
write_json(out_json, result)
print(json.dumps(result))
EOF
if [ "$TINY" = 0 ]; then
    cp "$OUT_MD" "$RESULTS_MD.tmp" && mv "$RESULTS_MD.tmp" "$RESULTS_MD"
    cp "$OUT_JSON" "$RESULTS_JSON.tmp" && mv "$RESULTS_JSON.tmp" "$RESULTS_JSON"
    echo "[bench] wrote $RESULTS_MD and $RESULTS_JSON" >&2
else
    echo "[bench] tiny run: results in $OUT_MD (bench/results untouched)" >&2
fi
