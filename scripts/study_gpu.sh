#!/usr/bin/env bash
# The study (docs/results.md) on one GPU: the default budget, the own-feature and learned-token
# queries as main arms, the former image-mean query and random init as controls. Measured on one
# H100 with 14 workers: a job takes about 80 s of training and 135 s of evaluation (the linear
# probes and pictures are CPU-bound there), so the 21 jobs need about 6 minutes. A run cut by the
# time limit keeps its finished jobs (seed by seed) and is summarised from them.
# Usage: scripts/study_gpu.sh [OUT_DIR] [SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/study-gpu}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=(--out "$OUT_DIR" --device "${DEVICE:-cuda}" --workers "${WORKERS:-14}"
      --arms i-jepa dmt-jepa-self dmt-jepa-learned --controls dmt-jepa-mean random --control-seeds 0 1 2 ${EXTRA:-})
timeout "${2:-420}" "$PY" benchmarks/study.py "${args[@]}"
"$PY" benchmarks/study.py "${args[@]}" --report "$OUT_DIR/results.md" --report-only
