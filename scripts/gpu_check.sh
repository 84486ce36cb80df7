#!/usr/bin/env bash
# Every GPU check and benchmark, in under 5 minutes on one H100/H200 (run nothing else on the GPU
# meanwhile; the first line shows whether another process holds it):
#   1. nvidia-smi: the card, and no other process on it;
#   2. the GPU-marked tests (CUDA bf16 training with resume, nvJPEG decode for training and for
#      `embed --decode gpu`, the CUDA embedding backend);
#   3. benchmarks/train_step.py, ViT-B/16, 224 px, bf16, batch 384, predictor 384 x 6: the
#      variants as-is / static / no-syncs / compiled in one run (images/s, MFU against the card's
#      dense bf16 peak: H100 SXM / H200 989 TFLOP/s, peak memory, GPU busy share), then the
#      compiled step fed by the real pipeline with GPU JPEG decoding (--data);
#   4. benchmarks/data_pipeline.py: CPU decode images/s with every core as a worker.
set -uo pipefail
nvidia-smi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
repo=$PWD
tests_from=$repo  # where pytest starts: its working directory comes first on the import path
if ! (cd /tmp && "$PY" -c "import dmt_jepa.serve" 2>/dev/null); then
    # Not installed: the checkout as it installs (export/, serve/, cli/ inside dmt_jepa), made of links.
    tree=$(mktemp -d)
    mkdir "$tree/dmt_jepa"
    for entry in "$PWD"/dmt_jepa/*; do ln -s "$entry" "$tree/dmt_jepa/"; done
    for sub in export serve cli; do ln -s "$PWD/$sub" "$tree/dmt_jepa/$sub"; done
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}:$PWD"  # the checkout last: its tests/ and benchmarks/
    tests_from=$tree
fi
status=0
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device visible: run this on a GPU machine"; exit 1
fi
date -u +"%Y-%m-%d %H:%M UTC"

echo "== GPU tests"
(cd "$tests_from" && timeout 80 "$PY" -m pytest "$repo/tests" --rootdir "$repo" -c "$repo/pyproject.toml" \
    -m "gpu or tensorrt" -q -rs -p no:cacheprovider) || status=$?

echo "== photo shards for --data (2,048 JPEGs, 500x375)"
shards=$(mktemp -d)
pattern=$(PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/benchmarks" timeout 60 "$PY" -c "
from pathlib import Path
from data_pipeline import write_photo_shards
print(write_photo_shards(Path('$shards'), 2048))") || status=1

echo "== benchmarks/train_step.py: vit_base/16, 224 px, bf16, batch 384, predictor 384 x 6"
timeout 170 "$PY" benchmarks/train_step.py --arch vit_base --batch 384 --img-size 224 --pred-width 384 \
    --pred-depth 6 --precision bf16 --device cuda --variants as-is,static,no-syncs,compiled \
    --warmup 3 --steps 20 --data "$pattern" --decode gpu --workers "$(nproc)" || status=$?

echo "== benchmarks/data_pipeline.py: CPU decode with $(nproc) workers"
timeout 30 "$PY" benchmarks/data_pipeline.py --images 1024 --batch 128 --batches 8 --workers "$(nproc)" || status=$?
rm -rf "$shards"
exit $status
