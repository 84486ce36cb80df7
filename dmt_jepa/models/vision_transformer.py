"""Vision Transformer without CLS token, with a fixed 2-D sin-cos position embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmt_jepa.limits import MAX_IMG_SIZE, MAX_PATCH_SIZE
from dmt_jepa.models.pos_embed import sincos_2d
from dmt_jepa.models.variants import VARIANTS, Variant  # noqa: F401  (imported from here too)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def init_vit_weights(module: nn.Module) -> None:
    """I-JEPA initialisation: truncated normal (std 0.02) for linear layers, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rescale_blocks(blocks: nn.ModuleList) -> None:
    """Scale each residual branch's output projection by 1/sqrt(2 * layer) (I-JEPA)."""
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))


OUTPUT_FORMATS = ("NCHW", "NHWC")  # intermediate_layers' map layouts, the default first
TIMM_OUTPUT_FORMATS = ("NCHW", "NLC")  # forward_intermediates', as timm's


class LayerFeatures(NamedTuple):
    """Chosen layers as maps and the deployed pooled vector (mean of the last layer's normed tokens)."""

    maps: list[torch.Tensor]  # one per chosen layer, [B, D, h, w] (NCHW) or [B, h, w, D] (NHWC)
    pooled: torch.Tensor  # [B, D]


def resolve_layers(depth: int, layers: int | Sequence[int]) -> list[int]:
    """Block indices from "the last n" (an int) or explicit indices (negative count from the end).

    The conventions of timm's `forward_intermediates(indices=...)` and DINOv2's
    `get_intermediate_layers(n=...)`; a user's wrong choice raises ValueError with the valid range.
    """
    if isinstance(layers, int):
        if not 0 < layers <= depth:
            raise ValueError(f"cannot take the last {layers} layers of a {depth}-block encoder; choose 1 to {depth}.")
        return list(range(depth - layers, depth))
    chosen = [i + depth if i < 0 else i for i in layers]
    bad = [i for i, c in zip(layers, chosen) if not 0 <= c < depth]
    if bad or not chosen:
        raise ValueError(f"layer indices {list(layers)} are not all within 0 to {depth - 1} (or -{depth} to -1).")
    return chosen


