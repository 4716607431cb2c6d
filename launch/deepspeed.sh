#!/usr/bin/env bash
# The DeepSpeed launcher (hostfile-based multi-node): HOSTFILE=hosts launch/deepspeed.sh algo=sft deepspeed=zero3 ...
# posttrain reads RANK / WORLD_SIZE / MASTER_ADDR the launcher sets; the ZeRO config comes from conf/deepspeed/.
set -euo pipefail
args=()
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
exec deepspeed "${args[@]}" --module posttrain "$@"
