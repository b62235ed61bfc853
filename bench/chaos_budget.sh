#!/usr/bin/env bash
# Real-data CPU-budget comparison: QAMP vs the ADNet head vs the copy-support baseline on CHAOST2.
#
#   bash bench/chaos_budget.sh [--overwrite]     # the full run (about 75 min of training per model, both at once)
#   bash bench/chaos_budget.sh --tiny            # end-to-end check in a few minutes (results stay in the run folder)
#
# What it does, with the same budget and settings for both networks:
#   - trains QAMP (model=qamp) and the ADNet head (model=adnet) on CHAOST2 fold 0, Setting 1,
#     self-supervised on the published 3D supervoxels, from scratch, with the named configuration
#     `cpu_budget` (config.py: 64 x 64 slices, dilated ResNet-50, fewer prototypes, lr 0.02 with
#     one x0.25 step, validation every 500 steps on training scans 38 and 39), same seed and steps;
#   - tests both, and the copy-support baseline, with the standard protocol (3 chunks, query
#     slices holding the class) on supp_idx 0, 1 and 2; Dice on the native 256 x 256 grid;
#   - writes bench/results/chaos_budget.md (table, times, validation curves) and
#     bench/results/chaos_budget.json (dice_percent.<method>.<class|mean>, times_s.<method>.train_s,
#     val_curve.<method>), copies both validation-curve PNGs beside them, prints one JSON line.
# The two models train (and test) side by side with BENCH_THREADS torch threads each (default: one
# core each on a 2-core machine), so nothing is lost to oversubscription. Keep the machine otherwise
# idle: the result file records the load average before and after.
# Environment knobs [default]: DATA_DIR [$QAMP_DATA_ROOT; one of them must be set]  BENCH_DIR [runs/bench_chaos_budget]
#   BENCH_STEPS [cpu_budget's n_steps]  BENCH_SEED [2025]  BENCH_SUPPORTS ["0 1 2"]
#   BENCH_PARALLEL [1]  BENCH_THREADS [nproc / 2 when parallel, else nproc]  BENCH_EXTRA [""] (more
#   `key=value` overrides for training both models, e.g. "supervoxel_source=generate"; the tests take
#   them from the snapshots)
# --tiny: 6 steps, validation every 3, test on the right kidney only.
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

DATA_DIR=${DATA_DIR:-${QAMP_DATA_ROOT:?set DATA_DIR or QAMP_DATA_ROOT to the folder holding CHAOST2/ (data/README.md)}}
BENCH_DIR=${BENCH_DIR:-runs/bench_chaos_budget}
SEED=${BENCH_SEED:-2025}
SUPPORTS=${BENCH_SUPPORTS:-0 1 2}
PARALLEL=${BENCH_PARALLEL:-1}
NPROC=$(nproc)
THREADS=${BENCH_THREADS:-$([ "$PARALLEL" = 1 ] && echo $(( NPROC > 1 ? NPROC / 2 : 1 )) || echo "$NPROC")}
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"
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
COMMON=(abd_mri setting1 cpu_budget "data_dir=$DATA_DIR" seed="$SEED" eval_fold=0 device=cpu)
TRAIN_ARGS=(num_workers=0 "${EXTRA[@]}")
TEST_ARGS=(n_overlay_slices=1)
if [ "$TINY" = 1 ]; then
    STEPS=${BENCH_STEPS:-6}
    TRAIN_ARGS+=(val_interval=3 print_interval=3)
    TEST_ARGS+=("test_label=[2]")
else
    STEPS=${BENCH_STEPS:-$($PY -c "from config import ex; print(ex.named_configs['cpu_budget']()['n_steps'])")}
fi
TRAIN_ARGS+=(n_steps="$STEPS" max_iters_per_load=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 )) save_snapshot_every="$STEPS")
echo "[bench] $STEPS steps per model, $THREADS thread(s) each, parallel=$PARALLEL, supports $SUPPORTS; runs in $RUN_ROOT"

