#!/usr/bin/env bash
# The study (docs/results.md) on one GPU: its default arms, ablations and seeds, many workers at
# once. On one H100 a job of the earlier 96-px study took about 80 s of training and 135 s of
# evaluation with 14 workers (the probes and pictures are CPU-bound there). A run cut by the time
# limit keeps its finished jobs (main arms seed by seed first) and is summarised from them.
# Usage: scripts/study_gpu.sh [OUT_DIR] [SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/study-gpu}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=(--out "$OUT_DIR" --device "${DEVICE:-cuda}" --workers "${WORKERS:-14}" ${EXTRA:-})
timeout "${2:-420}" "$PY" benchmarks/study.py "${args[@]}"
"$PY" benchmarks/study.py "${args[@]}" --report "$OUT_DIR/results.md" --report-only
