#!/usr/bin/env bash
# GPU checks, under 5 minutes on one H100/H200: the GPU-marked tests, then the training-step
# benchmark of ViT-B/16 at 224 px in bf16 with the largest batch that fits, as images/s and
# model FLOPs utilisation (MFU) against the card's dense bf16 peak.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0

echo "== GPU tests"
timeout 150 "$PY" -m pytest -m "gpu or tensorrt" -q -rs || status=$?

echo "== benchmarks/train_step.py: vit_base/16, 224 px, bf16, predictor 384 x 6, cross_attention"
result=""
for batch in 512 384 256 192 128 64; do
    if out=$(timeout 100 "$PY" benchmarks/train_step.py --arch vit_base --batch "$batch" --img-size 224 \
        --pred-width 384 --pred-depth 6 --aggregation cross_attention --precision bf16 --device cuda --steps 10 2>/tmp/gpu_check_err); then
        result=$(echo "$out" | tail -n 1)
        echo "batch $batch fits: $result"
        break
    fi
    echo "batch $batch does not fit or failed: $(grep -m1 -E 'OutOfMemory|out of memory|Error' /tmp/gpu_check_err || tail -n 1 /tmp/gpu_check_err)"
done
if [ -z "$result" ]; then
    echo "no batch size ran"; exit 1
fi

echo "== MFU"
BENCH_JSON="$result" "$PY" - <<'PYEOF' || status=$?
import json, os

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmt_jepa.config import MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA

bench = json.loads(os.environ["BENCH_JSON"])
batch = int(bench.get("batch", bench.get("batch_size", 0)))
seconds = next(float(bench[k]) for k in ("seconds_per_step", "s_per_step", "step_s", "mean_s") if k in bench)
cfg = MethodConfig(model=ModelConfig(arch="vit_base", patch_size=16, img_size=224, pred_width=384, pred_depth=6),
                   mask=MaskConfig(), target=TargetConfig(aggregation="cross_attention"))
model = DMTJEPA(cfg).cuda()
sampler = MultiBlockMaskSampler((14, 14), cfg.mask)
flops = []
for seed in range(3):  # mask sizes vary per batch: average a few draws, per image
    masks = sampler(8, torch.Generator().manual_seed(seed)).to("cuda")
    images = torch.randn(8, 3, 224, 224, device="cuda")
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        model(images, masks.context_idx, masks.target_idx).backward()
    flops.append(counter.get_total_flops() / 8)
per_image = sum(flops) / len(flops)
name = torch.cuda.get_device_name()
peaks = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
peak = next((v for k, v in peaks.items() if k in name), None)
achieved = per_image * batch / seconds
print(json.dumps({
    "gpu": name, "batch": batch, "seconds_per_step": seconds, "images_per_s": round(batch / seconds, 1),
    "model_tflop_per_image": round(per_image / 1e12, 4), "achieved_tflop_s": round(achieved / 1e12, 1),
    "peak_bf16_dense_tflop_s": peak and peak / 1e12, "mfu": peak and round(achieved / peak, 3),
}))
PYEOF
exit $status
