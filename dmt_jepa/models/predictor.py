"""I-JEPA predictor: a narrow ViT that predicts target-block features from context tokens."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from dmt_jepa.models.pos_embed import sincos_2d
from dmt_jepa.models.vision_transformer import LayerNorm, init_vit_weights, rescale_blocks


class Predictor(nn.Module):
    """Context tokens + one mask token per target position -> predicted target features.

    Each target block is one pass: the context is repeated once per block along the batch, so
    the output is ordered block-major, row m * B + b holding block m of image b.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        predictor_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.predictor_dim = predictor_dim
        self.embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.blocks = nn.ModuleList(
            Block(dim=predictor_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(depth)
        )
        self.norm = LayerNorm(predictor_dim)
        self.proj = nn.Linear(predictor_dim, embed_dim)
        self.apply(init_vit_weights)
        rescale_blocks(self.blocks)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self,
        context: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """[B, Nc, D] context tokens at [B, Nc] indices, targets [B, M, T] -> [M*B, T, D]."""
        batch, n_ctx, _ = context.shape
        n_blocks, n_tgt = target_idx.shape[1], target_idx.shape[2]
        x = self.embed(context)  # [B, Nc, P], in the compute dtype (bf16 under autocast)
        # The table in the stream's dtype: an fp32 table would promote the whole residual stream to fp32.
        pos = sincos_2d(*grid, self.predictor_dim, device=context.device, dtype=x.dtype)  # [N, P]
        x = x + pos[context_idx]
        x = x.repeat(n_blocks, 1, 1)  # [M*B, Nc, P]
        tgt = target_idx.transpose(0, 1).reshape(n_blocks * batch, n_tgt)  # [M*B, T]
        queries = self.mask_token.to(x.dtype) + pos[tgt]  # [M*B, T, P]
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, n_ctx:]))  # [M*B, T, D]
