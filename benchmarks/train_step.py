"""Seconds, images/s and MFU of DMT-JEPA training steps; prints one JSON object.

Example (ViT-B/16 on a GPU, every variant in one run):
    python benchmarks/train_step.py --arch vit_base --batch 384 --precision bf16 \
        --variants as-is,static,no-syncs,compiled
Variants (each its own model and optimizer from the same seed, stepped in turn so that a drifting
machine treats them alike):
    as-is     masks whose sizes change per batch (mask.static false), the loss read every step
    static    fixed mask sizes, the loss read every step
    no-syncs  fixed mask sizes, nothing read from the device until the end
    compiled  no-syncs with the forward and loss under torch.compile
FLOPs are counted for every timed step's mask set by an untimed FlopCounterMode pass (forward and
backward of the eager model; mask sets of the same shapes count once); MFU = sum of FLOPs / sum
of step times / the device's dense peak. `--data SHARDS` also times the last variant fed by the
real input pipeline (workers, decode on CPU or GPU), to show whether the input keeps up.
`--against CHECKOUT` times another checkout's `train_step` (its own sampler defaults) in a child
process, alternating step for step with this one's variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmt_jepa.config import DataConfig, MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.masks import Masks, MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA, autocast_dtype_for, step_without_sync, train_step
from dmt_jepa.precision import effective_precision

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
VARIANTS = ("as-is", "static", "no-syncs", "compiled")

# The other checkout's step, run in a child process: one line in -> one timed step -> seconds out.
CHILD = """
import sys, time, torch
from dmt_jepa.config import MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.masks import Masks, MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA, train_step
a = dict(arg.split("=", 1) for arg in sys.argv[1:])
torch.manual_seed(0)
cfg = MethodConfig(model=ModelConfig(arch=a["arch"], patch_size=int(a["patch"]), img_size=int(a["img"]),
    pred_width=int(a["pw"]), pred_depth=int(a["pd"])), mask=MaskConfig(), target=TargetConfig(aggregation=a["agg"]))
model = DMTJEPA(cfg)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05, fused=True)
grid = (int(a["img"]) // int(a["patch"]),) * 2
sampler = MultiBlockMaskSampler(grid, MaskConfig())
images = torch.randn(int(a["batch"]), 3, int(a["img"]), int(a["img"]))
for line in sys.stdin:
    masks = sampler(int(a["batch"]), torch.Generator().manual_seed(int(line)))
    start = time.perf_counter()
    train_step(model, images, masks, opt, 0.996)
    print(time.perf_counter() - start, masks.context_idx.shape[1], masks.target_idx.shape[2], flush=True)
"""


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak (None where unknown, e.g. a CPU)."""
    if device.type != "cuda":
        return platform.processor() or platform.machine() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in BF16_PEAK.items() if k in name), None)


def method_config(args, static: bool) -> MethodConfig:
    return MethodConfig(
        model=ModelConfig(
            arch=args.arch,
            patch_size=args.patch_size,
            img_size=args.img_size,
            pred_width=args.pred_width,
            pred_depth=args.pred_depth,
        ),
        mask=MaskConfig(num_targets=args.num_targets, static=static),
        target=TargetConfig(aggregation=args.aggregation, loss=args.loss),
    )


class Variant:
    """One way of running the step: its model, optimizer, sampler and measurements."""

    def __init__(self, name: str, args, device: torch.device, grid: tuple[int, int]):
        self.name = name
        cfg = method_config(args, static=name != "as-is")
        torch.manual_seed(args.seed)
        self.model = DMTJEPA(cfg).to(device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05, fused=True
        )
        self.step_model = torch.compile(self.model) if name.startswith("compiled") else self.model
        self.sampler = MultiBlockMaskSampler(grid, cfg.mask)
        self.checked = name in ("as-is", "static")
        self.times: list[float] = []
        self.flops: list[int] = []
        self.peak_bytes = 0
        self.loss = None

    def step(self, images, masks, dtype) -> None:
        if self.checked:
            self.loss = train_step(self.step_model, images, masks, self.optimizer, 0.996, autocast_dtype=dtype)
        else:
            self.loss = step_without_sync(self.step_model, images, masks, self.optimizer, 0.996, autocast_dtype=dtype)


def count_flops(model: DMTJEPA, images, masks, dtype, cache: dict) -> int:
    """Forward + backward FLOPs of one mask set (untimed, eager); shapes alone decide them."""
    key = (tuple(images.shape), tuple(masks.context_idx.shape), tuple(masks.target_idx.shape))
    if key not in cache:
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(images, masks.context_idx, masks.target_idx)
            loss.backward()
        model.zero_grad(set_to_none=True)
        cache[key] = counter.get_total_flops()
    return cache[key]


