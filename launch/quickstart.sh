#!/usr/bin/env bash
# The README's main command: set up from nothing, then pretrain the tiny Llama on the
# embedded corpus with sage-hybrid (single process for now) and report validation perplexity.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec python -m sage_dist.train --model configs/models/llama_tiny.json --recipe sage-hybrid "$@"
