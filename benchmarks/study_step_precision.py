"""Does bf16 autocast make the study's training step cheaper on this CPU? Prints ms per step, fp32 and bf16, alternating.

The study's model (vit_nano/8 at 64 px, batch 32, its predictor and masks) for I-JEPA and the paper's head,
one thread (as each study worker runs), random inputs; rounds alternate fp32 and bf16 so that a machine
that gets busier or quieter moves both alike. The CPU model and whether it has AVX512-BF16 are printed.

    python benchmarks/study_step_precision.py --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study

from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA, train_step
from dmt_jepa.precision import device_has_bf16


def ms_per_step(arm: str, dtype: torch.dtype | None, steps: int, warmup: int = 5) -> float:
    cfg = study.StudyConfig()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = DMTJEPA(study.method_config(cfg, arm))
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    sampler = MultiBlockMaskSampler(model.grid(images[:1]), model.cfg.mask)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    for index in range(warmup + steps):
        if index == warmup:
            start = time.perf_counter()
        train_step(model, images, sampler(cfg.batch_size, generator), optimizer, 0.99, autocast_dtype=dtype)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["i-jepa", "dmt-jepa"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = study.StudyConfig()
    print(f"# {study.machine(cfg)}; AVX512-BF16 (or AMX): {device_has_bf16('cpu')}", flush=True)
    for arm in args.arms:
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            times["fp32"].append(ms_per_step(arm, None, args.steps))
            times["bf16"].append(ms_per_step(arm, torch.bfloat16, args.steps))
        best = {name: min(values) for name, values in times.items()}
        print(
            json.dumps(
                {
                    "arm": arm,
                    "ms_per_step": {k: [round(v, 1) for v in vs] for k, vs in times.items()},
                    "bf16_over_fp32": round(best["bf16"] / best["fp32"], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
