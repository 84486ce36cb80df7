"""Local aggregation target: heads that turn each patch's semantic neighbours into its target.

Two places use a head. On the target side (`forward_local`) every queried patch attends to its
own k neighbours; the query that starts each patch's residual stream is a config choice
(`QUERIES`): the patch's own target feature (`self`), one learned token shared by every patch and
image (`learned`, SelfPatch's head), or the image's mean token (`mean`). The residual stream is
what a target is made of beside its neighbours, so the query decides how local targets are: with
`mean`, every target of an image is LN(image mean + a small neighbour term).

On the context side (`forward_global`) the online head runs on every context token: per block, the
query attends to all context tokens, the result joins each token's residual stream, the MLP runs
on every token, and a final LayerNorm closes the head. This is how the online head receives
gradients; the target head is its EMA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from dmt_jepa.config import CONTEXT_PATHS, QUERIES
from dmt_jepa.models.vision_transformer import LayerNorm, init_vit_weights


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, ...] at idx [B, Q, k] -> [B, Q, k, ...]."""
    batch, q, k = idx.shape
    flat = idx.reshape(batch, q * k)
    out = torch.gather(tokens, 1, flat.view(batch, q * k, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:]))
    return out.view(batch, q, k, *tokens.shape[2:])


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] at positions [B, P] -> [B, P, ...]."""
    return torch.gather(x, 1, positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


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

    def keys_values(self, tokens: torch.Tensor, *, normed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, D] -> keys, values [B, N, heads, hd]; once per token, whoever selects it.

        `normed`: the tokens already went through norm1.
        """
        batch, n, _ = tokens.shape
        kv = self.kv(tokens if normed else self.norm1(tokens)).view(batch, n, 2, self.num_heads, self.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    def queries(self, x: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """[B, Q, D] -> [B, Q, heads, hd]; `normed`: x already went through norm1."""
        return self.q(x if normed else self.norm1(x)).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output (broadcast over x's tokens), then the residual MLP."""
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

    def attend_all(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Queries [B, Q, D] attend to all tokens [B, N, D] -> attended [B, Q, H, hd]."""
        normed = self.norm1(tokens)
        # Queries that are the tokens themselves (`self`) share their norm1 with the keys.
        q = self.queries(normed, normed=True) if queries is tokens else self.queries(queries)
        keys, values = self.keys_values(normed, normed=True)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        )  # [B, H, Q, hd]
        return attended.transpose(1, 2)


class LocalAggregationHead(nn.Module):
    """Aggregates each patch's k semantic neighbours into one target vector (DMT-JEPA)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        mode: str = "cross_attention",
        query: str = "self",
        context: str = "tokens",
    ):
        super().__init__()
        if mode not in ("cross_attention", "self_attention"):
            raise ValueError(f"a learned head needs mode cross_attention or self_attention, got {mode!r}")
        if query not in QUERIES:
            raise ValueError(f"query must be one of {', '.join(QUERIES)}, got {query!r}")
        if context not in CONTEXT_PATHS:
            raise ValueError(f"context must be one of {', '.join(CONTEXT_PATHS)}, got {context!r}")
        self.mode, self.query, self.context = mode, query, context
        if mode == "cross_attention":
            self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(
                Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(depth)
            )
        self.norm = LayerNorm(dim)
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim)) if query == "learned" else None
        self.apply(init_vit_weights)
        if self.query_token is not None:
            trunc_normal_(self.query_token, std=0.02)

    def start(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Where each target's residual stream starts: [B, P, D] (`self`) or [B, 1, D] shared by the image."""
        if self.query == "self":
            return tokens if positions is None else gather_rows(tokens, positions)
        if self.query == "learned":
            return self.query_token.expand(tokens.shape[0], 1, -1)
        return tokens.mean(dim=1, keepdim=True)

    def forward_local(
        self, tokens: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Targets for the patches at `positions` [B, P] (default: all N) -> [B, P, D].

        tokens [B, N, D] are the normalised target features; idx/valid [B, N, k] come from
        `semantic_neighbours`.
        """
        if positions is not None:
            idx, valid = gather_rows(idx, positions), gather_rows(valid, positions)  # [B, P, k]
        x = self.start(tokens, positions)  # [B, P or 1, D]
        if self.mode == "self_attention":
            return self._self_attention_local(tokens, x, idx, valid)
        for block in self.blocks:
            keys, values = block.keys_values(tokens)  # [B, N, H, hd], once per patch
            x = block.forward_local(x, keys, values, idx, valid)  # [B, P, D] after the first block
        return self.norm(x)

    def _self_attention_local(self, tokens, start, idx, valid) -> torch.Tensor:
        batch, p, k = idx.shape
        dim = tokens.shape[-1]
        seq = torch.cat([start.expand(batch, p, dim).unsqueeze(2), gather_tokens(tokens, idx)], dim=2)
        seq = seq.reshape(batch * p, k + 1, dim)  # [B*P, 1+k, D]
        keep = torch.cat([valid.new_ones(batch, p, 1), valid], dim=2).reshape(batch * p, 1, 1, k + 1)
        bias = torch.zeros(keep.shape, dtype=seq.dtype, device=seq.device).masked_fill(~keep, float("-inf"))
        for block in self.blocks:
            seq = block(seq, attn_mask=bias)
        return self.norm(seq[:, 0]).view(batch, p, dim)

    def forward_global(self, tokens: torch.Tensor) -> torch.Tensor:
        """Context side: every context token [B, Nc, D] through the head -> [B, Nc, D].

        (`none` context: the model does not call this; its head is never trained.)
        `tokens` context: the tokens are the residual stream; per block the query (each token for
        `self`, the learned token, or the mean of the block's input tokens) attends to all tokens,
        the MLP runs per token, and the head's final LayerNorm ends it. `added` context: the query's
        own stream goes through the blocks and LN(its result) is added to every token.
        """
        if self.mode == "self_attention":
            return self._self_attention_global(tokens)
        if self.context == "added":
            x = self.start(tokens, None)
            for block in self.blocks:
                x = block.finish(x, block.attend_all(x, tokens))
            return tokens + self.norm(x)
        x = tokens
        for block in self.blocks:
            queries = x if self.query == "self" else self.start(x, None)  # mean recomputed from this block's input
            x = block.finish(x, block.attend_all(queries, x))  # [B, Nc, D]; a [B, 1, ...] result joins every token
        return self.norm(x)

    def _self_attention_global(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.query == "self":
            seq = tokens
        else:
            seq = torch.cat([self.start(tokens, None), tokens], dim=1)
        for block in self.blocks:
            seq = block(seq)
        if self.context == "added":
            return tokens + self.norm(seq[:, :1] if self.query != "self" else seq)
        return self.norm(seq[:, seq.shape[1] - tokens.shape[1] :])


def pool_neighbours(
    tokens: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, mode: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Parameter-free aggregation (`mean` or `max`) over the valid neighbours -> [B, P, D]."""
    if positions is not None:
        idx, valid = gather_rows(idx, positions), gather_rows(valid, positions)
    neigh = gather_tokens(tokens, idx)  # [B, P, k, D]
    mask = valid.unsqueeze(-1)
    if mode == "mean":
        return (neigh * mask).sum(2) / mask.sum(2).clamp(min=1)
    if mode == "max":
        return neigh.masked_fill(~mask, float("-inf")).amax(2)
    raise ValueError(f"pooling mode must be mean or max, got {mode!r}")


def target_locality(targets: torch.Tensor) -> dict[str, float]:
    """How local targets [B, N, D] are: the within-image share of their variance and their cosine to the image mean.

    within_image_share = sum over images and patches of |t - image mean|^2 / sum of |t - batch mean|^2;
    1 when images share one mean, 0 when every target of an image is the same vector.
    """
    t = targets.detach().float()
    image_mean = t.mean(dim=1, keepdim=True)  # [B, 1, D]
    within = (t - image_mean).square().sum()
    total = (t - t.mean(dim=(0, 1), keepdim=True)).square().sum()
    cosine = F.cosine_similarity(t, image_mean.expand_as(t), dim=-1)  # [B, N]
    return {
        "within_image_share": float(within / total.clamp_min(1e-12)),
        "cos_to_image_mean": float(cosine.mean()),
    }
