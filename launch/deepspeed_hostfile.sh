#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (passwordless ssh from this node to every host; the
# repository, its .venv and out_dir at the same path on every host).
#   HOSTFILE=hostfile CONFIG=configs/train/tiny_zero2.yaml bash launch/deepspeed_hostfile.sh
# hostfile lines: "<host> slots=<ranks on that host>", e.g.
#   node1 slots=8
#   node2 slots=8
# MASTER_ADDR defaults to the first host, MASTER_PORT to 29500. CONFIG must use
# engine: deepspeed. Extra arguments are config overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
HOSTFILE="${HOSTFILE:-hostfile}"
[ -f "$HOSTFILE" ] || { echo "error: HOSTFILE=$HOSTFILE not found" >&2; exit 2; }
CONFIG="${CONFIG:-configs/train/tiny_zero2.yaml}"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --no_local_rank \
  --module sage_dist.train --config "$CONFIG" "$@"