def busy_share(variant: Variant, images, dtype, device, steps: int = 3) -> float | None:
    """Share of a few steps' wall time the GPU spent in kernels (torch.profiler)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    masks = variant.sampler(images.shape[0], torch.Generator().manual_seed(10_000)).to(device)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            variant.step(images, masks, dtype)
        torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return round(min(kernel_us / wall_us, 1.0), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--pred-width", type=int, default=384)
    parser.add_argument("--pred-depth", type=int, default=6)
    parser.add_argument("--num-targets", type=int, default=4)
    parser.add_argument("--aggregation", default="cross_attention")
    parser.add_argument("--loss", default="smooth_l1", choices=["smooth_l1", "l2"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (>= 20 for a figure; fewer on a CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant, after compilation")
    parser.add_argument("--data", default="", help="shard pattern: also time the last variant on the real pipeline")
    parser.add_argument("--workers", type=int, default=8, help="data workers for --data")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="where --data decodes JPEGs")
    parser.add_argument("--against", default="", help="another checkout whose train_step to time, alternating")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = autocast_dtype_for(device, args.precision)
    if args.precision == "bf16" and dtype is None:
        print(f"note: {effective_precision('bf16', device.type, False)[1]}", file=sys.stderr)
        args.precision = "fp32"  # what was measured
    grid = (args.img_size // args.patch_size,) * 2
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    variants = [Variant(n, args, device, grid) for n in names]
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    child = None
    if args.against:
        child_args = [
            f"arch={args.arch}",
            f"patch={args.patch_size}",
            f"img={args.img_size}",
            f"pw={args.pred_width}",
            f"pd={args.pred_depth}",
            f"agg={args.aggregation}",
            f"batch={args.batch}",
        ]
        env = {**os.environ, "PYTHONPATH": str(Path(args.against).resolve())}
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *child_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=args.against,
        )
    child_times: list[float] = []
    child_flops: list[int] = []
    flop_cache: dict = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    compile_s = {}
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        for v in variants:
            masks = v.sampler(args.batch, torch.Generator().manual_seed(step)).to(device)
            if timed:
                v.flops.append(count_flops(v.model, images, masks, dtype, flop_cache))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            v.step(images, masks, dtype)
            sync()
            seconds = time.perf_counter() - start
            if timed:
                v.times.append(seconds)
            elif step == 0:
                compile_s[v.name] = round(seconds, 2)
            if device.type == "cuda":
                v.peak_bytes = max(v.peak_bytes, torch.cuda.max_memory_allocated(device))
        if child is not None:
            child.stdin.write(f"{step}\n")
            child.stdin.flush()
            seconds, n_ctx, n_tgt = child.stdout.readline().split()
            if timed:
                child_times.append(float(seconds))
                shapes = _masks_of(args.batch, int(n_ctx), args.num_targets, int(n_tgt), device)
                child_flops.append(count_flops(variants[0].model, images, shapes, dtype, flop_cache))
    if child is not None:
        child.stdin.close()
        child.wait()

    name, peak = peak_flops(device)
    results = {}
    for v in variants:
        results[v.name] = summary(args.batch, v.times, v.flops, peak) | {
            "first_step_s": compile_s.get(v.name),
            "peak_memory_gib": round(v.peak_bytes / 2**30, 2) if device.type == "cuda" else None,
            "final_loss": round(float(v.loss), 4),
        }
    if child is not None:
        results[f"checkout:{args.against}"] = summary(args.batch, child_times, child_flops, peak)
    busy = busy_share(variants[-1], images, dtype, device)
    if args.data:
        results[f"{variants[-1].name}+data"] = time_on_data(args, variants[-1], dtype, device, peak)
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "arch": args.arch,
                "patch_size": args.patch_size,
                "batch": args.batch,
                "img_size": args.img_size,
                "pred_width": args.pred_width,
                "pred_depth": args.pred_depth,
                "num_targets": args.num_targets,
                "aggregation": args.aggregation,
                "loss": args.loss,
                "precision": args.precision,
                "device": name,
                "peak_tflops_used": peak / 1e12 if peak else None,
                "threads": torch.get_num_threads(),
                "warmup": args.warmup,
                "steps": args.steps,
                "gpu_busy_share": {variants[-1].name: busy} if busy is not None else None,
                "host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "results": results,
            }
        )
    )


def _masks_of(batch: int, n_ctx: int, n_blocks: int, n_tgt: int, device) -> Masks:
    """Index tensors of the given shapes (FLOPs depend on shapes only)."""
    return Masks(
        torch.zeros(batch, n_ctx, dtype=torch.long, device=device),
        torch.zeros(batch, n_blocks, n_tgt, dtype=torch.long, device=device),
    )


def summary(batch: int, times: list[float], flops: list[int], peak: float | None) -> dict:
    total_s, total_flops = sum(times), sum(flops)
    out = {
        "sec_per_step_mean": round(total_s / len(times), 4),
        "images_per_s": round(batch * len(times) / total_s, 2),
        "tflop_per_step_mean": round(total_flops / len(flops) / 1e12, 4) if flops else None,
        "achieved_tflops": round(total_flops / total_s / 1e12, 3) if flops else None,
    }
    if peak and flops:
        out["mfu"] = round(total_flops / total_s / peak, 4)
    return out


def time_on_data(args, variant: Variant, dtype, device, peak) -> dict:
    """The variant fed by the real pipeline: the wait for each batch counts in its step time."""
    from dmt_jepa.data.device import Normaliser, decode_on_device
    from dmt_jepa.data.pipeline import StreamSpec, expand_shards, micro_batches

    cfg = DataConfig(train=args.data, num_workers=args.workers, decode=args.decode)
    spec = StreamSpec(
        urls=expand_shards(args.data),
        cfg=cfg,
        mask_cfg=variant.sampler.cfg,
        img_size=(args.img_size, args.img_size),
        grid=(args.img_size // args.patch_size,) * 2,
        batch_size=args.batch,
        seed=args.seed,
        epoch=0,
        rank=0,
        world_size=1,
        batches_per_epoch=args.warmup + args.steps,
    )
    normalise = Normaliser(cfg, device)
    times, flops, cache = [], [], {}
    batches = micro_batches(spec, args.workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        images = normalise(decode_on_device(batch, device))
        masks = Masks(batch["context_idx"], batch["target_idx"]).to(device, non_blocking=True)
        variant.step(images, masks, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if i >= args.warmup:
            times.append(now - start)
            flops.append(count_flops(variant.model, images, masks, dtype, cache))
        start = time.perf_counter()
    return summary(args.batch, times, flops, peak) | {"workers": args.workers, "decode": args.decode}


if __name__ == "__main__":
    main()
