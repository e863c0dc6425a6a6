#!/usr/bin/env bash
# The README's main command: set up from nothing, then run the real pretraining job on this
# machine: 2 local ranks (torchrun), DeepSpeed ZeRO-2, sage-hybrid, the tiny Llama on the
# embedded stdlib corpus. Prints the per-rank memory table and the validation perplexity and
# writes runs/tiny_zero2/{metrics.jsonl,loss.png}. Extra arguments are config overrides,
# e.g. `bash launch/quickstart.sh --steps 100`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # 2 ranks on 2 cores
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export NPROC="${NPROC:-2}" CONFIG="${CONFIG:-configs/train/tiny_zero2.yaml}"
# A fresh run each time (run_local.sh defaults to --resume auto); a group that torchrun
# restarts after a failure still resumes from its newest checkpoint.
export RESUME="${RESUME:-none}"
exec bash "$ROOT/launch/run_local.sh" "$@"