train_model() {  # $1 = qamp | adnet; writes the training seconds to $RUN_ROOT/train_$1.seconds
    local t0=$SECONDS
    OMP_NUM_THREADS=$THREADS $PY train.py with "${COMMON[@]}" model="$1" "${TRAIN_ARGS[@]}" \
        "path.log_dir=$RUN_ROOT/train_$1" > "$RUN_ROOT/train_$1.log" 2>&1 \
        || { tail -20 "$RUN_ROOT/train_$1.log" >&2; echo "[bench] training $1 failed" >&2; return 1; }
    echo $(( SECONDS - t0 )) > "$RUN_ROOT/train_$1.seconds"
}
test_model() {  # $1 = qamp | adnet | copy_support, every support; writes $RUN_ROOT/test_$1.seconds
    local t0=$SECONDS extra=() supp
    [ "$1" != copy_support ] && extra=("reload_model_path=$(ls -d "$RUN_ROOT/train_$1"/train_* | head -1)")
    for supp in $SUPPORTS; do
        OMP_NUM_THREADS=$THREADS $PY test.py with "${COMMON[@]}" model="$1" supp_idx="$supp" "${TEST_ARGS[@]}" \
            "${extra[@]}" "path.log_dir=$RUN_ROOT/test_$1" > "$RUN_ROOT/test_$1_supp$supp.log" 2>&1 \
            || { tail -20 "$RUN_ROOT/test_$1_supp$supp.log" >&2; echo "[bench] test of $1 (supp_idx $supp) failed" >&2; return 1; }
    done
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

echo "[bench] training QAMP and ADNet ($(date -u +%H:%M) UTC)"; both train_model
echo "[bench] testing ($(date -u +%H:%M) UTC)";                  both test_model; test_model copy_support
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
$PY -m tools.summarize "QAMP=$RUN_ROOT/test_qamp" "ADNet=$RUN_ROOT/test_adnet" \
    "copy_support=$RUN_ROOT/test_copy_support" --out "$RUN_ROOT/summary" > /dev/null

$PY - "$RUN_ROOT" "$STEPS" "$SEED" "$TINY" "$THREADS" "$PARALLEL" "$LOAD_BEFORE" "$LOAD_AFTER" "$SUPPORTS" \
    "${EXTRA[*]:-}" <<'EOF'
import csv, glob, json, os, platform, shutil, sys
from pathlib import Path
from utils.io import write_json, write_text
from engine.snapshot import load_snapshot
root, steps, seed, tiny, threads, parallel, load_before, load_after, supports, extra = sys.argv[1:]
root = Path(root)
budget_s = 90 * 60
dice, per_support = {}, {}
for r in csv.DictReader(open(root / "summary" / "summary.csv", encoding="utf-8")):
    dice.setdefault(r["method"], {})[r["class_name"]] = round(100 * float(r["mean"]), 2)
for method, folder in (("QAMP", "test_qamp"), ("ADNet", "test_adnet"), ("copy_support", "test_copy_support")):
    for path in sorted(glob.glob(str(root / folder / "*" / "summary.json"))):
        summary = json.load(open(path, encoding="utf-8"))
        per_support.setdefault(method, {})[str(summary["supp_idx"])] = round(100 * summary["mean_dice"], 2)
seconds = lambda name: int(open(root / name, encoding="utf-8").read())
times = {"QAMP": {"train_s": seconds("train_qamp.seconds"), "test_s": seconds("test_qamp.seconds")},
         "ADNet": {"train_s": seconds("train_adnet.seconds"), "test_s": seconds("test_adnet.seconds")},
         "copy_support": {"train_s": 0, "test_s": seconds("test_copy_support.seconds")}}
val_curve, val_share, curves = {}, {}, {}
for method, name in (("QAMP", "qamp"), ("ADNet", "adnet")):
    run = Path(sorted(glob.glob(str(root / f"train_{name}" / "train_*")))[0])
    snap = load_snapshot(run / "snapshots" / "final.pth")
    val_curve[method] = [{"step": p["step"], "mean": round(100 * p["mean"], 2),
                          "dice": {k: round(100 * v, 2) for k, v in p["dice"].items()}} for p in snap["val"]]
    log = (run / "logger.log").read_text(encoding="utf-8").splitlines()
    done = [l for l in log if "validation took" in l]
    val_s = float(done[-1].split("validation took ")[1].split(" s")[0]) if done else 0.0
    val_share[method] = round(100 * val_s / max(1, times[method]["train_s"] - val_s), 2)
    curves[method] = run / "val_curve.png"
config = {"dataset": "CHAOST2", "fold": 0, "setting": 1, "supervision": "supervoxels_5000 (published)",
          "named_config": "cpu_budget", "extra_overrides": extra, "steps": int(steps), "seed": int(seed),
          "supp_idx": [int(s) for s in supports.split()], "dice_grid": "native 256 x 256",
          "tiny": tiny == "1", "threads_per_model": int(threads), "parallel": parallel == "1"}
result = {"name": "chaos_budget", "config": config, "dice_percent": dice, "dice_percent_by_support": per_support,
          "times_s": times, "val_curve": val_curve, "val_share_of_training_percent": val_share,
          "within_90_min_training": all(t["train_s"] <= budget_s for t in times.values()),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_before": load_before,
          "load_average_after": load_after, "runs": str(root)}
table = open(root / "summary" / "summary.md", encoding="utf-8").read().split("\n\n")[1]
classes = list(next(iter(val_curve.values()))[-1]["dice"]) if val_curve["QAMP"] else []
lines = [
    "# CPU-budget comparison on CHAOST2 (fold 0, Setting 1, self-supervised on supervoxels)", "",
    f"Command: `bash bench/chaos_budget.sh`; machine: {result['machine']}; load average before "
    f"{load_before}, after {load_after}.", "",
    f"Configuration: `with abd_mri setting1 cpu_budget` ({extra or 'no other overrides'}): 64 x 64 slices, "
    f"dilated ResNet-50 from scratch, {steps} steps per model (seed {seed}), {threads} torch thread(s) per model, "
    f"the two models {'side by side' if parallel == '1' else 'one after the other'}. Test: standard protocol "
    f"(3 chunks, query slices holding the class), supp_idx {supports}, Dice on the native 256 x 256 grid.", "",
    "Dice (%) per organ: mean over the supports of each support's mean over the 4 query scans; "
    "std over supports:", "", table, "",
    "| Method | " + " | ".join(f"supp_idx {s}" for s in supports.split()) + " |",
    "|---|" + "---:|" * len(supports.split()),
    *[f"| {m} | " + " | ".join(str(v.get(s, '')) for s in supports.split()) + " |" for m, v in per_support.items()], "",
    "| Method | training (s) | validation share of training | test, all supports (s) |", "|---|---:|---:|---:|",
    *[f"| {m} | {t['train_s']} | {val_share.get(m, '')}{' %' if m in val_share else ''} | {t['test_s']} |"
      for m, t in times.items()], "",
    "Validation curve (mean Dice %, scans 38 and 39, each the support of the other):", "",
    "| step | " + " | ".join(val_curve) + " |", "|---:|" + "---:|" * len(val_curve),
    *[f"| {p['step']} | " + " | ".join(str(val_curve[m][i]['mean']) if i < len(val_curve[m]) else ""
                                       for m in val_curve) + " |" for i, p in enumerate(val_curve["QAMP"])], "",
    "![QAMP validation curve](chaos_budget_val_qamp.png)", "", "![ADNet validation curve](chaos_budget_val_adnet.png)", "",
    f"Run folders: {root}", ""]
write_text(root / "chaos_budget.md", "\n".join(lines))
write_json(root / "chaos_budget.json", result)
for method, path in curves.items():
    shutil.copyfile(path, root / f"chaos_budget_val_{method.lower()}.png")
print(json.dumps({k: result[k] for k in ("name", "dice_percent", "times_s", "within_90_min_training")}))
EOF
if [ "$TINY" = 0 ]; then
    for name in chaos_budget.md chaos_budget.json chaos_budget_val_qamp.png chaos_budget_val_adnet.png; do
        cp "$RUN_ROOT/$name" "bench/results/$name.tmp" && mv "bench/results/$name.tmp" "bench/results/$name"
    done
    echo "[bench] wrote bench/results/chaos_budget.{md,json} and the two validation-curve PNGs" >&2
else
    echo "[bench] tiny run: results in $RUN_ROOT (bench/results untouched)" >&2
fi
