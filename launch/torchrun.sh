#!/usr/bin/env bash
# Single node, all local GPUs (or CPU processes): launch/torchrun.sh algo=sft deepspeed=zero3 model=hf model.path=...
# Hyperparameters live in conf/; this only starts the one entry point under torchrun.
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --standalone --nproc_per_node="$NPROC" -m posttrain "$@"
