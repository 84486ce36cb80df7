"""Frozen features of an encoder: pooled vectors and patch-embedding grids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.models import VisionTransformer


@dataclass
class Features:
    """Encoder outputs for a set of images."""

    pooled: torch.Tensor  # [N, D] mean of patch embeddings
    patches: torch.Tensor  # [N, h, w, D]


def to_input(images: list[np.ndarray], info: EncoderInfo, image_size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 RGB images -> normalised float [B, 3, H, W] at the given size (bilinear resize)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    resized = []
    for image in images:
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0  # [1, 3, H0, W0]
        if tuple(x.shape[-2:]) != size:  # shards may hold images of any size
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        resized.append(x)
    x = torch.cat(resized)  # [B, 3, H, W]
    mean = torch.tensor(info.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(info.pixel_std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def extract_features(
    encoder: VisionTransformer,
    info: EncoderInfo,
    images: list[np.ndarray],
    *,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 64,
) -> Features:
    """Run the frozen encoder over images (resized to `image_size`, default its training size)."""
    size = image_size or info.img_size
    device = next(encoder.parameters()).device
    pooled, patches = [], []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], info, size).to(device)
        grid, mean = encoder.dense(x)  # [B, h, w, D], [B, D]
        patches.append(grid.float().cpu())
        pooled.append(mean.float().cpu())
    return Features(torch.cat(pooled), torch.cat(patches))
