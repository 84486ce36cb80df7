"""A ViTDet simple feature pyramid on the encoder, as a backbone torchvision's detectors accept.

Flow: images [B, 3, H, W] -> pad to a patch multiple -> encoder (one stride-p map, or several
chosen blocks) -> per level a rescaling (transposed convs up, max-pool down) -> 1x1 and 3x3 convs
with LayerNorm to `out_channels` -> OrderedDict of NCHW maps, finest first, plus a "pool" level.
torchvision's FasterRCNN / MaskRCNN / RetinaNet take any module with `out_channels` that returns
such a dict, so this plugs into them with no glue. The one invariant: level i has stride
`patch_size / scales[i]` (4, 8, 16, 32 for patch 16), whatever the input size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from dmt_jepa.models.vision_transformer import VisionTransformer, resolve_layers

VITDET_SCALES = (4.0, 2.0, 1.0, 0.5)  # ViTDet's levels relative to the patch grid: strides 4, 8, 16, 32 at p = 16


def _rescale(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The resampling of one level (ViTDet): (module, channels it outputs)."""
    if scale == 4.0:
        return (
            nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                LayerNorm2d(dim // 2),
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
            ),
            dim // 4,
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2), dim
    raise ValueError(f"pyramid scales must be 4, 2, 1 or 0.5, got {scale}")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's neck: stride-p maps [B, D, h, w] -> one map per scale with `out_channels` channels.

    Given one map, every level is made from it (ViTDet); given one map per level (chosen blocks,
    as UperNet's ViT necks take them), level i is made from map i.
    """

    def __init__(self, dim: int, out_channels: int = 256, scales: Sequence[float] = VITDET_SCALES):
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.resample = nn.ModuleList()
        self.project = nn.ModuleList()
        for scale in self.scales:
            resample, channels = _rescale(dim, scale)
            self.resample.append(resample)
            self.project.append(
                nn.Sequential(
                    Conv2dNormActivation(channels, out_channels, 1, norm_layer=LayerNorm2d, activation_layer=None, bias=False),
                    Conv2dNormActivation(
                        out_channels, out_channels, 3, norm_layer=LayerNorm2d, activation_layer=None, bias=False
                    ),
                )
            )

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One [B, D, h, w] map, or one per level -> [B, out_channels, h * scale, w * scale] per level."""
        assert len(maps) in (1, len(self.scales)), (len(maps), len(self.scales))
        sources = list(maps) * len(self.scales) if len(maps) == 1 else list(maps)
        return [project(resample(x)) for x, resample, project in zip(sources, self.resample, self.project)]


class EncoderBackbone(nn.Module):
    """The encoder and a simple feature pyramid, with the interface of torchvision's detection backbones.

    `layers` None builds every level from the last block (ViTDet); a list of block indices, one
    per level, builds level i from block layers[i] (e.g. (2, 5, 8, 11) for ViT-B). With
    `freeze_encoder` the encoder runs without gradients and stays in eval mode while the rest trains.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        out_channels: int = 256,
        layers: Sequence[int] | None = None,
        scales: Sequence[float] = VITDET_SCALES,
        freeze_encoder: bool = True,
        extra_pool: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.layers = resolve_layers(encoder.depth, list(layers) if layers is not None else 1)
        if layers is not None and len(self.layers) != len(scales):
            raise ValueError(f"one layer per pyramid level: got {len(self.layers)} layers for {len(scales)} levels")
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, out_channels, scales)
        self.out_channels = out_channels
        self.extra_pool = extra_pool
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
            encoder.eval()

    @property
    def strides(self) -> list[float]:
        """Stride of each output level in input pixels, the extra pool level last."""
        strides = [self.encoder.patch_size / s for s in self.pyramid.scales]
        return strides + [2 * strides[-1]] if self.extra_pool else strides

    def train(self, mode: bool = True) -> EncoderBackbone:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # no dropout or drop-path in a frozen encoder
        return self

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> the chosen blocks as [B, D, ceil(H/p), ceil(W/p)], normed; padded at bottom and right."""
        patch = self.encoder.patch_size
        pad_h, pad_w = -images.shape[-2] % patch, -images.shape[-1] % patch
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))  # zero = the pixel mean after normalisation
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.encoder.intermediate_layers(images, self.layers, output_fmt="NCHW").maps

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """[B, 3, H, W] normalised -> {"0": finest, ..., "3": coarsest, "pool": coarsest max-pooled}."""
        levels = self.pyramid(self.encode(images))
        features = OrderedDict((str(i), level) for i, level in enumerate(levels))
        if self.extra_pool:
            # torchvision's LastLevelMaxPool: the extra level its FPN backbones add for the largest anchors.
            features["pool"] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)
        return features
