#!/usr/bin/env bash
# One node, NPROC local ranks under torchrun.
#   NPROC=2 CONFIG=configs/train/tiny_zero2.yaml bash launch/run_local.sh [--key value ...]
# NPROC (default 2), CONFIG (default configs/train/tiny_zero2.yaml), LOG_RANK (default 0: only
# rank 0's output is shown; "all" shows every rank). The rendezvous is --standalone (a free
# local port).
# Extra arguments are config overrides passed to `python -m sage_dist.train`.
# Faults: MAX_RESTARTS (default 2) is torchrun's --max-restarts: a rank that dies makes torchrun
# restart the whole group, which resumes from the newest checkpoint that verifies (RESUME,
# default auto, is passed as --resume before the extra arguments, which may override it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-configs/train/tiny_zero2.yaml}"
LOG_RANK="${LOG_RANK:-0}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# DeepSpeed JIT-builds a CPU comm op into TORCH_EXTENSIONS_DIR; one directory per Python
# environment keeps two environments on one machine from rebuilding it for each other.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions/env-$("$PY" -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
ranks=()
if [ "$LOG_RANK" != "all" ]; then ranks=(--local-ranks-filter "$LOG_RANK"); fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-2}" "${ranks[@]}" \
  -m sage_dist.train --config "$CONFIG" --resume "${RESUME:-auto}" "$@"
