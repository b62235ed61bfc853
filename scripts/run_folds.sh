#!/usr/bin/env bash
# Loop shared by scripts/train_*.sh and scripts/test_*.sh: one train.py / test.py run per fold
# (and, for testing, per support index), like the reference scripts.
#
# Usage: scripts/run_folds.sh train|test NAMED_CONFIG DATASET [extra Sacred KEY=VALUE ...]
# (MODEL=qnet / adnet / alpnet / gmrd trains another head; a test run takes the model from its
# snapshot, and qnet_refine_iters=0 tests a Q-Net model without its test-time refinement)
# Environment (defaults in brackets):
#   DATA_DIR [unset]         image folder or a root holding <DATASET>/<folder>; unset: QAMP_DATA_ROOT
#                            (config.py; training refuses to start without either; a test run
#                            takes its training run's data_dir)
#   MODEL    [unset: qamp]     the network to train: qamp | adnet | alpnet | qnet | gmrd | panet
#                              (model=<MODEL>; test runs take it from the snapshot)
#   LOG_DIR  [./runs, or ./runs/<MODEL> when MODEL is set]  where run folders are created (test runs
#                              look for training runs here, so MODEL=adnet tests find ADNet's runs)
#   N_STEPS  [40000]           training steps (train only)
#   DEVICE   [auto]            auto | cpu | cuda | cuda:<i>
#   SETTING  [1]               1 or 2 (setting 2 removes training slices holding a test class)
#   FOLDS    [0 1 2 3 4]       folds to run
#   SUPP_IDX [2]               support indices to test (test only), e.g. "0 1 2 3 4"
#   SEED     [2025]            run seed
#   PYTHON   [.venv/bin/python]
# A test run uses, for each fold, the newest finished training run
# $LOG_DIR/train_<DATASET>_setting<SETTING>_fold<F>[_<n>] (the one with the largest suffix that holds
# snapshots/final.pth); test.py builds the model its snapshot describes, so test scripts need no model
# keys (one that contradicts the snapshot is refused).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 3 || ( $1 != train && $1 != test ) ]]; then
    echo "usage: $0 train|test NAMED_CONFIG DATASET [KEY=VALUE ...]" >&2
    exit 2
fi
STAGE=$1 NAMED=$2 DATASET=$3
shift 3
DATA_DIR=${DATA_DIR:-}
MODEL=${MODEL:-}
LOG_DIR=${LOG_DIR:-./runs${MODEL:+/$MODEL}}
N_STEPS=${N_STEPS:-40000}
DEVICE=${DEVICE:-auto}
SETTING=${SETTING:-1}
FOLDS=${FOLDS:-0 1 2 3 4}
SUPP_IDX=${SUPP_IDX:-2}
SEED=${SEED:-2025}
PYTHON=${PYTHON:-.venv/bin/python}
common=(with "$NAMED" "setting$SETTING" ${DATA_DIR:+"data_dir=$DATA_DIR"} "path.log_dir=$LOG_DIR" "device=$DEVICE"
        "seed=$SEED")

# Newest finished training run of fold $1 ('' when there is none).
latest_run() {
    local base="$LOG_DIR/train_${DATASET}_setting${SETTING}_fold$1" best="" best_n=0 dir n
    for dir in "$base" "$base"_*; do
        [[ -f "$dir/snapshots/final.pth" ]] || continue
        if [[ "$dir" == "$base" ]]; then
            n=1
        else
            n=${dir##*_}
            [[ "$n" =~ ^[0-9]+$ ]] || continue
        fi
        if (( n > best_n )); then
            best=$dir
            best_n=$n
        fi
    done
    echo "$best"
}

for FOLD in $FOLDS; do
    if [[ $STAGE == train ]]; then
        echo "== train $NAMED setting$SETTING fold $FOLD ($N_STEPS steps) -> $LOG_DIR"
        "$PYTHON" train.py "${common[@]}" ${MODEL:+"model=$MODEL"} "eval_fold=$FOLD" "n_steps=$N_STEPS" "$@"
    else
        run=$(latest_run "$FOLD")
        if [[ -z "$run" ]]; then
            echo "no finished training run for fold $FOLD: expected $LOG_DIR/train_${DATASET}_setting${SETTING}_fold${FOLD}[_<n>]/snapshots/final.pth;" \
                 "train it first (scripts/train_*.sh) or set LOG_DIR / SETTING" >&2
            exit 1
        fi
        for SUPP in $SUPP_IDX; do
            echo "== test $NAMED setting$SETTING fold $FOLD supp_idx $SUPP with $run"
            "$PYTHON" test.py "${common[@]}" "eval_fold=$FOLD" "supp_idx=$SUPP" "reload_model_path=$run" "$@"
        done
    fi
done
