#!/usr/bin/env bash
# GPU checks, under 5 minutes on one H100/H200: the GPU-marked tests, then the training-step
# benchmark of ViT-B/16 at 224 px in bf16 with the largest batch that fits (images/s, and MFU
# against the card's dense bf16 peak: H100 SXM / H200 989 TFLOP/s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, installed or not
status=0
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device visible: run this on a GPU machine"; exit 1
fi

echo "== GPU tests"
timeout 150 "$PY" -m pytest -m "gpu or tensorrt" -q -rs || status=$?

echo "== benchmarks/train_step.py: vit_base/16, 224 px, bf16, predictor 384 x 6, cross_attention"
err=$(mktemp)
summary='import json, sys
r = json.loads(sys.stdin.read())
x = r["results"]["cross_attention"]
print("batch %s on %s: %s images/s, MFU %s" % (r["batch"], r["device"], x["images_per_s"], x.get("mfu")))'
ran=0
for batch in 384 256 128 64; do
    if out=$(timeout 100 "$PY" benchmarks/train_step.py --arch vit_base --batch "$batch" --img-size 224 \
        --pred-width 384 --pred-depth 6 --aggregation cross_attention --precision bf16 --device cuda \
        --steps 10 2>"$err"); then
        echo "$out" | tail -n 1
        echo "$out" | tail -n 1 | "$PY" -c "$summary"
        ran=1
        break
    fi
    if ! grep -qiE 'out of memory|OutOfMemoryError' "$err"; then
        echo "batch $batch failed:"; tail -n 20 "$err"; status=1; break
    fi
    echo "batch $batch does not fit; trying a smaller one"
done
rm -f "$err"
[[ $ran == 1 ]] || status=1

echo "== benchmarks/embed_throughput.py: vit_base/16, 224 px, batch 32 (PyTorch bf16 eager/compiled, ONNX Runtime)"
timeout 150 "$PY" benchmarks/embed_throughput.py --arch vit_base --batch 32 --rounds 2 --images 512 || status=$?
exit $status
