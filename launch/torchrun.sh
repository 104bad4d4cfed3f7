#!/usr/bin/env bash
# Launch opd-megatron under torchrun on one node, or on several with c10d rendezvous.
#
#   launch/torchrun.sh --nproc 2 -- --config configs/sft_tiny.yaml parallel.tp=2
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh --nproc 8 -- --config X.yaml parallel.tp=8   # on each node
#
# Everything after `--` goes to `opd-megatron train`; every knob is a config key, not an edit of this script.
set -euo pipefail

# -- launcher -------------------------------------------------------------------------------------------------
NPROC=1
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-opd-megatron}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch/torchrun.sh: unknown argument $1 (expected --nproc N -- <train args>)" >&2; exit 2 ;;
  esac
done

if [[ "$NNODES" == "1" ]]; then
  RDZV=(--standalone)
else
  # c10d rendezvous: node ranks are handed out as nodes join (no NODE_RANK); the endpoint is MASTER_ADDR's.
  RDZV=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID")
fi

exec torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m opd_megatron train "$@"
