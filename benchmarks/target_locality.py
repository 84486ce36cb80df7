"""How local targets and the predictor's inputs are at initialisation, on real scenes; prints JSON.

For every aggregation and head query: the within-image share of target variance and the cosine
of targets to their image's mean target (`dmt_jepa.heads.target_locality`); for every head query
and context path: the same share of what the predictor receives (the online head's output on the
context tokens). Same seed, same encoder, same images and masks for every row.

    python benchmarks/target_locality.py --images 16
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from dmt_jepa.config import CONTEXT_PATHS, QUERIES, MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.encoder_file import IMAGENET_MEAN, IMAGENET_STD
from dmt_jepa.heads import target_locality
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA
from dmt_jepa.scenes import make_scene


def scenes(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` built-in train scenes, normalised: [B, 3, size, size]."""
    images = np.stack([make_scene("train", i, seed=seed, image_size=size).image for i in range(count)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_nano")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = scenes(args.images, args.image_size, seed=3)

    def model(**target) -> DMTJEPA:
        torch.manual_seed(args.seed)  # the same encoder for every row
        model_cfg = ModelConfig(arch=args.arch, patch_size=args.patch_size, img_size=args.image_size, pred_width=64, pred_depth=1)
        return DMTJEPA(MethodConfig(model=model_cfg, mask=MaskConfig(), target=TargetConfig(**target))).eval()

    rows = {"targets": {}, "predictor_input": {}}
    for aggregation in ("none", "mean", "max"):
        rows["targets"][aggregation] = model(aggregation=aggregation).locality(images)
    for query in QUERIES:
        rows["targets"][f"cross_attention/{query}"] = model(query=query).locality(images)
    masks = None
    with torch.no_grad():
        for query in QUERIES:
            for context in CONTEXT_PATHS:
                m = model(query=query, context=context)
                if masks is None:
                    masks = MultiBlockMaskSampler(m.grid(images), m.cfg.mask)(len(images), torch.Generator().manual_seed(0))
                tokens = m.context_encoder(images, keep=masks.context_idx)
                rows["predictor_input"]["encoder tokens"] = target_locality(tokens)
                rows["predictor_input"][f"{query}/{context}"] = target_locality(m.context(images, masks.context_idx))
    print(json.dumps({"config": vars(args)} | rows, indent=1))


if __name__ == "__main__":
    main()
