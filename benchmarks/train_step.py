"""Seconds per DMT-JEPA training step; prints one JSON object.

Example (the reference configuration):
    python benchmarks/train_step.py --arch vit_tiny --batch 16 --img-size 224 \
        --pred-width 384 --pred-depth 6 --aggregation cross_attention,none --precision fp32
Several aggregations (comma separated) are measured in the same process, alternating, so
their ratio is fair on a machine whose speed drifts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmt_jepa.config import MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA, autocast_dtype_for, train_step
from dmt_jepa.precision import effective_precision

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def build(args, aggregation: str, device: torch.device):
    cfg = MethodConfig(
        model=ModelConfig(
            arch=args.arch, patch_size=args.patch_size, img_size=args.img_size,
            pred_width=args.pred_width, pred_depth=args.pred_depth,
        ),
        mask=MaskConfig(num_targets=args.num_targets),
        target=TargetConfig(aggregation=aggregation, loss=args.loss),
    )
    model = DMTJEPA(cfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05, fused=True)
    if args.compile:
        model = torch.compile(model)
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--pred-width", type=int, default=384)
    parser.add_argument("--pred-depth", type=int, default=6)
    parser.add_argument("--num-targets", type=int, default=4)
    parser.add_argument("--aggregation", default="cross_attention,none")
    parser.add_argument("--loss", default="smooth_l1", choices=["smooth_l1", "l2"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dtype = autocast_dtype_for(device, args.precision)
    if args.precision == "bf16" and dtype is None:
        print(f"note: {effective_precision('bf16', device.type, False)[1]}", file=sys.stderr)
        args.precision = "fp32"  # what was measured
    grid = (args.img_size // args.patch_size, args.img_size // args.patch_size)
    sampler = MultiBlockMaskSampler(grid, MaskConfig(num_targets=args.num_targets))
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    aggregations = args.aggregation.split(",")
    runs = {a: build(args, a, device) for a in aggregations}
    times: dict[str, list[float]] = {a: [] for a in aggregations}
    flops: dict[str, int] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(args.warmup + args.steps):
        for a, (model, opt) in runs.items():
            masks = sampler(args.batch, torch.Generator().manual_seed(step)).to(device)
            if step == 0 and not args.compile:
                with FlopCounterMode(display=False) as counter:
                    train_step(model, images, masks, opt, 0.996, autocast_dtype=dtype)
                flops[a] = counter.get_total_flops()
                continue
            sync()
            start = time.perf_counter()
            train_step(model, images, masks, opt, 0.996, autocast_dtype=dtype)
            sync()
            if step >= args.warmup:
                times[a].append(time.perf_counter() - start)

    peak = peak_flops(device)
    results = {}
    for a in aggregations:
        sec = statistics.median(times[a])
        entry = {
            "sec_per_step": round(sec, 4),
            "sec_per_step_mean": round(statistics.mean(times[a]), 4),
            "images_per_s": round(args.batch / sec, 2),
        }
        if a in flops:
            entry["tflop_per_step"] = round(flops[a] / 1e12, 3)
            if peak:
                entry["mfu"] = round(flops[a] / sec / peak, 4)
        results[a] = entry
    out = {
        "benchmark": "train_step",
        "arch": args.arch, "patch_size": args.patch_size, "batch": args.batch, "img_size": args.img_size,
        "pred_width": args.pred_width, "pred_depth": args.pred_depth, "num_targets": args.num_targets,
        "loss": args.loss, "precision": args.precision, "compile": args.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "steps": args.steps, "results": results,
    }
    if "none" in results and len(results) > 1:
        base = results["none"]["sec_per_step"]
        out["ratio_to_none"] = {a: round(r["sec_per_step"] / base, 4) for a, r in results.items() if a != "none"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
