#!/usr/bin/env bash
# Sourced by the README's two commands: creates .venv if missing, installs the pinned
# requirements and the package (building its C++/CUDA extension), then activates it.
# Re-running is cheap: a stamp keyed on requirements.txt, setup.py and csrc/ skips work
# that is already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
# The CUDA toolkit root (the `nvcc` on PATH may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
stamp_of() { { cat requirements.txt setup.py $(find csrc -type f | sort); echo "${SAGE_DIST_CPU_ARCH:-auto} ${SAGE_DIST_NO_CUDA:-}"; } | sha256sum | cut -c1-16; }
STAMP=".venv/.sage_dist-$(stamp_of)"
if [ ! -f "$STAMP" ]; then
  t0=$(date +%s)
  # pip's notes about local wheel folders that this machine lacks are noise: filtered out.
  quiet() { { grep -v -E "^WARNING: Location 'file://" || true; } >&2; }
  python -m pip install -q --upgrade pip 2> >(quiet)
  echo "[setup] installing pinned requirements"
  python -m pip install -q -r requirements.txt 2> >(quiet)
  echo "[setup] building sage_dist and its extension (CUDA_HOME=${CUDA_HOME:-none})"
  # The build log (compiler lines included) goes to .venv/build.log; its summary is shown.
  if ! MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -v --no-build-isolation -e . \
      > .venv/build.log 2>&1; then
    tail -n 60 .venv/build.log
    echo "[setup] building sage_dist failed; full log: .venv/build.log" >&2
    exit 1
  fi
  grep -E "\[sage_dist setup\]|nvcc .*\.cu|Linking|-shared" .venv/build.log | cut -c1-240 || true
  python -c "import sage_dist.ops as o; assert o.HAS_EXTENSION, o.EXTENSION_ERROR; \
print('[setup] extension built; CUDA kernels compiled:', o.has_cuda_kernels())"
  rm -f .venv/.sage_dist-*
  touch "$STAMP"
  echo "[setup] done in $(( $(date +%s) - t0 )) s"
else
  echo "[setup] .venv is up to date"
fi
