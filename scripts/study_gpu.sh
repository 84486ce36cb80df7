#!/usr/bin/env bash
# The study on one GPU (docs/results.md): the default configuration, which is sized for 2 CPU cores,
# with the head's query kinds as main arms and every control, then three times the training budget
# for the main arms. Each part runs under its own time limit; a cut part keeps its finished jobs
# (seed by seed) and is summarised from them. Usage: scripts/study_gpu.sh OUT_DIR [SECONDS_A SECONDS_B]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/study-gpu}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORKERS=${WORKERS:-12}
MAIN="i-jepa dmt-jepa-self dmt-jepa-learned"
common=(--device "${DEVICE:-cuda}" --workers "$WORKERS" --arms $MAIN)
extra=(${EXTRA:-})  # e.g. EXTRA="--steps 3 --train-scenes 24" DEVICE=cpu for a smoke run

a=(--out "$OUT_DIR/default" --controls dmt-jepa-mean mean-pool dmt-jepa-self-added random --control-seeds 0 1 2 "${common[@]}" "${extra[@]}")
timeout "${2:-240}" "$PY" benchmarks/study.py "${a[@]}"
"$PY" benchmarks/study.py "${a[@]}" --report "$OUT_DIR/default/results.md" --report-only >"$OUT_DIR/default.json"

b=(--out "$OUT_DIR/long" --steps 2400 --controls random --control-seeds 0 1 2 3 4 "${common[@]}" "${extra[@]}")
mkdir -p "$OUT_DIR/long" && ln -sfn ../default/data "$OUT_DIR/long/data"  # the same scenes
timeout "${3:-200}" "$PY" benchmarks/study.py "${b[@]}"
"$PY" benchmarks/study.py "${b[@]}" --report "$OUT_DIR/long/results.md" --report-only >"$OUT_DIR/long.json"
