#!/usr/bin/env bash
# Multi-node torchrun wrapper: run the same line on every node.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh train configs/cogvideox-2b.yaml ...
set -euo pipefail
exec python -m launch --nnodes "${NNODES:-1}" --nproc-per-node "${NPROC_PER_NODE:-4}" \
  ${RDZV_ENDPOINT:+--rdzv-endpoint "$RDZV_ENDPOINT"} ${RDZV_ID:+--rdzv-id "$RDZV_ID"} \
  --max-restarts "${MAX_RESTARTS:-0}" "$@"
