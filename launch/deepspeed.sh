#!/usr/bin/env bash
# The DeepSpeed launcher (hostfile-based multi-node): HOSTFILE=hosts launch/deepspeed.sh recipe=tulu3_8b_dpo ...
# Every rank reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment the launcher
# sets; --no_local_rank stops it appending --local_rank=N, which Hydra would reject as an override.
# NPROC: processes per node (default: every local GPU; on CPU machines set it, e.g. NPROC=2);
# MASTER_PORT: the rendezvous port (default 29500). Hyperparameters live in conf/, not here.
set -euo pipefail
args=(--no_local_rank)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NPROC:-}" ] && args+=(--num_gpus "$NPROC")
[ -n "${MASTER_PORT:-}" ] && args+=(--master_port "$MASTER_PORT")
exec deepspeed "${args[@]}" --module posttrain "$@"