class VisionTransformer(nn.Module):
    """ViT encoder over patch tokens only; `keep` selects the context patches after embedding.

    Besides its own API (`dense`, `intermediate_layers`) it has timm's model surface, so code
    written for timm backbones takes it: `forward_features`, `forward_intermediates`,
    `num_features`, `feature_info`, `set_grad_checkpointing`.
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        # strict_img_size=False: any H x W that is a multiple of the patch size is accepted.
        self.patch_embed = PatchEmbed(
            img_size=self.img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # plain numbers, also when built on "meta"
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=drop_path[i],
                norm_layer=LayerNorm,
            )
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        self.apply(init_vit_weights)
        rescale_blocks(self.blocks)
        self.num_features = embed_dim
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's switch)."""
        self.grad_checkpointing = enable

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid of the training image size."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patchify and add position embeddings: [B, 3, H, W] -> [B, h*w, D], h, w."""
        x = self.patch_embed(images)  # [B, h, w, D]
        batch, h, w, dim = x.shape
        x = x.reshape(batch, h * w, dim)
        return x + sincos_2d(h, w, dim, device=x.device, dtype=x.dtype), h, w

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encode images; with `keep` [B, K] (patch indices), only those patches are processed.

        [B, 3, H, W] -> [B, N, D], or [B, K, D] with `keep`. Output is after the final LayerNorm.
        """
        x, _, _ = self.embed(images)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
        for block in self.blocks:
            x = self._block(block, x)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's name for the tokens after the final norm: [B, 3, H, W] -> [B, h*w, D] (no prefix tokens)."""
        return self.forward(images)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's `forward_intermediates`: outputs of chosen blocks, and the final normed tokens.

        `indices`: None takes every block, an int n the last n, a sequence those indices (negative
        from the end). `norm` applies the final LayerNorm to each (timm's default: not). Maps are
        [B, D, h, w] ("NCHW") or [B, h*w, D] ("NLC"). Returns the list alone with
        `intermediates_only`, else (tokens [B, h*w, D] after the final norm, list); `stop_early`
        skips the blocks after the last chosen one (then only with `intermediates_only`).
        """
        if output_fmt not in TIMM_OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {', '.join(TIMM_OUTPUT_FORMATS)}, got {output_fmt!r}")
        if stop_early and not intermediates_only:
            raise ValueError("stop_early skips the last blocks, so it needs intermediates_only=True.")
        chosen = resolve_layers(len(self.blocks), len(self.blocks) if indices is None else indices)
        tokens, h, w = self.embed(x)  # [B, N, D]
        last = max(chosen) if stop_early else len(self.blocks) - 1
        taken: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: last + 1]):
            tokens = self._block(block, tokens)
            if index in chosen:
                taken[index] = self.norm(tokens) if norm else tokens
        intermediates = [taken[index] for index in chosen]
        if output_fmt == "NCHW":  # [B, N, D] -> [B, D, h, w]
            intermediates = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deployment view: patch embeddings [B, h, w, D] and their mean, pooled [B, D]."""
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens = self.forward(images)  # [B, h*w, D]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]), tokens.mean(dim=1)

    def intermediate_layers(
        self,
        images: torch.Tensor,
        layers: int | Sequence[int] = 1,
        *,
        norm: bool = True,
        output_fmt: str = "NCHW",
    ) -> LayerFeatures:
        """Outputs of chosen blocks as maps, for dense heads (UperNet, ViTDet, DPT); and the pooled vector.

        `layers`: an int n takes the last n blocks, a sequence takes those block indices (0-based,
        negative from the end), in the order given. `norm` applies the final LayerNorm to each
        (DINOv2 does the same by default); the last block with `norm` is `dense`'s grid.
        Maps are [B, D, h, w] ("NCHW", what convolutional heads take) or [B, h, w, D] ("NHWC").
        Separate from `forward` so that training pays for none of this.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_fmt!r}")
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        last, taken = self.forward_intermediates(images, resolve_layers(len(self.blocks), layers), norm=norm, output_fmt="NLC")
        maps = [tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]) for tokens in taken]  # [B, h, w, D]
        if output_fmt == "NCHW":
            maps = [grid.permute(0, 3, 1, 2) for grid in maps]
        return LayerFeatures(maps, last.mean(dim=1))

    def dense_with_layers(
        self, images: torch.Tensor, layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """`dense` plus chosen blocks after the final norm, NHWC: (grid, pooled, [[B, h, w, D] per layer]).

        What the ONNX export and the embedding job write when asked for layers; with none it is `dense`.
        """
        if not layers:
            grid, pooled = self.dense(images)
            return grid, pooled, []
        features = self.intermediate_layers(images, [*layers, -1], output_fmt="NHWC")
        return features.maps[-1], features.pooled, features.maps[:-1]

    def last_layer_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, [B, heads, N, N] (for visualisation)."""
        x, _, _ = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attn = last.attn
        batch, n, dim = x.shape
        qkv = attn.qkv(last.norm1(x)).reshape(batch, n, 3, attn.num_heads, dim // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, heads, N, hd]
        q, k = attn.q_norm(q), attn.k_norm(k)
        return F.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def create_encoder(
    arch: str, *, patch_size: int = 16, img_size: int | tuple[int, int] = 224, drop_path_rate: float = 0.0
) -> VisionTransformer:
    """Build an encoder by name: vit_nano, vit_tiny, vit_small, vit_base, vit_large or vit_huge."""
    if not isinstance(arch, str) or arch not in VARIANTS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(VARIANTS)}.")
    if not _whole(patch_size) or not 2 <= patch_size <= MAX_PATCH_SIZE:
        raise ValueError(
            f"patch size must be a whole number from 2 to {MAX_PATCH_SIZE} pixels (8, 14 and 16 are usual), got {patch_size!r}."
        )
    sides = (img_size, img_size) if _whole(img_size) else tuple(img_size) if isinstance(img_size, (tuple, list)) else ()
    if len(sides) != 2 or not all(_whole(s) and patch_size <= s <= MAX_IMG_SIZE for s in sides):
        raise ValueError(
            f"image size must be one or two whole numbers of pixels from the patch size to {MAX_IMG_SIZE}, got {img_size!r}."
        )
    v = VARIANTS[arch]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=v.embed_dim,
        depth=v.depth,
        num_heads=v.num_heads,
        drop_path_rate=drop_path_rate,
    )
