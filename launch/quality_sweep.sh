#!/usr/bin/env bash
# The sweep behind docs/QUALITY.md: every recipe, variant and package baseline at two model
# sizes on the embedded corpus, then a second seed for the best ones. Resumable: rerunning
# skips finished runs. `bash launch/quality_sweep.sh [OUT_ROOT]` (default runs/quality); the
# phase timings go to OUT_ROOT/timings.txt. Two runs at a time, one thread each.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_env.sh
OUT="${1:-runs/quality}"
mkdir -p "$OUT"
Q="python -m sage_dist.bench quality --jobs 2 --threads 1"
RECIPES="sage-hybrid,sinkgd-hybrid,sage,scale,lion,adamw"
BASELINES="torch-adamw,muon,galore,apollo,apollo-mini,adam-mini,lion-pytorch"
VARIANTS="sage-hybrid.head-sinkhorn,sage-hybrid.sage-lr3,sage-hybrid.sage-lr10,sage-hybrid.dense-sinkgd,sage-hybrid.sage-lr10-dense-sinkgd,sage-hybrid.vector-adamw,sage-hybrid.lion-order,sage-hybrid.embed-head-adamw"
# Lion-type rules want lrs 3-10x below AdamW's; SinkGD's dense step is 0.05 x lr
# Muon's optimum lies at the top of the common grid: one more lr above it
GRID="--lrs 3e-4,1e-3,3e-3,1e-2 --grid sinkgd-hybrid=1e-3,3e-3,1e-2,3e-2 lion=1e-4,3e-4,1e-3,3e-3 lion-pytorch=1e-4,3e-4,1e-3,3e-3 muon=3e-4,1e-3,3e-3,1e-2,3e-2"
# the tiny model's optimum lies higher for three more: one more lr above the grid
TINY_GRID="$GRID galore=3e-4,1e-3,3e-3,1e-2,3e-2 apollo=3e-4,1e-3,3e-3,1e-2,3e-2"
TINY_GRID="${TINY_GRID/sinkgd-hybrid=1e-3,3e-3,1e-2,3e-2/sinkgd-hybrid=1e-3,3e-3,1e-2,3e-2,1e-1}"
# each variant changes one thing of sage-hybrid (best at 1e-3; one combines the two that
# matter most): three lrs around where its optimum lies, so that none is best at the edge
ABLATION_GRID="--lrs 3e-4,1e-3,3e-3 --grid sage-hybrid.dense-sinkgd=1e-3,3e-3,1e-2,3e-2 sage-hybrid.sage-lr10-dense-sinkgd=1e-3,3e-3,1e-2 sage-hybrid.embed-head-adamw=1e-3,3e-3,1e-2"
# validation only at the end (the tables use the final perplexity and the training loss)
phase() {   # NAME, STEPS, then the bench arguments
  local name=$1 steps=$2; shift 2
  local t0; t0=$(date +%s)
  OMP_NUM_THREADS=1 $Q --steps "$steps" --set "eval_every=$steps" "$@"
  echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"
}
# 1. the 5M Llama (configs/models/llama_5m.json), 200 steps of 16 x 64 tokens
phase small-main 200 --config small_single --out "$OUT/small" \
  --recipes "$RECIPES,$BASELINES" $GRID
phase small-ablations 200 --config small_single --out "$OUT/small" \
  --recipes "$VARIANTS" $ABLATION_GRID
# 2. a second seed at the best lr, at 5M: the top three, sage-hybrid (sinkgd-hybrid is in
#    the top three) and the three best variants (to size the noise of the ablation table)
phase small-seeds 200 --config small_single --out "$OUT/small" \
  --recipes "$RECIPES,$BASELINES" --top 3 --seeds 0,1
phase small-ablation-seeds 200 --config small_single --out "$OUT/small" \
  --recipes sage-hybrid,sinkgd-hybrid --top 2 --seeds 0,1
phase small-variant-seeds 200 --config small_single --out "$OUT/small" \
  --recipes "$VARIANTS" --top 3 --seeds 0,1
# 3. the tiny Llama (configs/models/llama_tiny.json), 300 steps of 16 x 64 tokens, then a
#    second seed for its top three
phase tiny-main 300 --config tiny_single --out "$OUT/tiny" \
  --recipes "$RECIPES,$BASELINES" $TINY_GRID
phase tiny-seeds 300 --config tiny_single --out "$OUT/tiny" \
  --recipes "$RECIPES,$BASELINES" --top 3 --seeds 0,1
