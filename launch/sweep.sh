#!/usr/bin/env bash
# A Hydra sweep: every combination runs as its own job in run_dir/<job number>.
#   launch/sweep.sh run_dir=runs/lr_sweep optim.lr=1e-4,3e-4,1e-3 train.epochs=1,2
set -euo pipefail
exec python -m posttrain -m "$@"
