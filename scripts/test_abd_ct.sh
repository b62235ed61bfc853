#!/usr/bin/env bash
# Test the trained QAMP models on abdominal CT (Synapse multi-atlas, SABS), one run per fold (5-fold cross-validation).
# Environment overrides: MODEL, DATA_DIR, LOG_DIR, N_STEPS, DEVICE, SETTING, FOLDS, SUPP_IDX, SEED, PYTHON
# (see scripts/run_folds.sh); extra arguments are Sacred KEY=VALUE updates, e.g.
#   SETTING=2 FOLDS="0 1" bash scripts/test_abd_ct.sh eval_mode=all_slices   # the model keys come from each snapshot
exec bash "$(dirname "$0")/run_folds.sh" test abd_ct SABS "$@"
