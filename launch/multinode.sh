#!/usr/bin/env bash
# One torchrun agent per node, joined by a c10d rendezvous on MASTER_ADDR:MASTER_PORT.
# Run the same command on every node (NODE_RANK 0 .. NNODES-1; node 0 hosts the rendezvous):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     CONFIG=configs/train/tiny_zero2.yaml bash launch/multinode.sh [--key value ...]
# NPROC_PER_NODE defaults to the GPU count (1 without GPUs); RDZV_ID names the job (default
# sage_dist); LOG_RANK as in run_local.sh. out_dir must be on a filesystem every node sees
# (checkpoints are written by all ranks into one directory).
# MAX_RESTARTS (default 2): torchrun's --max-restarts; a failed rank restarts the group on every
# node, which resumes from the newest checkpoint that verifies (RESUME, default auto).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-configs/train/tiny_zero2.yaml}"
PY="${PYTHON:-python}"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}"
LOG_RANK="${LOG_RANK:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# DeepSpeed JIT-builds a CPU comm op into TORCH_EXTENSIONS_DIR; one directory per Python
# environment keeps two environments on one machine from rebuilding it for each other.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions/env-$("$PY" -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)}"
ranks=()
if [ "$LOG_RANK" != "all" ]; then ranks=(--local-ranks-filter "$LOG_RANK"); fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-sage_dist}" \
  --max-restarts "${MAX_RESTARTS:-2}" "${ranks[@]}" \
  -m sage_dist.train --config "$CONFIG" --resume "${RESUME:-auto}" "$@"
