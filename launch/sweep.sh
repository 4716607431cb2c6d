#!/usr/bin/env bash
# A local Hydra sweep: every combination runs as its own posttrain process, one after another, in
# run_dir/<job number> (run_dir/sweep.json records each job's overrides and exit status).
#   launch/sweep.sh run_dir=runs/lr_sweep optim.lr=1e-4,3e-4,1e-3 train.epochs=1,2
#   POSTTRAIN_SWEEP_LAUNCHER="torchrun --standalone --nproc_per_node=8" launch/sweep.sh ...   (each job on 8 GPUs)
# On Slurm, the same sweep goes through Hydra's submitit plugin, one Slurm job per combination:
#   posttrain -m hydra/launcher=slurm hydra.launcher.partition=gpu optim.lr=1e-6,5e-6
set -euo pipefail
exec python -m posttrain -m "$@"
