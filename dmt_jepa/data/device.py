"""The device side of the training input: uint8 batches in, normalised float batches out.

Workers ship uint8 pixels (a quarter of fp32's bytes through shared and pinned memory) and the
device normalises them. With `data.decode: gpu` workers do not decode JPEGs at all: they draw
each crop box from the image header and ship the encoded bytes; `finish_batch` decodes them on
the device with torchvision's decoder (nvJPEG on CUDA), crops and resizes there. Images that
are not JPEG were decoded by the worker and arrive as pixels. The crop boxes are the CPU path's
draws, so both paths train on the same crops up to the resize filter.
"""

from __future__ import annotations

import numpy as np
import torch

from dmt_jepa.config import DataConfig
from dmt_jepa.data.pipeline import DataError

DECODES = ("cpu", "gpu")


class Normaliser:
    """uint8 [B, 3, H, W] on the device -> float32 (pixel - mean) / std, with the constants kept on the device."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        # The constants as numpy computes them in fp32, so the device gives the workers' former values bit for bit.
        mean = np.asarray(cfg.pixel_mean, dtype=np.float32) * 255.0
        scale = 1.0 / (np.asarray(cfg.pixel_std, dtype=np.float32) * 255.0)
        self.mean = torch.from_numpy(mean).to(device)[:, None, None]
        self.scale = torch.from_numpy(scale).to(device)[:, None, None]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8, images.dtype
        return (images.float() - self.mean) * self.scale


def decode_on_device(batch: dict, device: torch.device) -> torch.Tensor:
    """The uint8 images [B, 3, H, W] of a batch on `device`, decoding its still-encoded JPEGs there.

    batch["images"] holds the worker-decoded images (zeros where an image is still encoded);
    batch["encoded"] lists (row, uint8 bytes [L], crop box (left, top, w, h)) for the others.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resized_crop

    images = batch["images"].to(device, non_blocking=True)
    encoded = batch.get("encoded") or []
    if not encoded:
        return images
    size = list(images.shape[-2:])
    try:
        decoded = decode_jpeg([data for _, data, _ in encoded], mode=ImageReadMode.RGB, device=device)  # [3, h, w] each
    except RuntimeError as err:
        raise DataError(
            f"a JPEG in the batch cannot be decoded on the device ({str(err).splitlines()[0]}); "
            "train with data.decode=cpu, which skips undecodable images."
        ) from None
    for (row, _, (left, top, w, h)), pixels in zip(encoded, decoded):
        images[row] = resized_crop(pixels, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return images
