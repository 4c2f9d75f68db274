#!/usr/bin/env bash
# Start this node's part of a multi-node ddprun job. Run it once on every node, with the same
# MASTER_ADDR, MASTER_PORT and NNODES everywhere and NODE_RANK 0..NNODES-1:
#
#   node 0:  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 launcher/multinode/run_node.sh train.py --lr 0.1
#   node 1:  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 launcher/multinode/run_node.sh train.py --lr 0.1
#
# Node 0 (the machine at MASTER_ADDR) hosts the rendezvous on MASTER_PORT; node r's workers are
# global ranks r*NPROC .. r*NPROC+NPROC-1, so global rank 0 (logs, CSV, checkpoints) runs on
# node 0. The script's --logdir should be on a filesystem every node shares: only rank 0 writes
# there, but every rank reads last.pth when the job resumes.
#
# Environment:
#   MASTER_ADDR   (required) node 0's address, reachable from every node
#   NNODES        (required) number of nodes
#   NODE_RANK     (required) this node's rank, 0..NNODES-1
#   MASTER_PORT   rendezvous port on node 0 (default 29500); must be open between the nodes
#   NPROC         workers on this node (default auto: its GPUs, or 2 without GPUs)
#   MAX_RESTARTS  restarts of all workers after a failure, resuming from last.pth (default 0)
#   RDZV_TIMEOUT  seconds to wait for every node at the start and after a restart (default 900)
#   DDPRUN_CMD    how to call ddprun (default: ddprun; e.g. "python -m ddprun")
#   any DDPRUN_* twin, e.g. DDPRUN_LOGDIR (launcher logs) or DDPRUN_BACKEND=nccl
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's rank, 0..NNODES-1}"
if [ $# -lt 1 ]; then
    echo "usage: MASTER_ADDR=... NNODES=... NODE_RANK=... $0 train.py [script args...]" >&2
    exit 2
fi
# exec: signals (Ctrl-C, SIGTERM, SIGUSR1) go straight to ddprun, which passes them on.
# shellcheck disable=SC2086  # DDPRUN_CMD may be several words
exec ${DDPRUN_CMD:-ddprun} \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" \
    --master-port "${MASTER_PORT:-29500}" \
    --nproc "${NPROC:-auto}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    --rdzv-timeout "${RDZV_TIMEOUT:-900}" \
    "$@"
