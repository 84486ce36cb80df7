"""Local aggregation target: heads that turn each patch's semantic neighbours into its target.

Two places use a head. On the target side (`forward_local`) every queried patch attends to its
own k neighbours with its image's mean token as the query. On the context side (`forward_global`)
the online head's mean token attends to all context tokens and the result is added to every
context token; this is how the online head receives gradients, and the target head is its EMA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from dmt_jepa.models.vision_transformer import LayerNorm, init_vit_weights


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, ...] at idx [B, Q, k] -> [B, Q, k, ...]."""
    batch, q, k = idx.shape
    flat = idx.reshape(batch, q * k)
    out = torch.gather(tokens, 1, flat.view(batch, q * k, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:]))
    return out.view(batch, q, k, *tokens.shape[2:])


class CrossAttentionBlock(nn.Module):
    """Class-attention block: queries attend to key/value tokens; only the queries are updated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm1 = LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, D] -> keys, values [B, N, heads, hd]; once per token, whoever selects it."""
        batch, n, _ = tokens.shape
        kv = self.kv(self.norm1(tokens)).view(batch, n, 2, self.num_heads, self.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Q, D] -> [B, Q, heads, hd]."""
        return self.q(self.norm1(x)).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output, then the residual MLP."""
        x = x + self.proj(attended.flatten(2))
        return x + self.mlp(self.norm2(x))

    def forward_local(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Queries x [B, Q or 1, D] attend to their neighbours idx/valid [B, Q, k] -> [B, Q, D]."""
        q = self.queries(x) * self.scale  # [B, Q or 1, H, hd]
        k_nb = gather_tokens(keys, idx)  # [B, Q, k, H, hd]
        v_nb = gather_tokens(values, idx)
        logits = (q.unsqueeze(2) * k_nb).sum(-1)  # [B, Q, k, H]
        logits = logits.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        attn = logits.softmax(dim=2)
        attended = (attn.unsqueeze(-1) * v_nb).sum(2)  # [B, Q, H, hd]
        return self.finish(x, attended)

    def forward_global(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Queries x [B, Q, D] attend to all tokens [B, N, D] -> [B, Q, D]."""
        keys, values = self.keys_values(tokens)
        attended = F.scaled_dot_product_attention(
            self.queries(x).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        )  # [B, H, Q, hd]
        return self.finish(x, attended.transpose(1, 2))


class LocalAggregationHead(nn.Module):
    """Aggregates each patch's k semantic neighbours into one target vector (DMT-JEPA)."""

    def __init__(self, dim: int, num_heads: int, *, depth: int = 2, mlp_ratio: float = 4.0, mode: str = "cross_attention"):
        super().__init__()
        if mode not in ("cross_attention", "self_attention"):
            raise ValueError(f"a learned head needs mode cross_attention or self_attention, got {mode!r}")
        self.mode = mode
        if mode == "cross_attention":
            self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(
                Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(depth)
            )
        self.norm = LayerNorm(dim)
        self.apply(init_vit_weights)

    def forward_local(
        self, tokens: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Targets for the patches at `positions` [B, P] (default: all N) -> [B, P, D].

        tokens [B, N, D] are the normalised target features; idx/valid [B, N, k] come from
        `semantic_neighbours`. Every query starts as the mean token of its own image.
        """
        if positions is not None:
            idx = torch.gather(idx, 1, positions[..., None].expand(-1, -1, idx.shape[-1]))  # [B, P, k]
            valid = torch.gather(valid, 1, positions[..., None].expand(-1, -1, valid.shape[-1]))
        mean_token = tokens.mean(dim=1, keepdim=True)  # [B, 1, D]
        if self.mode == "self_attention":
            return self._self_attention_local(tokens, mean_token, idx, valid)
        x = mean_token
        for block in self.blocks:
            keys, values = block.keys_values(tokens)  # [B, N, H, hd], once per patch
            x = block.forward_local(x, keys, values, idx, valid)  # [B, P, D] after the first block
        return self.norm(x)

    def _self_attention_local(self, tokens, mean_token, idx, valid) -> torch.Tensor:
        batch, p, k = idx.shape
        dim = tokens.shape[-1]
        seq = torch.cat([mean_token.expand(batch, p, dim).unsqueeze(2), gather_tokens(tokens, idx)], dim=2)
        seq = seq.reshape(batch * p, k + 1, dim)  # [B*P, 1+k, D]
        keep = torch.cat([valid.new_ones(batch, p, 1), valid], dim=2).reshape(batch * p, 1, 1, k + 1)
        bias = torch.zeros(keep.shape, dtype=seq.dtype, device=seq.device).masked_fill(~keep, float("-inf"))
        for block in self.blocks:
            seq = block(seq, attn_mask=bias)
        return self.norm(seq[:, 0]).view(batch, p, dim)

    def forward_global(self, tokens: torch.Tensor) -> torch.Tensor:
        """Context side: tokens [B, Nc, D] + the head's output for their mean token."""
        mean_token = tokens.mean(dim=1, keepdim=True)  # [B, 1, D]
        if self.mode == "self_attention":
            seq = torch.cat([mean_token, tokens], dim=1)
            for block in self.blocks:
                seq = block(seq)
            return tokens + self.norm(seq[:, :1])
        x = mean_token
        for block in self.blocks:
            x = block.forward_global(x, tokens)
        return tokens + self.norm(x)


def pool_neighbours(
    tokens: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, mode: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Parameter-free aggregation (`mean` or `max`) over the valid neighbours -> [B, P, D]."""
    if positions is not None:
        idx = torch.gather(idx, 1, positions[..., None].expand(-1, -1, idx.shape[-1]))
        valid = torch.gather(valid, 1, positions[..., None].expand(-1, -1, valid.shape[-1]))
    neigh = gather_tokens(tokens, idx)  # [B, P, k, D]
    mask = valid.unsqueeze(-1)
    if mode == "mean":
        return (neigh * mask).sum(2) / mask.sum(2).clamp(min=1)
    if mode == "max":
        return neigh.masked_fill(~mask, float("-inf")).amax(2)
    raise ValueError(f"pooling mode must be mean or max, got {mode!r}")
